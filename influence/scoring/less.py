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

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data import examples_sha256
from ..errors import InfluenceError, StoreMismatchError
from ..kernels.scoring import HAVE_TRITON, RunningTopK, score_block, subtask_means, unit_rows
from ..run import Checkpoint, Run
from ..store import TRAIN, ChunkedStore, GradientStore, check_metadata, grads_group, read_ahead, stored_dims
from ..targets import find_target_dataset
from .base import Attribution, Scores

# Fields every store of one ranking shares, and fields a train/target pair of a checkpoint shares.
SHARED_FIELDS = ("format", "format_version", "model", "projector", "dtype", "max_length")
PAIR_FIELDS = ("checkpoint", "adapter_sha256")


def resolve_dim(run: Run, proj_dim: int | None = None, any_dim: bool = False) -> int:
    """The projected dimension to read: ``proj_dim``, or the only one the run has (the smallest when
    ``any_dim``: for readers of columns that every dimension's store holds alike, e.g. norms)."""
    dims = stored_dims(run.store_path)
    if proj_dim is not None:
        if proj_dim not in dims:
            raise InfluenceError(f"{run.store_path}: no gradients projected to {proj_dim} dimensions "
                                 f"(available: {', '.join(map(str, dims)) or 'none'}); run `influence project-grads`")
        return proj_dim
    if not dims:
        raise InfluenceError(f"{run.store_path}: no gradient stores; run `influence project-grads` first")
    if len(dims) > 1 and not any_dim:
        raise InfluenceError(f"{run.store_path} has gradients of several dimensions ({', '.join(map(str, dims))}); "
                             "choose one with --proj-dim")
    return dims[0]


def open_checkpoint_stores(run: Run, dataset: str, dim: int) -> list[GradientStore]:
    """The complete stores of ``dataset`` at every current checkpoint of the run, each checked to
    have been computed from the run's model and that checkpoint's adapter as they are now (and, for
    the pool, from its current content)."""
    stores = []
    for checkpoint in run.checkpoints():
        try:
            store = GradientStore.open(run.store_path, grads_group(dim, dataset, checkpoint.name))
        except InfluenceError as err:
            raise InfluenceError(f"{err} (checkpoint {checkpoint.name}, dataset {dataset})") from None
        store.require_complete()
        check_current(run, checkpoint, store)
        stores.append(store)
    if dataset.split(".")[0] == TRAIN:
        expected = {"examples_sha256": examples_sha256(run.pool())}
        check_metadata(stores[0].metadata, expected, stores[0].where + " (the pool changed since)", ("examples_sha256",))
    return stores


def check_current(run: Run, checkpoint: Checkpoint, store: ChunkedStore) -> None:
    """Refuse a store made from another model or another version of this checkpoint's adapter."""
    expected = {"checkpoint": checkpoint.name, "adapter_sha256": checkpoint.adapter_sha256(),
                "model": run.manifest.get("model_fingerprint")}
    check_metadata(store.metadata, expected, store.where + " (made from another model or adapter than the run's "
                   "current one; recompute it with --overwrite)", ("checkpoint", "adapter_sha256", "model"))


def check_compatible(train: list[GradientStore], targets: list[GradientStore], train_type: str = "adam",
                     target_type: str = "sgd") -> None:
    """Refuse to combine stores that differ in model, projector, dimension, checkpoint or examples,
    or whose features are not of the types the method reads."""
    reference = train[0].metadata
    for store in train + targets:
        check_metadata(store.metadata, reference, store.where, SHARED_FIELDS)
    for group in (train, targets):
        for store in group[1:]:
            check_metadata(store.metadata, group[0].metadata, store.where, ("examples_sha256", "chunk_size"))
    for train_store, target_store in zip(train, targets):
        check_metadata(target_store.metadata, train_store.metadata, target_store.where, PAIR_FIELDS)
    for group, expected in ((train, train_type), (targets, target_type)):
        for store in group:
            if store.metadata["gradient_type"] != expected:
                raise StoreMismatchError("gradient_type", expected, store.metadata["gradient_type"], store.where)


def default_backend(device: torch.device) -> str:
    """The fused Triton kernel on CUDA, the torch path elsewhere (override: INFLUENCE_SCORER)."""
    return os.environ.get("INFLUENCE_SCORER") or ("triton" if device.type == "cuda" and HAVE_TRITON else "torch")


@dataclass
class TargetMeans:
    """One target's per-checkpoint subtask means, and where its columns sit in a concatenation."""

    target: str
    dataset: str
    task_names: list[str]
    n_examples: int
    columns: slice


