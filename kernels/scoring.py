"""Scoring blocks of stored gradients against target subtasks, over all checkpoints at once.

``score_block(blocks, means, weights)`` takes the same rows of the pool at every checkpoint
(``blocks``: checkpoints x rows x dim) and returns, for each row,

* ``per_task[r, s] = sum_c w_c * (x_cr/|x_cr|) . means[c, s]`` and
* ``score[r]       = max_s per_task[r, s]``,

where ``means[c, s]`` is the mean of subtask ``s``'s *unit-normalised* target gradients at checkpoint
``c``. Because the mean of cosines over a subtask's examples equals the dot product with the mean of
their unit vectors, ``mean_j cos(x, t_j) = (x/|x|) . mean_j (t_j/|t_j|)``, the train x target
similarity matrix is never formed: memory is one block times the number of subtasks.

The order is LESS's (``matching.py``): the checkpoint-weighted sum of the cosine matrices first, then
the mean over each subtask's examples, then the max over subtasks. (The mean commutes with the
weighted sum; the max does not, so it comes last.) The Triton kernel does the normalisation, the
products, the weighted sum over checkpoints and the final max in one pass over the block; the torch
path computes the same numbers.
:class:`RunningTopK` keeps the best rows seen so far, so a ranking's head needs memory independent of
the pool size.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

# This folder is the package influence.kernels; Python started in a checkout's root could also see it as
# `kernels`, the name of Hugging Face's package, which transformers imports. It is never that.
if not __name__.startswith("influence.kernels."):
    raise ImportError(f"{__file__} is part of influence: import influence.kernels.scoring, not {__name__}")


def unit_rows(matrix: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm (fp32); all-zero rows stay zero."""
    matrix = matrix.float()
    return matrix / matrix.norm(dim=1, keepdim=True).clamp(min=eps)


def subtask_means(targets: torch.Tensor, task_index: torch.Tensor, n_tasks: int, normalize: bool = True) -> torch.Tensor:
    """(n_tasks, dim) mean of each subtask's target rows, unit-normalised first (fp32) unless ``normalize=False``
    (then in the rows' own dtype)."""
    units = unit_rows(targets) if normalize else targets
    sums = torch.zeros((n_tasks, units.shape[1]), dtype=units.dtype, device=units.device)
    sums.index_add_(0, task_index, units)
    counts = torch.bincount(task_index, minlength=n_tasks).clamp(min=1).to(sums.dtype)
    return sums / counts[:, None]


ROWS_PER_TILE = 512  # rows converted to fp32 at a time: a tile's copy (16 MiB at dim 8192), not the block's, is held


