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
from pathlib import Path

import numpy as np
import torch

from ..collect import TRAIN, target_dataset
from ..errors import InfluenceError, StoreMismatchError
from ..kernels.scoring import HAVE_TRITON, score_block, subtask_means
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


def less_scores(
    run_dir: str | Path,
    target: str,
    rows_per_block: int | None = None,
    device: str | None = None,
    backend: str | None = None,
) -> Scores:
    """LESS scores of the run's pool for ``target`` (registry name or file), streamed block by block.

    Memory: one block of stored rows plus the (n, n_subtasks) float32 breakdown.
    """
    run = Run(run_dir)
    train = open_checkpoint_stores(run, TRAIN)
    targets = open_checkpoint_stores(run, target_dataset(target))
    check_compatible(train, targets)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = backend or default_backend(device)

    lrs = np.array([s.metadata["checkpoint_mean_lr"] for s in train], dtype=np.float64)
    if lrs.sum() <= 0:
        raise InfluenceError("checkpoint learning rates sum to zero; cannot weight checkpoints")
    weights = lrs / lrs.sum()

    task_names = sorted(set(targets[0].tasks.tolist()))
    task_index = torch.tensor([task_names.index(t) for t in targets[0].tasks.tolist()], device=device)
    means = []
    for store in targets:
        target_grads = torch.from_numpy(store.array("grads")).to(device)
        means.append(subtask_means(target_grads, task_index, len(task_names)))

    n = train[0].n_examples
    score = np.zeros(n, dtype=np.float64)
    per_task = np.zeros((n, len(task_names)), dtype=np.float32)
    finite = np.ones(n, dtype=bool)
    for store, weight, mean in zip(train, weights, means):
        finite &= store.array("finite")
        for start, block in store.iter_chunks(rows_per_block):
            cos, best = score_block(torch.from_numpy(block).to(device), mean, backend)
            stop = start + len(block)
            per_task[start:stop] += weight * cos.cpu().numpy()
            score[start:stop] += weight * best.double().cpu().numpy()
    score[~finite] = np.nan
    return Scores(
        method="less",
        ids=train[0].ids.tolist(),
        score=score,
        description=__doc__.strip().split("\n\n", 1)[1],
        per_task=per_task,
        task_names=task_names,
        finite=finite,
        details={
            "target": target,
            "checkpoints": [s.metadata["checkpoint"] for s in train],
            "checkpoint_weights": weights.tolist(),
            "projector": train[0].metadata["projector"],
            "n_target_examples": targets[0].n_examples,
        },
    )
