"""Where things live in a run's stores: group names of gradient stores, dataset names of the pool and the targets."""

from __future__ import annotations

from typing import Literal, get_args

TRAIN = "train"


POOL = "pool"


def grads_group(dim: int, dataset: str, checkpoint: str) -> str:
    """Where the gradient store of (projected dimension, dataset, checkpoint) lives in ``grads.zarr``."""
    return f"dim{dim}/{dataset}/{checkpoint}"


GradientType = Literal["adam", "sgd", "margin", "ekfac", "kfac"]  # the features a gradient store can hold
GRADIENT_TYPES: tuple[str, ...] = get_args(GradientType)


def gradient_dataset(dataset: str, gradient_type: str) -> str:
    """Where a dataset's stores of one gradient type live: the pool's Adam features under ``train`` and
    a target's plain gradients under its own name (what LESS reads), any other type under
    ``<dataset>.<type>`` (``train.sgd`` for TracIn, ``train.margin`` and ``target-....margin`` for TRAK)."""
    default = "adam" if dataset == TRAIN else "sgd"
    return dataset if gradient_type == default else f"{dataset}.{gradient_type}"


def target_dataset(name: str, examples_sha256: str) -> str:
    """Dataset name of a target: its short name plus a hash of its content (examples, tasks, ids)."""
    return f"target-{name}-{examples_sha256[:12]}"
