"""LESS influence (Xia et al., 2024): cosine similarity of Adam-preconditioned training gradients to
target gradients, at every warm-up checkpoint.

For training example ``x`` and checkpoint ``c`` with normalised mean learning rate ``w_c``
(``w_c = lr_c / sum lr``)::

    task_score(x, s) = sum_c w_c * mean_{t in subtask s} cos(g_c(x), g_c(t))
    score(x)         = sum_c w_c * max_s mean_{t in s} cos(g_c(x), g_c(t))

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

from ..collect import TRAIN, target_dataset
from ..errors import InfluenceError, StoreMismatchError
from ..kernels.scoring import HAVE_TRITON, RunningTopK, score_block, subtask_means
from ..run import Run
from ..store import GradientStore, check_metadata
from .base import Scores

# Fields every store of one ranking shares, and fields a train/target pair of a checkpoint shares.
SHARED_FIELDS = ("format", "format_version", "model", "projector", "dtype", "max_length")
PAIR_FIELDS = ("checkpoint", "adapter_sha256")


def open_checkpoint_stores(run: Run, dataset: str) -> list[GradientStore]:
    stores = []
    for checkpoint in run.checkpoints():
        try:
            stores.append(GradientStore.open(run.store_path, f"{dataset}/{checkpoint.name}"))
        except InfluenceError as err:
            raise InfluenceError(f"{err} (checkpoint {checkpoint.name}, dataset {dataset})") from None
    return stores


def check_compatible(train: list[GradientStore], targets: list[GradientStore]) -> None:
    """Refuse to combine stores that differ in model, projector, dimension, checkpoint or examples."""
    reference = train[0].metadata
    for store in train + targets:
        check_metadata(store.metadata, reference, store.where, SHARED_FIELDS)
    for group in (train, targets):
        for store in group[1:]:
            check_metadata(store.metadata, group[0].metadata, store.where, ("examples_sha256", "chunk_size"))
    for train_store, target_store in zip(train, targets):
        check_metadata(target_store.metadata, train_store.metadata, target_store.where, PAIR_FIELDS)
    for store in train:
        if store.metadata["gradient_type"] != "adam":
            raise StoreMismatchError("gradient_type", "adam", store.metadata["gradient_type"], store.where)
    for store in targets:
        if store.metadata["gradient_type"] != "sgd":
            raise StoreMismatchError("gradient_type", "sgd", store.metadata["gradient_type"], store.where)


def default_backend(device: torch.device) -> str:
    """The fused Triton kernel on CUDA, the torch path elsewhere (override: INFLUENCE_SCORER)."""
    return os.environ.get("INFLUENCE_SCORER") or ("triton" if device.type == "cuda" and HAVE_TRITON else "torch")


@dataclass
class LessInputs:
    """Everything LESS scoring reads: the pool's stores per checkpoint, their weights and the
    per-checkpoint subtask means of the target's unit-normalised gradients (checked compatible)."""

    train: list[GradientStore]
    weights: np.ndarray  # (checkpoints,), normalised mean learning rates
    means: torch.Tensor  # (checkpoints, subtasks, dim)
    task_names: list[str]
    n_target_examples: int
    device: torch.device
    backend: str


def load_less_inputs(run_dir: str | Path, target: str, device: str | None = None, backend: str | None = None) -> LessInputs:
    run = Run(run_dir)
    train = open_checkpoint_stores(run, TRAIN)
    targets = open_checkpoint_stores(run, target_dataset(target))
    check_compatible(train, targets)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lrs = np.array([s.metadata["checkpoint_mean_lr"] for s in train], dtype=np.float64)
    if lrs.sum() <= 0:
        raise InfluenceError("checkpoint learning rates sum to zero; cannot weight checkpoints")
    task_names = sorted(set(targets[0].tasks.tolist()))
    task_index = torch.tensor([task_names.index(t) for t in targets[0].tasks.tolist()], device=device)
    means = torch.stack([
        subtask_means(torch.from_numpy(store.array("grads")).to(device), task_index, len(task_names)) for store in targets
    ])
    return LessInputs(train, lrs / lrs.sum(), means, task_names, targets[0].n_examples, device,
                      backend or default_backend(device))


