"""Checkpoint-weighted products of the pool's stored gradients with target vectors, streamed block by block
(LESS per target example, TracIn, TRAK), and the same folded: when a score is the mean over a subtask's target
examples of a product that is linear in the target's vector, the subtask's targets fold into their mean vector
first, one product per subtask instead of one per target example (exact: ``mean_t x . v_t = x . mean_t v_t``)."""

from __future__ import annotations

import numpy as np
import torch

from ..gradients.store import GradientStore
from ..kernels.scoring import subtask_means, unit_rows


def pairwise_products(train: list[GradientStore], targets: list[torch.Tensor], weights, normalize: bool = False,
                      rows_per_block: int | None = None, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``sum_c weights[c] * rows_c(x) . targets[c]^T`` for every pool row ``x`` (unit-normalised rows
    with ``normalize``), streamed block by block over the pool's stores, one per checkpoint: the
    (n_pool, n_target) float64 matrix and a per-row ``finite`` flag (false where any store flagged
    the row, or, with ``normalize``, where a row is all zero and has no direction)."""
    n = train[0].n_examples
    matrix = np.zeros((n, targets[0].shape[0]), dtype=np.float64)
    finite = np.logical_and.reduce([store.array("finite") for store in train])
    readers = [store.iter_chunks(rows_per_block) for store in train]
    for chunks in zip(*readers):
        start = chunks[0][0]
        block = torch.zeros((len(chunks[0][1]), targets[0].shape[0]), dtype=torch.float64, device=device)
        for (_, rows), target, weight in zip(chunks, targets, np.asarray(weights, dtype=np.float64)):
            rows = torch.from_numpy(rows).to(device).float()
            if normalize:
                finite[start : start + len(rows)] &= (rows != 0).any(dim=1).cpu().numpy()
                rows = unit_rows(rows)
            block += weight * (rows @ target.to(device).float().T).double()
        matrix[start : start + len(block)] = block.cpu().numpy()
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