@dataclass
class LessInputs:
    """Everything LESS scoring reads: the pool's stores per checkpoint, their weights and, for every
    target, the per-checkpoint subtask means of its unit-normalised gradients (checked compatible),
    concatenated along the subtask axis so that one pass over the pool scores every target."""

    train: list[GradientStore]
    weights: np.ndarray  # (checkpoints,), normalised mean learning rates
    means: torch.Tensor  # (checkpoints, subtasks of all targets, dim)
    targets: list[TargetMeans]
    dim: int
    device: torch.device
    backend: str


def load_less_inputs(run_dir: str | Path, targets: str | list[str], device: str | None = None,
                     backend: str | None = None, proj_dim: int | None = None,
                     target_tasks: list[str] | None = None) -> LessInputs:
    run = Run(run_dir)
    dim = resolve_dim(run, proj_dim)
    train = open_checkpoint_stores(run, TRAIN, dim)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lrs = np.array([s.metadata["checkpoint_mean_lr"] for s in train], dtype=np.float64)
    if lrs.sum() <= 0:
        raise InfluenceError("checkpoint learning rates sum to zero; cannot weight checkpoints")
    means, described, start = [], [], 0
    for target in [targets] if isinstance(targets, str) else targets:
        dataset = find_target_dataset(run.store_path, dim, target, target_tasks)
        stores = open_checkpoint_stores(run, dataset, dim)
        check_compatible(train, stores)
        task_names = sorted(set(stores[0].tasks.tolist()))
        task_index = torch.tensor([task_names.index(t) for t in stores[0].tasks.tolist()], device=device)
        means.append(torch.stack([
            subtask_means(torch.from_numpy(store.array("grads")).to(device), task_index, len(task_names))
            for store in stores
        ]))
        described.append(TargetMeans(target, dataset, task_names, stores[0].n_examples,
                                     slice(start, start + len(task_names))))
        start += len(task_names)
    return LessInputs(train, lrs / lrs.sum(), torch.cat(means, dim=1), described, dim, device,
                      backend or default_backend(device))


def iter_scored_blocks(
    train: list[GradientStore], means: torch.Tensor, weights, rows_per_block: int | None = None,
    device: torch.device | str = "cpu", backend: str = "torch",
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(start, per_task, score) for consecutive blocks of the pool, reading each block's rows from
    every checkpoint's store and scoring them in one :func:`score_block` call (memory: one block per
    checkpoint). Rows flagged non-finite in any store get a NaN score."""
    weights = torch.as_tensor(np.asarray(weights, dtype=np.float32), device=device)
    for start, blocks, finite in read_ahead(_stacked_blocks(train, rows_per_block)):
        yield (start, *score_rows(torch.from_numpy(blocks).to(device), torch.from_numpy(finite).to(device), means,
                                  weights, backend))


def _stacked_blocks(train: list[GradientStore], rows_per_block: int | None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, rows of every checkpoint's store stacked, their finite flags stacked), block by block."""
    readers = [store.iter_chunks(rows_per_block) for store in train]
    finite_readers = [store.iter_chunks(rows_per_block, column="finite") for store in train]
    for chunks, finite_chunks in zip(zip(*readers), zip(*finite_readers)):
        yield (chunks[0][0], np.stack([block for _, block in chunks]),
               np.stack([flags for _, flags in finite_chunks]))


def score_rows(blocks: torch.Tensor, finite: torch.Tensor, means: torch.Tensor, weights: torch.Tensor,
               backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(per_task, score) of one block of pool rows: ``blocks`` (checkpoints, rows, dim) as stored,
    ``finite`` (checkpoints, rows) the stores' flags. A row flagged in any store, or whose feature is
    zero at a checkpoint (no direction: its cosines are undefined), is unscorable: NaN. The one
    function every scoring path (the stream, Dask) applies to a block."""
    per_task, score = score_block(blocks, means, weights, backend)
    usable = finite.all(dim=0) & (blocks != 0).any(dim=2).all(dim=0)
    return per_task.masked_fill(~usable[:, None], float("nan")), score.masked_fill(~usable, float("nan"))


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
        from .on_dask import dask_device

        device = dask_device(device)
    inputs = load_less_inputs(run_dir, targets, device, backend, proj_dim, target_tasks)
    train = inputs.train
    n = train[0].n_examples
    if dask is not None:
        from .on_dask import less_per_task_on_dask

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
        from .on_dask import dask_device

        device = dask_device(device)
    inputs = load_less_inputs(run_dir, target, device, backend, proj_dim)
    if dask is not None:
        from .on_dask import less_top_k_on_dask

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
