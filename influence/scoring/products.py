"""Checkpoint-weighted products of the pool's stored gradients with target vectors, streamed block by block
(LESS per target example, TracIn, TRAK), and the same folded: when a score is the mean over a subtask's target
examples of a product that is linear in the target's vector, the subtask's targets fold into their mean vector
first, one product per subtask instead of one per target example (exact: ``mean_t x . v_t = x . mean_t v_t``)."""

from __future__ import annotations

import numpy as np
import torch

from ..gradients.store import GradientStore, map_blocks
from ..kernels.scoring import subtask_means, unit_rows


def pairwise_products(train: list[GradientStore], targets: list[torch.Tensor], weights, normalize: bool = False,
                      rows_per_block: int | None = None, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``sum_c weights[c] * rows_c(x) . targets[c]^T`` for every pool row ``x`` (unit-normalised rows
    with ``normalize``), streamed block by block over the pool's stores, one per checkpoint (:func:`map_blocks`):
    the (n_pool, n_target) float64 matrix (fp32 products summed in float64) and a per-row ``finite`` flag (false
    where any store flagged the row, or, with ``normalize``, where a row is all zero and has no direction)."""
    device = torch.device(device)
    n = train[0].n_examples
    sides = [target.to(device).float() for target in targets]
    weights = np.asarray(weights, dtype=np.float64)

    def products(start: int, blocks: list[np.ndarray], flags: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        total = torch.zeros((len(blocks[0]), sides[0].shape[0]), dtype=torch.float64, device=device)
        usable = flags.all(axis=0)
        for rows, side, weight in zip(blocks, sides, weights):
            rows = torch.from_numpy(rows).to(device).float()
            if normalize:
                usable &= (rows != 0).any(dim=1).cpu().numpy()
                rows = unit_rows(rows)
            total += weight * (rows @ side.T).double()
        return start, total.cpu().numpy(), usable

    matrix = np.zeros((n, sides[0].shape[0]), dtype=np.float64)
    finite = np.zeros(n, dtype=bool)
    for start, block, usable in map_blocks(train, products, rows_per_block, parallel=device.type == "cpu"):
        matrix[start : start + len(block)] = block
        finite[start : start + len(block)] = usable
    matrix[~finite] = np.nan
    return matrix, finite


def folded_products(train: list[GradientStore], sides: list[torch.Tensor], weights, tasks: list[str],
                    rows_per_block: int | None = None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The mean over each subtask's target examples of :func:`pairwise_products`, computed as the products with
    each subtask's mean target vector (``sides[c]``: one row per target example, ``tasks`` their subtasks):
    (n_pool x subtasks float64, the subtasks' names, their sizes)."""
    names, index, counts = np.unique(np.asarray(tasks), return_inverse=True, return_counts=True)
    means = [subtask_means(side.double(), torch.from_numpy(index), len(names), normalize=False).float()
             for side in sides]
    per_task, _ = pairwise_products(train, means, weights, rows_per_block=rows_per_block)
    return per_task, names.tolist(), counts
