"""Per-example gradients of the LoRA parameters from one batched backward pass.

For a linear layer ``y = x W^T`` the gradient of example ``b``'s loss is ``sum_t dy[b,t]^T x[b,t]``.
Forward hooks keep each LoRA linear's input and a tensor hook on its output keeps ``dy``; one
backward of ``sum_b loss_b`` (each example's mean loss over its own response tokens) then yields
every example's exact gradient. Padding is exact: padded positions carry no loss and no causal
influence on real tokens, so their ``dy`` is zero.

Gradient features, as in LESS:

* targets: the plain gradient (``sgd``);
* training examples: the Adam update direction at the checkpoint (``adam``):
  ``m' = b1 m + (1-b1) g``, ``v' = b2 v + (1-b2) g^2``, feature ``m' / sqrt(v' + eps)``, exactly as
  LESS's ``obtain_gradients_with_adam`` (eps *inside* the square root; with LoRA gradients most ``v'``
  are far below ``eps = 1e-8``, so ``m' / (sqrt(v') + eps)`` would be a different feature).

Also, for TracIn (``project-grads --train-gradient sgd``) the pool's plain gradient, and for TRAK
(``--train-gradient margin``) the gradient of TRAK's model output function, the margin
``log p - log(1 - p)`` of each response token averaged over the response (for a multi-class output
TRAK's margin is the gold logit minus the log-sum-exp of the others), for pool and target alike.
Averaging over tokens, as the training loss does, keeps ``Q * grad f`` equal to minus the loss
gradient wherever ``1 - p`` is the same for every token, with ``Q`` TRAK's out-to-loss weight
``1 - p`` averaged the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from einops import einsum, rearrange
from torch import nn

from ..models.loading import lora_parameters
from ..models.losses import forward_response, mean_by_row

OBJECTIVES = ("loss", "margin")  # what a stored gradient feature differentiates
SAMPLED = "sampled"  # the loss of labels sampled from the model's own prediction: the true Fisher's gradients


@dataclass
class BatchGradients:
    grads: torch.Tensor  # (batch, dim) fp32, flattened in the order of LoraGradients.names
    losses: torch.Tensor  # (batch,) mean response-token loss
    n_tokens: torch.Tensor  # (batch,) response tokens
    norms: torch.Tensor  # (batch,) L2 norm of the plain (unprojected, unpreconditioned) gradient
    out_to_loss: torch.Tensor | None = None  # (batch,) margin objective: mean of 1 - p over response tokens
    # keep_tokens: per module, (inputs (batch, token, in), output gradients (batch, token, out), mask (batch, token)
    # of the real, unpadded tokens), what the Kronecker factors of the curvature are made of
    tokens: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def token_margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """TRAK's margin per token: the gold token's logit minus the log-sum-exp of every other logit,
    ``log p - log(1 - p)`` (computed without forming ``1 - p``, which underflows as p -> 1)."""
    logits = logits.float()
    gold = logits.gather(1, targets[:, None])[:, 0]
    others = logits.scatter(1, targets[:, None], float("-inf")).logsumexp(dim=1)
    return gold - others


class LoraGradients:
    """Hooks a peft model's LoRA linears; ``compute(batch)`` returns per-example gradients."""

    def __init__(self, model: nn.Module):
        self.model = model
        params = lora_parameters(model)
        by_id = {id(p): name for name, p in params.items()}
        self._modules: dict[str, nn.Linear] = {}
        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in by_id:
                if module.bias is not None and module.bias.requires_grad:
                    raise ValueError("LoRA layers with trainable bias are not supported")
                self._modules[by_id[id(module.weight)]] = module
        unsupported = sorted(set(params) - set(self._modules))
        if unsupported:
            raise ValueError(
                "per-example gradients cover LoRA linear weights only; other trainable parameters: "
                + ", ".join(unsupported[:5])
            )
        self.names = list(params)  # model order
        self.shapes = {name: tuple(params[name].shape) for name in self.names}
        self.dim = sum(params[name].numel() for name in self.names)
        self._inputs: dict[str, torch.Tensor] = {}
        self._output_grads: dict[str, torch.Tensor] = {}
        self._handles = [
            module.register_forward_hook(self._forward_hook(name)) for name, module in self._modules.items()
        ]

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled():
                return
            self._inputs[name] = inputs[0].detach()

            def keep_grad(grad):
                self._output_grads[name] = grad.detach()

            output.register_hook(keep_grad)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def compute(self, batch: dict[str, torch.Tensor], objective: str = "loss", generator: torch.Generator | None = None,
                keep_tokens: bool = False, token_sum: bool = False) -> BatchGradients:
        """Per-example gradients of ``objective``: ``loss`` (mean response-token NLL), ``margin``
        (mean response-token TRAK margin, :func:`token_margins`; ``out_to_loss`` is then TRAK's
        ``1 - p`` averaged over the response tokens) or ``sampled`` (the mean response-token NLL of labels
        drawn from the model's own prediction with ``generator``: the true Fisher's per-example gradients).
        ``keep_tokens``: also each module's per-token inputs and output gradients. ``token_sum``: of each example's
        loss summed over its response tokens instead of averaged (``loss`` and ``sampled``): how the training loss,
        an average over every response token of a batch, weighs an example."""
        if objective not in (*OBJECTIVES, SAMPLED):
            raise ValueError(f"unknown objective {objective!r}")
        self._inputs.clear()
        self._output_grads.clear()
        forward = forward_response(self.model, batch)
        losses, counts, rows = forward.losses, forward.counts, forward.rows
        out_to_loss = None
        if objective == "margin":
            margins = mean_by_row(token_margins(forward.logits, forward.targets), rows, len(counts))
            with torch.no_grad():
                token_loss = torch.nn.functional.cross_entropy(forward.logits.float(), forward.targets, reduction="none")
                out_to_loss = mean_by_row(1 - torch.exp(-token_loss), rows, len(counts))
            margins.sum().backward()
        elif objective == SAMPLED:
            with torch.no_grad():
                probabilities = torch.softmax(forward.logits.float(), dim=-1)
                sampled = torch.multinomial(probabilities.cpu(), 1, generator=generator)[:, 0].to(probabilities.device)
            token_loss = torch.nn.functional.cross_entropy(forward.logits.float(), sampled, reduction="none")
            per_example = mean_by_row(token_loss, rows, len(counts))
            (per_example * counts if token_sum else per_example).sum().backward()
        else:
            (losses * counts if token_sum else losses).sum().backward()
        del forward
        pieces = []
        tokens = {} if keep_tokens else None
        for name in self.names:
            x = self._inputs[name].float()
            dy = self._output_grads[name].float()
            if x.ndim == 2:  # a layer after the response-position selection (lm_head): rows are tokens
                x, dy = _unflatten(x, rows, counts), _unflatten(dy, rows, counts)
                mask = torch.arange(x.shape[1], device=x.device)[None, :] < counts[:, None]
            else:
                mask = batch["attention_mask"].bool()
            if tokens is not None:
                tokens[name] = (x, dy, mask)
            # Sum over tokens of dy^T x: one (out, in) matrix per example, laid out as the weight is (out-major),
            # so that it lines up with the flattened optimizer moments of :meth:`flatten`.
            per_example = einsum(dy, x, "batch token out, batch token inp -> batch out inp")
            pieces.append(rearrange(per_example, "batch out inp -> batch (out inp)"))
        for name in self.names:
            self._modules[name].weight.grad = None
        self._inputs.clear()
        self._output_grads.clear()
        grads = torch.cat(pieces, dim=1)
        return BatchGradients(grads, losses.detach(), counts, grads.norm(dim=1), out_to_loss, tokens)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flattened gradients (rows, dim) as one (rows, out, in) tensor per module, in gradient order (views)."""
        sizes = [int(np.prod(self.shapes[name])) for name in self.names]
        return {name: piece.reshape(len(flat), *self.shapes[name])
                for name, piece in zip(self.names, torch.split(flat, sizes, dim=1))}

    def flatten(self, tensors: dict[str, torch.Tensor], device) -> torch.Tensor:
        """Concatenate per-parameter tensors (e.g. Adam moments) in gradient order."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"no optimizer state for parameter(s) {missing[:3]}")
        return torch.cat([tensors[n].reshape(-1).to(device=device, dtype=torch.float32) for n in self.names])


