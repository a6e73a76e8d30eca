"""Scoring blocks of stored gradients against target subtasks (torch path).

``subtask_cosines(block, subtask_means)``: row-normalise a block of training features and take the
dot product with each subtask's mean *normalised* target vector. Because the mean of cosines over a
subtask's examples equals the cosine-weighted dot product with the mean of their unit vectors,
``mean_j cos(x, t_j) = (x/|x|) . mean_j (t_j/|t_j|)``, the full train x target similarity matrix is
never formed: memory is one block times the number of subtasks.
"""

from __future__ import annotations

import torch


def unit_rows(matrix: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm (fp32); all-zero rows stay zero."""
    matrix = matrix.float()
    return matrix / matrix.norm(dim=1, keepdim=True).clamp(min=eps)


def subtask_means(targets: torch.Tensor, task_index: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """(n_tasks, dim) mean of the unit-normalised target rows of each subtask."""
    units = unit_rows(targets)
    sums = torch.zeros((n_tasks, units.shape[1]), dtype=torch.float32, device=units.device)
    sums.index_add_(0, task_index, units)
    counts = torch.bincount(task_index, minlength=n_tasks).clamp(min=1).to(sums.dtype)
    return sums / counts[:, None]


def subtask_cosines(block: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """(rows, n_tasks): mean cosine similarity of each training row to each subtask's targets."""
    return unit_rows(block) @ means.T
