"""The gradient stores: :class:`GradientStore` (the chunked store's gradient layout), what is stored, and the
checked readers every gradient method uses (the stores of every checkpoint, compatible and current)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..core.chunks import PARTIAL, ChunkedStore, check_metadata, has_store
from ..core.naming import TRAIN, gradient_dataset, grads_group, target_dataset
from ..core.storage import StoreRoot, as_root
from ..core.threads import map_in_order, torch_threads
from ..data.formats import Example, examples_sha256
from ..data.targets import load_target, target_name
from ..errors import InfluenceError, StoreMismatchError
from ..train.run import Checkpoint, Run

FORMAT = "influence-grads"
CPU_WORKERS = 4  # blocks worked on at once on a CPU: enough to overlap reading and products, few enough for memory
R = TypeVar("R")


# 2: LESS's Adam feature m'/sqrt(v'+eps) (version 1 stored m'/(sqrt(v')+eps)); stores keyed by dimension
# and target content. Stores of another version are refused on every read, never mixed.
FORMAT_VERSION = 2


# Fields a gradient store's metadata must have; all of them must match for reuse or combination.
METADATA_FIELDS = (
    "format",
    "format_version",
    "model",
    "checkpoint",
    "adapter_sha256",
    "gradient_type",
    "feature",
    "projector",
    "dtype",
    "dataset",
    "n_examples",
    "examples_sha256",
    "max_length",
    "chunk_size",
)


class GradientStore(ChunkedStore):
    """Projected gradient features: ``grads`` (fp16), ``norms``, ``loss``, ``n_tokens``."""

    required_fields = METADATA_FIELDS

    @classmethod
    def open(cls, root, path):
        """Open for reading; a store of another format version is refused with what to do."""
        store = super().open(root, path)
        found = store.metadata.get("format_version")
        if store.metadata.get("format") != FORMAT or found != FORMAT_VERSION:
            raise StoreMismatchError(
                "format_version", FORMAT_VERSION, found,
                f"{store.where} (written by an older influence with another gradient feature; "
                "recompute with `influence project-grads --overwrite`)",
            )
        return store

    @classmethod
    def open_or_create(cls, root, path, metadata, ids, tasks, overwrite=False, checksums=True):
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
        columns = {
            "grads": ((metadata["projector"]["output_dim"],), "float16"),
            "norms": ((), "float32"),
            "loss": ((), "float32"),
            "n_tokens": ((), "int32"),
        }
        if metadata["gradient_type"] == "margin":
            columns["out_to_loss"] = ((), "float32")  # TRAK's Q: mean of 1 - p over the response tokens
        return super().open_or_create(root, path, metadata, ids, tasks, columns, overwrite, checksums)

    def write_chunk(self, index: int, grads: np.ndarray, norms: np.ndarray, loss: np.ndarray, n_tokens: np.ndarray,
                    out_to_loss: np.ndarray | None = None) -> np.ndarray:
        extra = {} if out_to_loss is None else {"out_to_loss": out_to_loss}
        return self.write_columns(index, grads=grads, norms=norms, loss=loss, n_tokens=n_tokens, **extra)


def stored_dims(root: StoreRoot | str | Path) -> list[int]:
    """Projected dimensions that have gradient stores under ``root``. A store of the version-1
    layout (``<dataset>/<checkpoint>`` at the top) is refused: its feature is not LESS's."""
    root = as_root(root)
    folders = root.children()
    legacy = [name for name in folders if name == TRAIN or name.startswith("target-")]
    if legacy:
        raise StoreMismatchError(
            "format_version", FORMAT_VERSION, 1,
            f"{root}/{legacy[0]} (written by an older influence with another Adam feature; "
            f"delete {root} or recompute with `influence project-grads --overwrite`)",
        )
    return sorted(int(name[3:]) for name in folders if name.startswith("dim") and name[3:].isdigit())


