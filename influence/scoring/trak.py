"""TRAK (Park et al., 2023): attribution through the randomly projected after-kernel, computed on the
run's stored projected gradients, one "model" per warm-up checkpoint, as ``traker`` computes it.

For checkpoint ``c``, with ``Phi_c`` the pool's projected gradients of the model output function and
``psi_c(t)`` the target example's (``project-grads --train-gradient margin``: TRAK's margin
``log p - log(1 - p)`` of each response token, averaged over the response), and ``Q`` TRAK's
out-to-loss weights (``1 - p`` averaged over the response tokens, then over checkpoints)::

    K_c        = (Phi_c^T Phi_c + lambda I)^-1, divided by its mean absolute entry (as traker's
                 BasicScoreComputer does before the ensemble average)
    trak(x, t) = (1/C) sum_c  phi_c(x)^T K_c psi_c(t)  *  Q(x)

Differences from ``traker``, on purpose: the kernel is accumulated and inverted in float64 (traker:
its working dtype, inverse in float32); ``lambda`` defaults to ``1e-2 x trace(Phi^T Phi) / dim`` per
checkpoint instead of 0, because instruction pools are often smaller than the projection dimension,
where ``Phi^T Phi`` is singular (``--lambda-reg 0`` gives traker's default and is refused when
singular). TRAK ensembles independently trained models; the checkpoints of one warm-up are a cheaper
stand-in (as TracIn uses them).

Sign and scale: positive = including ``x`` raises ``t``'s margin (lowers its loss): helpful;
unbounded. ``rank`` averages over the target's examples: higher = more helpful.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.naming import TRAIN, gradient_dataset
from ..errors import InfluenceError
from ..gradients.store import GradientStore, check_compatible, find_target_dataset, open_checkpoint_stores, resolve_dim
from ..train.run import Run
from . import options as shared
from .base import MARGIN_GRADIENTS, TARGET, Attribution, Method, Scores, Target, subtask_scores
from .products import folded_products, pairwise_products

RELATIVE_LAMBDA = 1e-2
DESCRIPTION = __doc__.strip().split("\n\n", 1)[1].split("\n\n")[0]  # the formula, in summary.json


def gram(store: GradientStore, rows_per_block: int | None = None) -> torch.Tensor:
    """``Phi^T Phi`` (float64) of a store's projected gradients, streamed block by block."""
    dim = store.metadata["projector"]["output_dim"]
    total = torch.zeros((dim, dim), dtype=torch.float64)
    for _, block in store.iter_chunks(rows_per_block):
        block = torch.from_numpy(np.nan_to_num(block.astype(np.float64), nan=0.0))
        total += block.T @ block
    return total


def kernel_inverse(xtx: torch.Tensor, lambda_reg: float | None) -> tuple[torch.Tensor, float]:
    """``(xtx + lambda I)^-1`` divided by its mean absolute entry (traker's normalisation), and lambda."""
    dim = xtx.shape[0]
    lam = RELATIVE_LAMBDA * float(torch.diagonal(xtx).sum()) / dim if lambda_reg is None else float(lambda_reg)
    if lambda_reg is not None and lam < 0:
        raise InfluenceError(f"--lambda-reg must not be negative, got {lambda_reg}")
    regularised = xtx + lam * torch.eye(dim, dtype=xtx.dtype)
    if lam == 0 and torch.linalg.matrix_rank(regularised) < dim:
        raise InfluenceError(f"Phi^T Phi is singular (rank {int(torch.linalg.matrix_rank(regularised))} < projection "
                             f"dimension {dim}: the pool has fewer examples than dimensions); use --lambda-reg > 0 "
                             "(or leave it unset) or a smaller --proj-dim")
    inverse = torch.linalg.inv(regularised)
    return inverse / inverse.abs().mean(), lam


@dataclass(kw_only=True)
class TrakOptions(shared.Projected):
    lambda_reg: float | None = shared.lambda_reg()


def trak_sides(run: Run, target: Target, proj_dim: int | None = None, lambda_reg: float | None = None,
               rows_per_block: int | None = None):
    """What TRAK multiplies the pool's gradients with: per checkpoint, one row ``K_c psi_c(t)`` per target example;
    and the pool's stores, the target's, the out-to-loss weights and what to record."""
    dim = resolve_dim(run, proj_dim)
    train = open_checkpoint_stores(run, gradient_dataset(TRAIN, "margin"), dim)
    targets = open_checkpoint_stores(
        run, find_target_dataset(run.store_path, dim, target.name, target.task_list, gradient_type="margin"), dim)
    check_compatible(train, targets, "margin", "margin")
    sides, lambdas = [], []
    for train_store, target_store in zip(train, targets):
        inverse, lam = kernel_inverse(gram(train_store, rows_per_block), lambda_reg)
        psi = torch.from_numpy(target_store.array("grads").astype(np.float64))
        sides.append((psi @ inverse.T).float())  # rows: K_c psi_c(t), so that phi(x) . row = phi^T K psi
        lambdas.append(lam)
    out_to_loss = np.mean([store.array("out_to_loss").astype(np.float64) for store in train], axis=0)
    details = {"checkpoints": [s.metadata["checkpoint"] for s in train], "lambda": lambdas,
               "projector": train[0].metadata["projector"]}
    return train, targets, sides, out_to_loss, details


def trak_attribution(run: Run, target: Target, proj_dim: int | None = None, lambda_reg: float | None = None,
                     rows_per_block: int | None = None) -> Attribution:
    """TRAK scores of every pool example for every target example (see the module docstring)."""
    train, targets, sides, out_to_loss, details = trak_sides(run, target, proj_dim, lambda_reg, rows_per_block)
    products, _ = pairwise_products(train, sides, np.full(len(train), 1.0 / len(train)), rows_per_block=rows_per_block)
    return Attribution("trak", train[0].ids.tolist(), targets[0].ids.tolist(), targets[0].tasks.tolist(),
                       products * out_to_loss[:, None], DESCRIPTION, details, {"out_to_loss": out_to_loss})


class Trak(Method):
    name = "trak"
    family = "influence"
    summary = "TRAK: attribution through the randomly projected after-kernel, one model per checkpoint"
    meaning = __doc__.strip().split("Sign and scale: ")[1]
    needs = (TARGET, MARGIN_GRADIENTS)
    Options = TrakOptions

    def attribution(self, run: Run, target: Target, options: TrakOptions) -> Attribution:
        return trak_attribution(run, target, options.proj_dim, options.lambda_reg)

    def scores(self, run: Run, target: Target, options: TrakOptions) -> Scores:
        """The mean over the target's examples, each subtask's ``K psi`` rows folded into their mean first (TRAK's
        score is linear in them; the out-to-loss weight scales pool rows): one product per subtask."""
        train, targets, sides, out_to_loss, details = trak_sides(run, target, options.proj_dim, options.lambda_reg)
        per_task, names, counts = folded_products(train, sides, np.full(len(train), 1.0 / len(train)),
                                                  targets[0].tasks.tolist())
        return subtask_scores("trak", train[0].ids.tolist(), per_task * out_to_loss[:, None], names, counts,
                              DESCRIPTION, details, {"out_to_loss": out_to_loss})
