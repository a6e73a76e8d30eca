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


try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _subtask_cosine_kernel(
        x_ptr, means_ptr, out_ptr, best_ptr,
        n_rows, dim, n_tasks,
        stride_x, stride_m, stride_o,
        eps,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """One pass over a block of rows: squared norms and dots with every subtask mean, then
        cosine = dot / norm and the max over subtasks; nothing of size rows x dim is written."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        tasks = tl.arange(0, BLOCK_S)
        row_ok = rows < n_rows
        task_ok = tasks < n_tasks
        acc = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
        sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < dim
            x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            x = x.to(tl.float32)
            m = tl.load(means_ptr + tasks[None, :] * stride_m + ks[:, None], mask=task_ok[None, :] & k_ok[:, None], other=0.0)
            acc += tl.dot(x, m, input_precision="ieee")
            sq += tl.sum(x * x, axis=1)
        cos = acc / tl.maximum(tl.sqrt(sq), eps)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_o + tasks[None, :], cos, mask=row_ok[:, None] & task_ok[None, :])
        best = tl.max(tl.where(task_ok[None, :], cos, float("-inf")), axis=1)
        tl.store(best_ptr + rows, best, mask=row_ok)


def subtask_cosines_triton(block: torch.Tensor, means: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton version of :func:`subtask_cosines`; also returns the max over subtasks."""
    if not HAVE_TRITON:
        raise RuntimeError("Triton is not installed")
    block = block.contiguous()
    means = means.float().contiguous()
    n_rows, dim = block.shape
    n_tasks = means.shape[0]
    out = torch.empty((n_rows, n_tasks), dtype=torch.float32, device=block.device)
    best = torch.empty((n_rows,), dtype=torch.float32, device=block.device)
    block_s = max(16, triton.next_power_of_2(n_tasks))
    block_r = 32 if block_s <= 64 else 16
    grid = (triton.cdiv(n_rows, block_r),)
    _subtask_cosine_kernel[grid](
        block, means, out, best, n_rows, dim, n_tasks,
        block.stride(0), means.stride(0), out.stride(0), eps,
        BLOCK_R=block_r, BLOCK_K=64, BLOCK_S=block_s,
    )
    return out, best


def score_block(block: torch.Tensor, means: torch.Tensor, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(per-subtask mean cosines, their max) for a block of stored rows, by either path."""
    if backend == "triton":
        return subtask_cosines_triton(block, means)
    cos = subtask_cosines(block, means)
    return cos, cos.max(dim=1).values
