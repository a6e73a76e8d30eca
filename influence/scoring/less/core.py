"""LESS's scoring core, shared by every backend: the inputs it reads (the pool's checked stores per checkpoint, their
learning-rate weights, each target's per-checkpoint subtask means of unit-normalised gradients) and
:func:`score_rows`, the one function the stream (:mod:`.stream`) and Dask (:mod:`.dask`) apply to a block of pool
rows. Imports no backend."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...core.naming import TRAIN
from ...errors import InfluenceError
from ...gradients.store import GradientStore, check_compatible, find_target_dataset, map_blocks, open_checkpoint_stores, resolve_dim
from ...kernels.scoring import HAVE_TRITON, padded_columns, score_block_nonzero, subtask_means
from ...train.run import Run


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


def load_less_inputs(run: Run | str | Path, targets: str | list[str], device: str | None = None,
                     backend: str | None = None, proj_dim: int | None = None,
                     target_tasks: list[str] | None = None) -> LessInputs:
    """What LESS scoring reads for ``targets`` (checked compatible with the pool's stores), on ``device``."""
    run = run if isinstance(run, Run) else Run(run)
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
        names, index = np.unique(stores[0].tasks.tolist(), return_inverse=True)
        task_names, task_index = names.tolist(), torch.from_numpy(index).to(device)
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
    device: torch.device | str = "cpu", backend: str = "torch", workers: int | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(start, per_task, score) for consecutive blocks of the pool, each block's rows from every checkpoint's store
    scored in one :func:`score_rows` call, by :func:`map_blocks`'s workers. Rows flagged non-finite in any store
    get a NaN score."""
    device = torch.device(device)
    weights = torch.as_tensor(np.asarray(weights, dtype=np.float32), device=device)
    columns = padded_columns(means) if backend == "torch" else None  # once for the stream, not once per block

    def score(start: int, blocks: list[np.ndarray], finite: np.ndarray) -> tuple[int, torch.Tensor, torch.Tensor]:
        return (start, *score_rows([torch.from_numpy(block).to(device) for block in blocks],
                                   torch.from_numpy(finite).to(device), means, weights, backend, columns))

    yield from map_blocks(train, score, rows_per_block, parallel=device.type == "cpu" and backend == "torch",
                          workers=workers)


def score_rows(blocks: torch.Tensor | list[torch.Tensor], finite: torch.Tensor, means: torch.Tensor, weights: torch.Tensor,
               backend: str = "torch", columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per_task, score) of one block of pool rows: ``blocks`` (checkpoints, rows, dim) as stored (or one (rows, dim)
    tensor per checkpoint),
    ``finite`` (checkpoints, rows) the stores' flags. A row flagged in any store, or whose feature is
    zero at a checkpoint (no direction: its cosines are undefined), is unscorable: NaN. The one
    function every scoring path (the stream, Dask) applies to a block (``columns``: the torch path's
    :func:`padded_columns` of ``means``, computed once by a caller that scores many blocks)."""
    per_task, score, nonzero = score_block_nonzero(blocks, means, weights, backend, columns)
    usable = finite.all(dim=0) & nonzero
    return per_task.masked_fill(~usable[:, None], float("nan")), score.masked_fill(~usable, float("nan"))
