"""The forward pass on response tokens only, and per-example losses.

Only positions that predict a response token need the (large) vocabulary projection: for an MMLU
target that is 2 of ~120 positions. ``forward_response`` asks the model for those logits alone through
``logits_to_keep``: a boolean (batch, seq) mask where the model's transformers slices with one
(``slice_logits_to_keep``, recent releases), else the 1-D positions kept in any row (every release with
``logits_to_keep``; earlier ones index ``hidden_states[:, positions]`` and fail on a 2-D mask), and full
logits for models without the argument. All three give the same losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.templates import IGNORE_INDEX


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


def slices_with_mask(model) -> bool:
    """Whether ``model`` takes a boolean (batch, seq) ``logits_to_keep``: a transformers model of a
    release that has ``slice_logits_to_keep`` (remote-code models may slice their own way)."""
    from transformers import modeling_utils

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    return hasattr(modeling_utils, "slice_logits_to_keep") and type(base).__module__.startswith("transformers.")


def logits_at(model, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """(n_kept, vocab) logits of the positions where ``keep`` (batch x seq, bool) is true, in the order
    of ``keep.nonzero()``."""
    positions = keep.any(dim=0).nonzero()[:, 0]
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=keep if slices_with_mask(model) else positions).logits
    except TypeError:  # models without logits_to_keep
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if logits.ndim == 2:  # sliced with the mask
        return logits
    if logits.shape[1] == keep.shape[1]:  # the model ignored the argument: full logits
        return logits[keep]
    return logits[keep[:, positions]]  # sliced at the positions kept in any row


def forward_response(model, batch: dict[str, torch.Tensor]) -> ResponseForward:
    labels = batch["labels"]
    # position t predicts token t+1; keep positions whose next token is a response token
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    logits = logits_at(model, batch, keep)
    rows = keep.nonzero()[:, 0]
    targets = labels[:, 1:][keep[:, :-1]]
    # half-precision logits in float32; float64 ones (exactness tests) stay float64
    token_loss = torch.nn.functional.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                                                   reduction="none")
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
