"""LESS on one process: the pool's stores streamed block by block (on a CPU, worker threads each read and score
whole blocks: :func:`...gradients.store.map_blocks`) through :func:`.core.score_rows`. Memory: one block of stored
rows per checkpoint per worker plus the (n, subtasks) float32 breakdown, or the running top k."""

from __future__ import annotations

import numpy as np

from ...kernels.scoring import RunningTopK
from .core import LessInputs, iter_scored_blocks


def per_task_stream(inputs: LessInputs, rows_per_block: int | None = None) -> np.ndarray:
    """The (pool, subtasks of every target) float32 breakdown (NaN rows: unscorable)."""
    per_task = np.zeros((inputs.train[0].n_examples, inputs.means.shape[1]), dtype=np.float32)
    for start, block_per_task, _ in iter_scored_blocks(inputs.train, inputs.means, inputs.weights, rows_per_block,
                                                       inputs.device, inputs.backend):
        per_task[start : start + len(block_per_task)] = block_per_task.cpu().numpy()
    return per_task


def top_k_stream(inputs: LessInputs, k: int, rows_per_block: int | None = None) -> RunningTopK:
    """The k best rows by score, kept while streaming (ties: earlier row first)."""
    top = RunningTopK(k)
    for start, _, block_score in iter_scored_blocks(inputs.train, inputs.means, inputs.weights, rows_per_block,
                                                    inputs.device, inputs.backend):
        top.update(block_score, start)
    return top
