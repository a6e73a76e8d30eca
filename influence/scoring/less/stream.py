"""LESS influence (Xia et al., 2024): cosine similarity of Adam-preconditioned training gradients to
target gradients, at every warm-up checkpoint.

For training example ``x``, checkpoint ``c`` with normalised mean learning rate ``w_c``
(``w_c = lr_c / sum lr``) and target subtask ``s``, in the order of LESS's ``matching.py`` (the
weighted sum of the train x target cosine matrices first, then the mean over each subtask's
examples, then the max over subtasks)::

    task_score(x, s) = mean_{t in s} sum_c w_c cos(g_c(x), g_c(t))
    score(x)         = max_s task_score(x, s)

Sign and scale: cosines lie in [-1, 1] and the weights sum to 1, so scores lie in [-1, 1]. Positive
means a gradient step on ``x`` points the same way as one on the target (a first-order estimate
that training on ``x`` lowers the target loss): higher = more helpful, rank 1 = most helpful.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ...core.naming import TRAIN
from ...gradients.store import check_compatible, find_target_dataset, open_checkpoint_stores, resolve_dim
from ...kernels.scoring import RunningTopK, unit_rows
from ...train.run import Run
from ..base import Attribution, Scores
from ..products import pairwise_products
from .core import iter_scored_blocks, load_less_inputs


def less_attribution(run_dir: str | Path, target: str, proj_dim: int | None = None,
                     target_tasks: list[str] | None = None, rows_per_block: int | None = None) -> Attribution:
    """LESS's effect of each pool example on each target example, before any aggregation:
    ``sum_c w_c cos(g_c(x), g_c(t))`` (what ``less`` averages per subtask and maximises over)."""
    run = Run(run_dir)
    dim = resolve_dim(run, proj_dim)
    train = open_checkpoint_stores(run, TRAIN, dim)
    stores = open_checkpoint_stores(run, find_target_dataset(run.store_path, dim, target, target_tasks), dim)
    check_compatible(train, stores)
    lrs = np.array([s.metadata["checkpoint_mean_lr"] for s in train], dtype=np.float64)
    units = [unit_rows(torch.from_numpy(store.array("grads"))) for store in stores]
    matrix, _ = pairwise_products(train, units, lrs / lrs.sum(), normalize=True, rows_per_block=rows_per_block)
    return Attribution("less", train[0].ids.tolist(), stores[0].ids.tolist(), stores[0].tasks.tolist(), matrix,
                       "LESS per target example: sum over checkpoints of w_c cos(g_c(x), g_c(t)), in [-1, 1]; "
                       "higher = more helpful",
                       {"checkpoints": [s.metadata["checkpoint"] for s in train],
                        "checkpoint_weights": (lrs / lrs.sum()).tolist()})


def less_scores_many(
    run_dir: str | Path,
    targets: list[str],
    rows_per_block: int | None = None,
    device: str | None = None,
    backend: str | None = None,
    proj_dim: int | None = None,
    target_tasks: list[str] | None = None,
    dask: str | None = None,
) -> list[Scores]:
    """LESS scores of the run's pool for several targets in one streamed pass over the pool's stores
    (with ``dask``, a LocalCluster (``"local"``) or a scheduler's address: the same computation as
    Dask tasks, one block each; see :mod:`.on_dask`).

    Memory: one block of stored rows per checkpoint plus the (n, subtasks) float32 breakdown.
    """
    if dask is not None:
        from .dask import dask_device

        device = dask_device(device)
    inputs = load_less_inputs(run_dir, targets, device, backend, proj_dim, target_tasks)
    train = inputs.train
    n = train[0].n_examples
    if dask is not None:
        from .dask import less_per_task_on_dask

        per_task = less_per_task_on_dask(inputs, dask, rows_per_block)
    else:
        per_task = np.zeros((n, inputs.means.shape[1]), dtype=np.float32)
        for start, block_per_task, _ in iter_scored_blocks(
            train, inputs.means, inputs.weights, rows_per_block, inputs.device, inputs.backend
        ):
            per_task[start : start + len(block_per_task)] = block_per_task.cpu().numpy()
    stored_finite = np.logical_and.reduce([s.array("finite") for s in train])
    zero = int((stored_finite & ~np.isfinite(per_task).all(axis=1)).sum())  # unscorable for a zero feature
    results = []
    for target in inputs.targets:
        columns = per_task[:, target.columns]
        score = columns.max(axis=1).astype(np.float64)  # NaN rows stay NaN
        results.append(Scores(
            method="less",
            ids=train[0].ids.tolist(),
            score=score,
            description=__doc__.strip().split("\n\n", 1)[1],
            per_task=columns,
            task_names=target.task_names,
            finite=np.isfinite(score),
            details={
                "target": target.target,
                "target_store": target.dataset,
                "checkpoints": [s.metadata["checkpoint"] for s in train],
                "checkpoint_weights": inputs.weights.tolist(),
                "projector": train[0].metadata["projector"],
                "feature": train[0].metadata["feature"],
                "n_target_examples": target.n_examples,
                "zero_gradient_examples": zero,
            },
        ))
    return results


def less_scores(run_dir: str | Path, target: str, rows_per_block: int | None = None, device: str | None = None,
                backend: str | None = None, proj_dim: int | None = None,
                target_tasks: list[str] | None = None, dask: str | None = None) -> Scores:
    """LESS scores of the run's pool for ``target`` (registry name or file), streamed block by block
    (on Dask with ``dask``: see :func:`less_scores_many`)."""
    return less_scores_many(run_dir, [target], rows_per_block, device, backend, proj_dim, target_tasks, dask)[0]


def less_top_k(
    run_dir: str | Path,
    target: str,
    k: int,
    rows_per_block: int | None = None,
    device: str | None = None,
    backend: str | None = None,
    proj_dim: int | None = None,
    dask: str | None = None,
) -> pd.DataFrame:
    """The ``k`` most helpful pool examples for ``target`` (columns rank, pool_index, id, score), found
    with a running top-k over the stream (with ``dask``: a tree reduction of the blocks' top k):
    memory independent of the pool size."""
    if dask is not None:
        from .dask import dask_device

        device = dask_device(device)
    inputs = load_less_inputs(run_dir, target, device, backend, proj_dim)
    if dask is not None:
        from .dask import less_top_k_on_dask

        top = less_top_k_on_dask(inputs, k, dask, rows_per_block)
    else:
        top = RunningTopK(k)
        for start, _, block_score in iter_scored_blocks(
            inputs.train, inputs.means, inputs.weights, rows_per_block, inputs.device, inputs.backend
        ):
            top.update(block_score, start)
    indices = top.indices.numpy()
    ids = inputs.train[0].group["ids"].get_orthogonal_selection(indices) if len(indices) else []
    return pd.DataFrame({
        "rank": np.arange(1, len(indices) + 1),
        "pool_index": indices,
        "id": [str(i) for i in ids],
        "score": top.values.double().numpy(),
    })