def stored_datasets(root: StoreRoot | str | Path, dim: int, prefix: str = "", gradient_type: str | None = None) -> list[str]:
    """Datasets with at least one gradient store of dimension ``dim`` whose name starts with ``prefix``
    (with ``gradient_type``: only the stores of that type, see :func:`gradient_dataset`)."""
    names = [name for name in as_root(root).children(f"dim{dim}") if name.startswith(prefix) and PARTIAL not in name]
    if gradient_type is None:
        return names
    default = gradient_type in ("adam", "sgd")
    return [n for n in names if ("." not in n if default else n.endswith("." + gradient_type))]


def target_store_name(target: str, tasks: list[str] | None = None) -> str:
    """The dataset name under which ``project-grads`` stores this target's gradients: name + content hash."""
    return target_dataset(target_name(target), examples_sha256(load_target(target, tasks)))


def find_target_dataset(root: str | Path, dim: int, target: str, tasks: list[str] | None = None,
                        gradient_type: str = "sgd") -> str:
    """The stored dataset holding exactly the current content of ``target`` (restricted to ``tasks``),
    for gradients of ``gradient_type`` (plain ``sgd`` for LESS and TracIn, ``margin`` for TRAK).

    Without ``tasks``, a store made with ``project-grads --target-tasks`` is found as long as the
    target's current content restricted to the stored subtasks is what was stored. A target file that
    changed since ``project-grads`` (or another file with the same name) is refused, never scored
    against another file's gradients.
    """
    name = target_name(target)
    full = load_target(target)
    stored = stored_datasets(root, dim, prefix=f"target-{name}-", gradient_type=gradient_type)

    def key(examples: list[Example]) -> str:
        return gradient_dataset(target_dataset(name, examples_sha256(examples)), gradient_type)

    if tasks:
        wanted = key(load_target(target, tasks))
        if wanted in stored:
            return wanted
    else:
        wanted = key(full)
        if wanted in stored:
            return wanted
        matches = []
        for dataset in stored:
            stored_tasks = stored_target_tasks(root, dim, dataset)
            subset = [e for e in full if stored_tasks is None or e.task in stored_tasks]
            if subset and key(subset) == dataset:
                matches.append((dataset, stored_tasks))
        if len(matches) == 1:
            return matches[0][0]
        if len(matches) > 1:
            options = "; ".join(",".join(t or ["all"]) for _, t in matches)
            raise InfluenceError(f"target '{target}' has gradients for several subtask sets ({options}); "
                                 "choose one with --target-tasks")
    if stored:
        raise InfluenceError(
            f"target '{target}' changed since its gradients were computed (or another file named "
            f"'{name}' was used): no stored gradients match its current content; run "
            f"`influence project-grads --target {target}` again"
        )
    hint = "" if gradient_type == "sgd" else " --train-gradient " + gradient_type
    raise InfluenceError(f"no {gradient_type} gradients of dimension {dim} for target '{target}'; run "
                         f"`influence project-grads --target {target}{hint}` first")


def stored_target_tasks(root, dim: int, dataset: str) -> list[str] | None:
    root = as_root(root)
    for checkpoint in [c for c in root.children(f"dim{dim}/{dataset}") if root.has_group(grads_group(dim, dataset, c))]:
        return GradientStore.open(root, grads_group(dim, dataset, checkpoint)).metadata.get("target_tasks")
    return None


# Fields every store of one ranking shares, and fields a train/target pair of a checkpoint shares.
SHARED_FIELDS = ("format", "format_version", "model", "projector", "dtype", "max_length")


PAIR_FIELDS = ("checkpoint", "adapter_sha256")


def resolve_dim(run: Run, proj_dim: int | None = None, any_dim: bool = False) -> int:
    """The projected dimension to read: ``proj_dim``, or the only one whose pool stores are complete at every
    checkpoint (the smallest when ``any_dim``: for readers of columns that every dimension's store holds alike,
    e.g. norms). A dimension left unfinished never blocks the complete ones."""
    dims = stored_dims(run.store_path)
    if proj_dim is not None:
        if proj_dim not in dims:
            raise InfluenceError(f"{run.store_path}: no gradients projected to {proj_dim} dimensions "
                                 f"(available: {', '.join(map(str, dims)) or 'none'}); run `influence project-grads`")
        return proj_dim
    if not dims:
        raise InfluenceError(f"{run.store_path}: no gradient stores; run `influence project-grads` first")
    complete = [d for d in dims if _pool_complete(run, d)] or dims
    if len(complete) > 1 and not any_dim:
        raise InfluenceError(f"{run.store_path} has gradients of several dimensions ({', '.join(map(str, complete))}); "
                             "choose one with --proj-dim")
    return complete[0]