def iter_scored_blocks(
    train: list[GradientStore], means: torch.Tensor, weights, rows_per_block: int | None = None,
    device: torch.device | str = "cpu", backend: str = "torch",
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(start, per_task, score) for consecutive blocks of the pool, reading each block's rows from
    every checkpoint's store and scoring them in one :func:`score_block` call (memory: one block per
    checkpoint). Rows flagged non-finite in any store get a NaN score."""
    weights = torch.as_tensor(np.asarray(weights, dtype=np.float32), device=device)
    readers = [store.iter_chunks(rows_per_block) for store in train]
    finite_readers = [store.iter_chunks(rows_per_block, column="finite") for store in train]
    for chunks, finite_chunks in zip(zip(*readers), zip(*finite_readers)):
        start = chunks[0][0]
        blocks = torch.from_numpy(np.stack([block for _, block in chunks])).to(device)
        per_task, score = score_block(blocks, means, weights, backend)
        finite = torch.from_numpy(np.logical_and.reduce([flags for _, flags in finite_chunks])).to(device)
        yield start, per_task, score.masked_fill(~finite, float("nan"))


def less_scores(
    run_dir: str | Path,
    target: str,
    rows_per_block: int | None = None,
    device: str | None = None,
    backend: str | None = None,
) -> Scores:
    """LESS scores of the run's pool for ``target`` (registry name or file), streamed block by block.

    Memory: one block of stored rows per checkpoint plus the (n, n_subtasks) float32 breakdown.
    """
    inputs = load_less_inputs(run_dir, target, device, backend)
    train = inputs.train
    n = train[0].n_examples
    score = np.zeros(n, dtype=np.float64)
    per_task = np.zeros((n, len(inputs.task_names)), dtype=np.float32)
    for start, block_per_task, block_score in iter_scored_blocks(
        train, inputs.means, inputs.weights, rows_per_block, inputs.device, inputs.backend
    ):
        per_task[start : start + len(block_score)] = block_per_task.cpu().numpy()
        score[start : start + len(block_score)] = block_score.cpu().numpy()
    return Scores(
        method="less",
        ids=train[0].ids.tolist(),
        score=score,
        description=__doc__.strip().split("\n\n", 1)[1],
        per_task=per_task,
        task_names=inputs.task_names,
        finite=np.isfinite(score),
        details={
            "target": target,
            "checkpoints": [s.metadata["checkpoint"] for s in train],
            "checkpoint_weights": inputs.weights.tolist(),
            "projector": train[0].metadata["projector"],
            "n_target_examples": inputs.n_target_examples,
        },
    )


def less_top_k(
    run_dir: str | Path,
    target: str,
    k: int,
    rows_per_block: int | None = None,
    device: str | None = None,
    backend: str | None = None,
) -> pd.DataFrame:
    """The ``k`` most helpful pool examples for ``target`` (columns rank, index, id, score), found
    with a running top-k over the stream: memory independent of the pool size."""
    inputs = load_less_inputs(run_dir, target, device, backend)
    top = RunningTopK(k)
    for start, _, block_score in iter_scored_blocks(
        inputs.train, inputs.means, inputs.weights, rows_per_block, inputs.device, inputs.backend
    ):
        top.update(block_score, start)
    indices = top.indices.numpy()
    ids = inputs.train[0].group["ids"].get_orthogonal_selection(indices) if len(indices) else []
    return pd.DataFrame({
        "rank": np.arange(1, len(indices) + 1),
        "index": indices,
        "id": [str(i) for i in ids],
        "score": top.values.double().numpy(),
    })