def padded_columns(means: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """``means`` (checkpoints, subtasks, dim) as the torch path multiplies by them: fp32, (checkpoints, dim,
    columns), the columns zero-padded to a multiple of ``multiple`` (CPU BLAS multiplies by 64 columns faster than
    by 57: 12.6 against 15 ms for a 4096 x 8192 block). A stream computes it once, not once per block."""
    means = means.float()
    padding = -means.shape[1] % multiple
    if padding:
        means = torch.cat([means, means.new_zeros((means.shape[0], padding, means.shape[2]))], dim=1)
    return means.transpose(1, 2).contiguous()


def score_block_torch(blocks: torch.Tensor, means: torch.Tensor, weights: torch.Tensor, eps: float = 1e-12,
                      columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch path of :func:`score_block_nonzero`. A tile of rows at a time is converted to fp32; its norms and its
    products with the subtask means (padded to a multiple of 16 columns) read that copy, and the cosine is
    ``(x . m) / |x|``: the rows are never divided. On a CPU the products are the cost, so nothing else reads the
    block twice. The norms also say which rows are all zero at some checkpoint. ``columns``: ``padded_columns(means)``
    where the caller has it."""
    n_rows, n_tasks = blocks[0].shape[0], means.shape[1]
    per_task = torch.zeros((n_rows, n_tasks), dtype=torch.float32, device=blocks[0].device)
    nonzero = torch.ones(n_rows, dtype=torch.bool, device=blocks[0].device)
    padded = padded_columns(means) if columns is None else columns
    products = torch.empty((n_rows, padded.shape[2]), dtype=torch.float32, device=blocks[0].device)
    norms = torch.empty(n_rows, dtype=torch.float32, device=blocks[0].device)
    # One fp32 tile, refilled: a fresh one per tile is fresh pages from the system each time (2x slower on a CPU).
    tile = torch.empty((min(ROWS_PER_TILE, n_rows), means.shape[2]), dtype=torch.float32, device=blocks[0].device)
    for block, columns, weight in zip(blocks, padded, weights.tolist()):
        for start in range(0, n_rows, ROWS_PER_TILE):
            rows = tile[: min(ROWS_PER_TILE, n_rows - start)].copy_(block[start : start + ROWS_PER_TILE])
            torch.linalg.vector_norm(rows, dim=1, out=norms[start : start + ROWS_PER_TILE])
            torch.mm(rows, columns, out=products[start : start + ROWS_PER_TILE])
        nonzero &= norms > 0
        per_task.add_(products[:, :n_tasks] / norms.clamp(min=eps)[:, None], alpha=weight)
    return per_task, per_task.max(dim=1).values, nonzero


try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _less_block_kernel(
        x_ptr, means_ptr, weights_ptr, per_task_ptr, score_ptr,
        n_checkpoints, n_rows, dim, n_tasks,
        stride_xc, stride_xr, stride_mc, stride_ms, stride_o,
        eps,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """For a tile of rows, at every checkpoint: squared norms and dots with every subtask mean,
        cosine = dot / norm, accumulated with the checkpoint's weight; then the max over subtasks.
        Nothing of size rows x dim is written."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        tasks = tl.arange(0, BLOCK_S)
        row_ok = rows < n_rows
        task_ok = tasks < n_tasks
        per_task = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
        for c in range(0, n_checkpoints):
            acc = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
            sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for k0 in range(0, dim, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < dim
                x = tl.load(x_ptr + c * stride_xc + rows[:, None] * stride_xr + ks[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                m = tl.load(means_ptr + c * stride_mc + tasks[None, :] * stride_ms + ks[:, None],
                            mask=task_ok[None, :] & k_ok[:, None], other=0.0)
                acc += tl.dot(x, m, input_precision="ieee")
                sq += tl.sum(x * x, axis=1)
            cos = acc / tl.maximum(tl.sqrt(sq), eps)[:, None]
            weight = tl.load(weights_ptr + c)
            per_task += weight * cos
        score = tl.max(tl.where(task_ok[None, :], per_task, float("-inf")), axis=1)
        tl.store(per_task_ptr + rows[:, None] * stride_o + tasks[None, :], per_task, mask=row_ok[:, None] & task_ok[None, :])
        tl.store(score_ptr + rows, score, mask=row_ok)


def score_block_triton(blocks: torch.Tensor, means: torch.Tensor, weights: torch.Tensor,
                       eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton path of :func:`score_block`."""
    if not HAVE_TRITON:
        raise RuntimeError("Triton is not installed")
    blocks = blocks.contiguous()
    means = means.float().contiguous()
    weights = weights.float().contiguous()
    n_checkpoints, n_rows, dim = blocks.shape
    n_tasks = means.shape[1]
    per_task = torch.empty((n_rows, n_tasks), dtype=torch.float32, device=blocks.device)
    score = torch.empty((n_rows,), dtype=torch.float32, device=blocks.device)
    block_s = max(16, triton.next_power_of_2(n_tasks))
    block_r = 32 if block_s <= 64 else 16
    grid = (triton.cdiv(n_rows, block_r),)
    # Triton launches on the calling thread's current device: the blocks' own, also from a worker thread on cuda:1
    with torch.cuda.device(blocks.device) if blocks.is_cuda else nullcontext():
        _less_block_kernel[grid](
            blocks, means, weights, per_task, score,
            n_checkpoints, n_rows, dim, n_tasks,
            blocks.stride(0), blocks.stride(1), means.stride(0), means.stride(1), per_task.stride(0),
            eps,
            BLOCK_R=block_r, BLOCK_K=64, BLOCK_S=block_s,
        )
    return per_task, score


def score_block(blocks: torch.Tensor, means: torch.Tensor, weights: torch.Tensor,
                backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(checkpoint-weighted per-subtask mean cosines (rows, S), their max over subtasks (rows,)), fp32.

    ``blocks``: (checkpoints, rows, dim) stored features, any float dtype; ``means``: (checkpoints,
    S, dim) from :func:`subtask_means`; ``weights``: (checkpoints,) checkpoint weights.
    """
    return score_block_nonzero(blocks, means, weights, backend)[:2]


def score_block_nonzero(blocks: torch.Tensor | list[torch.Tensor], means: torch.Tensor, weights: torch.Tensor,
                        backend: str = "torch", columns: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`score_block` and, per row, whether it is non-zero at every checkpoint (a zero row has no direction:
    its cosines are undefined). ``blocks`` may also be one (rows, dim) tensor per checkpoint (no stacked copy);
    ``columns``: the torch path's :func:`padded_columns` of ``means``, where the caller has it."""
    if isinstance(blocks, (list, tuple)):
        if backend != "torch":
            blocks = torch.stack(list(blocks))
        elif means.ndim == 3 and len(blocks) == means.shape[0] == len(weights):
            return score_block_torch(blocks, means, weights, columns=columns)
    if blocks.ndim != 3 or means.ndim != 3 or not blocks.shape[0] == means.shape[0] == len(weights):
        raise ValueError(f"expected (C, rows, dim) blocks, (C, S, dim) means and (C,) weights, got "
                         f"{tuple(blocks.shape)}, {tuple(means.shape)}, {tuple(weights.shape)}")
    if backend == "triton":
        per_task, score = score_block_triton(blocks, means, weights)
        return per_task, score, (blocks != 0).any(dim=2).all(dim=0)
    if backend != "torch":
        raise ValueError(f"unknown scoring backend {backend!r}")
    return score_block_torch(blocks, means, weights, columns=columns)


class RunningTopK:
    """The ``k`` highest scores of a stream of blocks, with their row indices (memory O(k)).

    Non-finite scores never enter. Ties keep the earlier row first, as a stable sort of the whole
    pool would, so the result does not depend on the block size.
    """

    def __init__(self, k: int):
        if k < 1:
            raise ValueError("k must be positive")
        self.k = k
        self.values = torch.empty(0, dtype=torch.float32)
        self.indices = torch.empty(0, dtype=torch.int64)

    def update(self, scores: torch.Tensor, start: int) -> None:
        """Merge the scores of rows ``start .. start + len(scores) - 1``."""
        scores = scores.detach().float().cpu()
        keep = torch.isfinite(scores)
        block = RunningTopK(self.k)
        block.values, block.indices = scores[keep], torch.arange(start, start + len(scores))[keep]
        merged = self.merge(block)
        self.values, self.indices = merged.values, merged.indices

    def merge(self, later: RunningTopK) -> RunningTopK:
        """The top k of two streams, ``later`` covering rows after this one's (ties: earlier row first):
        the step of a tree reduction over neighbouring blocks."""
        merged = RunningTopK(self.k)
        values, indices = torch.cat([self.values, later.values]), torch.cat([self.indices, later.indices])
        order = torch.sort(values, descending=True, stable=True).indices[: self.k]
        merged.values, merged.indices = values[order], indices[order]
        return merged