def _unflatten(values: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(n_tokens, d) rows of a batch-flattened tensor -> zero-padded (batch, max count, d)."""
    offsets = torch.cumsum(counts, 0) - counts
    position = torch.arange(len(rows), device=rows.device) - offsets[rows]
    out = values.new_zeros((len(counts), int(counts.max()) if len(counts) else 0, values.shape[-1]))
    out[rows, position] = values
    return out


# Recorded in every gradient store's metadata: stores made with another definition are refused.
FEATURES = {
    "adam": "m'/sqrt(v'+eps); m'=b1*m+(1-b1)*g, v'=b2*v+(1-b2)*g^2 (LESS obtain_gradients_with_adam)",
    "sgd": "g (plain gradient of the mean response-token loss)",
    "margin": "grad of the mean over response tokens of TRAK's margin logit(gold) - logsumexp(other logits); "
              "out_to_loss = mean over response tokens of 1 - p(gold)",
    "ekfac": "(H + damping)^(-1/2) g, H the EK-FAC curvature of `influence curvature` (sampled labels, the warm-up "
             "data, damping 0.1 x the mean eigenvalue per module): dot products of two are g^T (H + damping)^-1 g'",
    "kfac": "(H + damping)^(-1/2) g, H the K-FAC curvature of `influence curvature` (sampled labels, the warm-up "
            "data, damping 0.1 x the mean eigenvalue per module): dot products of two are g^T (H + damping)^-1 g'",
}
OBJECTIVE_OF = {"adam": "loss", "sgd": "loss", "margin": "margin", "ekfac": "loss", "kfac": "loss"}  # what a feature differentiates


@dataclass
class AdamPreconditioner:
    """LESS's Adam feature from a checkpoint's moments (flattened like the gradients)."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        m = self.beta1 * self.exp_avg + (1 - self.beta1) * grads
        v = self.beta2 * self.exp_avg_sq + (1 - self.beta2) * grads.square()
        return m / (v + self.eps).sqrt()