def _pool_complete(run: Run, dim: int) -> bool:
    """Whether the pool's stores of a dimension (of any feature) are complete at every checkpoint."""
    for dataset in stored_datasets(run.store_path, dim, TRAIN):
        paths = [grads_group(dim, dataset, c.name) for c in run.checkpoints()]
        if all(has_store(run.store_path, p) and ChunkedStore.open(run.store_path, p).complete for p in paths):
            return True
    return False


def open_checkpoint_stores(run: Run, dataset: str, dim: int, last_only: bool = False) -> list[GradientStore]:
    """The complete stores of ``dataset`` at every current checkpoint of the run (or the last one only), each checked
    to have been computed from the run's model and that checkpoint's adapter as they are now (and, for the pool, from
    its current content)."""
    stores = []
    for checkpoint in run.checkpoints()[-1:] if last_only else run.checkpoints():
        try:
            store = GradientStore.open(run.store_path, grads_group(dim, dataset, checkpoint.name))
        except InfluenceError as err:
            raise InfluenceError(f"{err} (checkpoint {checkpoint.name}, dataset {dataset})") from None
        store.require_complete()
        check_current(run, checkpoint, store)
        stores.append(store)
    if dataset.split(".")[0] == TRAIN:
        expected = {"examples_sha256": run.pool_sha256}
        check_metadata(stores[0].metadata, expected, stores[0].where + " (the pool changed since)", ("examples_sha256",))
    return stores


def check_current(run: Run, checkpoint: Checkpoint, store: ChunkedStore) -> None:
    """Refuse a store of another run, or made from another model or another version of this checkpoint's adapter."""
    run.owns(store.metadata.get("run_id"), store.where)
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


def map_blocks(stores: list[GradientStore], work: Callable[[int, list[np.ndarray], np.ndarray], R],
               rows_per_block: int | None = None, parallel: bool = True, workers: int | None = None) -> Iterator[R]:
    """``work(start, blocks, finite)`` for consecutive blocks of the pool, results in the pool's order: ``blocks``
    the block's rows in every checkpoint's store (valid during the call only: a worker reads its next block into
    the same arrays), ``finite`` their stores' flags (checkpoints x rows). The one block loop of the scoring
    methods that stream the stores.

    ``parallel`` (a CPU running torch's kernels): ``workers`` threads (default one per core, at most
    :data:`CPU_WORKERS`) each read and work on whole blocks with their share of torch's threads (the caller's torch
    ops run with that share too until the loop ends), so a block's read (one core) overlaps the others' products
    instead of stalling torch's thread team (LESS at 150k x 8192 on two cores: 1.4 -> 1.0 s). Otherwise one thread reads and works, a
    block ahead of the caller (a GPU's kernels run asynchronously; Triton's JIT wants one thread). Memory: one
    block per store per worker."""
    rows, n = rows_per_block or stores[0].chunk_size, stores[0].n_examples
    for store in stores:
        store.require_complete()
    buffers = threading.local()  # each worker's blocks, refilled: fresh memory per block costs page faults

    def read_and_work(start: int) -> R:
        stop = min(start + rows, n)
        spare = getattr(buffers, "blocks", [None] * len(stores))
        blocks = buffers.blocks = [store.read("grads", start, stop, out=old) for store, old in zip(stores, spare)]
        return work(start, blocks, np.stack([store.read("finite", start, stop) for store in stores]))

    if not parallel:
        yield from map_in_order(read_and_work, range(0, n, rows), workers or 1)
        return
    import torch

    cores = torch.get_num_threads()
    workers = workers or min(cores, CPU_WORKERS)
    # Set in the caller's thread, whose threads the workers start with; left idle there, its thread team would
    # spin beside them (8% slower). Restored when the loop ends or the generator is closed.
    with torch_threads(-(-cores // workers)):
        yield from map_in_order(read_and_work, range(0, n, rows), workers)
