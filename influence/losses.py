"""The forward pass on response tokens only, and per-example losses.

Only positions that predict a response token need the (large) vocabulary projection: for an MMLU
target that is 2 of ~120 positions. ``forward_response`` asks the model for those logits alone
(``logits_to_keep`` with a boolean mask, supported by recent transformers causal LMs) and falls back to
full logits for models that do not support it. Both give the same losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .templates import IGNORE_INDEX


@dataclass
class ResponseForward:
    logits: torch.Tensor  # (n_tokens, vocab): logits that predict each response token, batch-flattened
    targets: torch.Tensor  # (n_tokens,) the response token ids
    rows: torch.Tensor  # (n_tokens,) which example each token belongs to
    losses: torch.Tensor  # (batch,) mean NLL over each example's response tokens (0 if it has none)
    counts: torch.Tensor  # (batch,) response tokens per example

    def per_example(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of a per-token quantity over each example's response tokens."""
        return mean_by_row(values, self.rows, len(self.counts))


def mean_by_row(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) mean of batch-flattened per-token ``values`` over the tokens of each row (0 where none)."""
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    return sums / torch.bincount(rows, minlength=n).clamp(min=1).to(values.dtype)


def logits_at(model, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """(n_kept, vocab) logits of the positions where ``keep`` (batch x seq, bool) is true."""
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    except TypeError:  # models without logits_to_keep
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[keep] if logits.ndim == 3 else logits  # 3-D: the model ignored the mask


def forward_response(model, batch: dict[str, torch.Tensor]) -> ResponseForward:
    labels = batch["labels"]
    # position t predicts token t+1; keep positions whose next token is a response token
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    logits = logits_at(model, batch, keep)
    rows = keep.nonzero()[:, 0]
    targets = labels[:, 1:][keep[:, :-1]]
    token_loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    counts = keep.sum(dim=1)
    return ResponseForward(logits, targets, rows, mean_by_row(token_loss, rows, len(counts)), counts)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference computation from full (batch, seq, vocab) logits: (mean response loss, count)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1), counts
