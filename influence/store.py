"""The one store format: a Zarr (v3) group per (dataset, checkpoint), filled chunk by chunk.

:class:`ChunkedStore` holds per-example columns, ids, subtask labels, a per-chunk ``done`` flag and
metadata; :class:`GradientStore` is its gradient layout, and per-example forward scores
(:mod:`influence.scoring.forward`) use the same class with their own columns.

Inside ``runs/x/grads.zarr``, group ``dim<D>/<dataset>/<checkpoint>`` (``D`` the projected dimension;
dataset ``train``, or ``target-<name>-<content hash>`` so that two target files with one name never
share a store) holds:

* ``grads``   (n, proj_dim) float16, chunked along examples: projected gradient features;
* ``norms``   (n,) float32: L2 norm of the full, unprojected plain loss gradient (GraNd);
* ``loss``    (n,) float32: mean response-token loss at the checkpoint;
* ``n_tokens``(n,) int32: response tokens that entered the loss;
* ``finite``  (n,) bool: false where the gradient had NaN/inf (its row is stored as NaN);
* ``ids``, ``tasks`` (n,) strings: example ids and subtask labels;
* ``done``    (n_chunks,) bool: chunks completely written (resume skips them);

and attributes that say how the numbers were made (``METADATA_FIELDS``). Reopening a store with
different metadata raises :class:`StoreMismatchError` naming the field, so results from another model,
checkpoint, projection seed or dimension are never mixed in. A chunk is marked done only after its
data is written, so an interrupted run resumes at the first unfinished chunk and ends identical to an
uninterrupted one.
"""

from __future__ import annotations

import fcntl
import functools
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import zarr
from filelock import FileLock

from .errors import InfluenceError, StoreMismatchError
from .storage import StoreRoot, as_root

FORMAT = "influence-grads"
# 2: LESS's Adam feature m'/sqrt(v'+eps) (version 1 stored m'/(sqrt(v')+eps)); stores keyed by dimension
# and target content. Stores of another version are refused on every read, never mixed.
FORMAT_VERSION = 2
TRAIN = "train"
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
# Recorded for information only; never a reason to refuse a store.
INFORMATIONAL_FIELDS = ("influence_version", "checkpoint_mean_lr", "target", "target_tasks")

Columns = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape after the example axis, dtype)
T = TypeVar("T")


class ChunkedStore:
    """Per-example columns written chunk by chunk, with metadata checked on every reopen."""

    required_fields: tuple[str, ...] = ("format", "format_version", "dataset", "n_examples", "chunk_size")

    def __init__(self, group: zarr.Group, where: str):
        self.group = group
        self.where = where

    # -- creation / reopening -------------------------------------------------------------------
    @classmethod
    def open_or_create(
        cls,
        root: StoreRoot | str | Path,
        path: str,
        metadata: dict,
        ids: list[str],
        tasks: list[str],
        columns: Columns,
        overwrite: bool = False,
    ):
        """Open ``root/path`` for writing, checking ``metadata``, or create it empty."""
        missing = [f for f in cls.required_fields if f not in metadata]
        if missing:
            raise ValueError(f"store metadata lacks {missing}")
        root = as_root(root)
        where = f"{root}/{path}"
        # Several processes of one command may open a store at once: creation is serialised.
        with creation_lock(root, path):
            _remove_partials(root, path)
            existing = _open_group(root, path)
            if existing is not None and not overwrite:
                fields = tuple(k for k in metadata if k not in INFORMATIONAL_FIELDS)
                check_metadata(dict(existing.attrs), metadata, where, fields)
                missing_arrays = [name for name in (*columns, "finite", "done", "ids", "tasks") if name not in existing]
                if missing_arrays:  # only a store of another layout (stores appear whole, see below)
                    raise StoreMismatchError("arrays", "complete layout", f"missing {missing_arrays}", where)
                group = existing
            else:
                group = _publish(root, path, lambda tmp: _build(root, tmp, metadata, ids, tasks, columns))
        store = cls(group, where)
        if list(store.ids) != list(ids):
            raise StoreMismatchError("ids", "the requested examples", "different ids", where)
        return store

    @classmethod
    def open(cls, root: StoreRoot | str | Path, path: str):
        group = _open_group(as_root(root), path, mode="r")
        if group is None:
            raise InfluenceError(f"no store at {root}/{path}; run `influence project-grads` first")
        return cls(group, f"{root}/{path}")

    # -- properties ----------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict:
        return dict(self.group.attrs)

    @property
    def n_examples(self) -> int:
        return int(self.metadata["n_examples"])

    @property
    def chunk_size(self) -> int:
        return int(self.metadata["chunk_size"])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_examples // self.chunk_size)

    @property
    def ids(self) -> np.ndarray:
        return self.group["ids"][:]

    @property
    def tasks(self) -> np.ndarray:
        return self.group["tasks"][:]

    @property
    def complete(self) -> bool:
        return bool(self.group["done"][:].all())

    def pending_chunks(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.group["done"][:])]

    def is_done(self, index: int) -> bool:
        """Whether chunk ``index`` is written (read afresh: another process may have just finished it)."""
        return bool(self.group["done"][index])

    @property
    def shareable(self) -> bool:
        """Whether several processes may write its chunks at once: each chunk's ``done`` flag is a
        storage chunk of its own (stores of earlier versions kept them in one)."""
        return self.group["done"].chunks[0] == 1

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.n_examples)

    def rows_in(self, chunks) -> int:
        """Examples in the chunks ``chunks`` (the last chunk may be short)."""
        return sum(stop - start for start, stop in map(self.chunk_bounds, chunks))

    # -- writing ---------------------------------------------------------------------------------------
    def write_columns(self, index: int, **values: np.ndarray) -> np.ndarray:
        """Write one chunk of every column; a row with any NaN/inf is flagged ``finite = False``.
        The chunk is marked done last, so a crash mid-chunk leaves it pending. Returns ``finite``."""
        start, stop = self.chunk_bounds(index)
        finite = np.ones(stop - start, dtype=bool)
        for name, value in values.items():
            array = self.group[name]
            expected = (stop - start, *array.shape[1:])
            if value.shape != expected:
                raise ValueError(f"chunk {index} of '{name}' expects shape {expected}, got {value.shape}")
            if np.issubdtype(value.dtype, np.floating):
                finite &= np.isfinite(value.reshape(len(value), -1)).all(axis=1)
            array[start:stop] = value.astype(array.dtype)
        self.group["finite"][start:stop] = finite
        self.group["done"][index] = True
        return finite

    # -- reading ---------------------------------------------------------------------------------------
    def require_complete(self) -> None:
        if not self.complete:
            raise InfluenceError(
                f"{self.where}: store is incomplete ({len(self.pending_chunks())} chunks missing); "
                "rerun the command that writes it to finish it"
            )

    def iter_chunks(self, rows: int | None = None, column: str = "grads") -> Iterator[tuple[int, np.ndarray]]:
        """(start, block) over a stored column, ``rows`` at a time (default: one chunk)."""
        self.require_complete()
        rows = rows or self.chunk_size
        array = self.group[column]
        for start in range(0, self.n_examples, rows):
            yield start, array[start : start + rows]

    def array(self, name: str) -> np.ndarray:
        return self.group[name][:]


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
    def open_or_create(cls, root, path, metadata, ids, tasks, overwrite=False):
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
        columns = {
            "grads": ((metadata["projector"]["output_dim"],), "float16"),
            "norms": ((), "float32"),
            "loss": ((), "float32"),
            "n_tokens": ((), "int32"),
        }
        if metadata["gradient_type"] == "margin":
            columns["out_to_loss"] = ((), "float32")  # TRAK's Q: mean of 1 - p over the response tokens
        return super().open_or_create(root, path, metadata, ids, tasks, columns, overwrite)

    def write_chunk(self, index: int, grads: np.ndarray, norms: np.ndarray, loss: np.ndarray, n_tokens: np.ndarray,
                    out_to_loss: np.ndarray | None = None) -> np.ndarray:
        extra = {} if out_to_loss is None else {"out_to_loss": out_to_loss}
        return self.write_columns(index, grads=grads, norms=norms, loss=loss, n_tokens=n_tokens, **extra)


def read_ahead(items: Iterator[T]) -> Iterator[T]:
    """The items of ``items``, each produced in a background thread while the caller works on the
    previous one: a store's next block is read (and decoded) while this one is scored. Reading
    releases the GIL (file reads, numpy copies, codecs), so the two overlap."""
    end = object()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        pending = pool.submit(next, items, end)
        while True:
            item = pending.result()
            if item is end:
                return
            pending = pool.submit(next, items, end)
            yield item


def _build(root: StoreRoot, path: str, metadata: dict, ids: list[str], tasks: list[str], columns: Columns) -> None:
    """Create an empty store at ``root/path``: every array, the ids and the subtask labels."""
    group = root.create_group(path, metadata)
    n, chunk = metadata["n_examples"], metadata["chunk_size"]
    n_chunks = -(-n // chunk)
    arrays = {name: ((n, *tail), (chunk, *tail), dtype) for name, (tail, dtype) in columns.items()}
    arrays["finite"] = ((n,), (chunk,), "bool")
    arrays["done"] = ((n_chunks,), (1,), "bool")  # one storage chunk per flag: processes write them independently
    for name, (shape, chunks, dtype) in arrays.items():
        # Vectors (gradients, representations) are stored uncompressed: projected gradients are close to
        # Gaussian noise, zstd saves 8% of their bytes and halves the read speed (scripts/bench_codecs.py).
        compressors = None if len(shape) > 1 else "auto"
        group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, compressors=compressors)
    for name, values in (("ids", ids), ("tasks", tasks)):
        _write_strings(group, name, values)


def _write_strings(group: zarr.Group, name: str, values: list[str]) -> None:
    """A 1-D array of variable-length strings (ids, subtask labels)."""
    array = group.create_array(name, shape=(len(values),), chunks=(max(len(values), 1),), dtype=str)
    array[:] = np.asarray(values, dtype=object).astype(str)


PARTIAL = ".partial-"


def creation_lock(root: StoreRoot | str | Path, path: str) -> FileLock:
    """The lock that serialises the creation of store ``root/path`` by several processes; kept in a
    local folder (beside a local hierarchy, ``<root's folder>/.locks``, where it is not mistaken for a
    member; the run's folder for a remote one)."""
    root = as_root(root)
    root.locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(root.locks / f"{root.name}--{path.replace('/', '--')}.lock"))


def _publish(root: StoreRoot | str | Path, path: str, build) -> zarr.Group:
    """Build a store under a temporary name beside ``path``, then move it into place, so that a store
    either exists whole (ids, tasks and every array) or not at all, whenever a process is killed."""
    root = as_root(root)
    tmp = f"{path}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    build(tmp)
    root.publish(tmp, path)
    return root.open_group(path)


def _remove_partials(root: StoreRoot | str | Path, path: str) -> None:
    """Delete what interrupted creations of ``path`` left behind (callers hold the run's writer lock),
    and a store whose publication on an object store was cut short (members without the group's
    ``zarr.json``)."""
    root = as_root(root)
    for leftover in root.leftovers(path, PARTIAL):
        root.remove(leftover)
    if root.remote and root.exists(path) and not root.has_group(path):
        root.remove(path)


LOCK_FILE = ".influence.lock"


@contextmanager
def writer_lock(folder: str | Path, command: str, shared: bool = False):
    """Hold the writer lock of a run folder for the duration of a writing command: exclusive, or
    ``shared`` for the processes of one cooperative command (``project-grads`` on several processes,
    which split the work by chunk claims) that may run together but beside no exclusive writer. An OS
    file lock (``flock``), released by the OS when a process dies, so a killed writer never blocks the
    next one."""
    folder = Path(folder)
    handle = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise InfluenceError(
            f"{folder}: another influence process is writing to this run; `{command}` refused so that the "
            "two never mix their results. Wait for it to finish, then run the command again"
        ) from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)


def exclusive(command: str):
    """Decorator: the function (whose first argument is a run folder) runs under :func:`writer_lock`."""

    def decorate(function):
        @functools.wraps(function)
        def locked(run_dir, *args, **kwargs):
            if not Path(run_dir).is_dir():  # the function's own check says what is missing
                return function(run_dir, *args, **kwargs)
            with writer_lock(run_dir, command):
                return function(run_dir, *args, **kwargs)

        return locked

    return decorate


def writer_active(folder: str | Path) -> bool:
    """Whether another process holds the run's writer lock (exclusive or shared) right now."""
    path = Path(folder) / LOCK_FILE
    if not path.exists():
        return False
    handle = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
    finally:
        os.close(handle)


def _open_group(root: StoreRoot, path: str, mode: str = "a") -> zarr.Group | None:
    if not root.has_group(path):
        return None
    return root.open_group(path, mode=mode)


def has_store(root: StoreRoot | str | Path, path: str) -> bool:
    """Whether a store (published whole) is at ``root/path``."""
    return as_root(root).has_group(path)


def check_metadata(found: dict, expected: dict, where: str, fields: tuple[str, ...] = METADATA_FIELDS) -> None:
    """Raise :class:`StoreMismatchError` at the first field that differs."""
    for field in fields:
        if found.get(field) != expected.get(field):
            raise StoreMismatchError(field, expected.get(field), found.get(field), where)


def grads_group(dim: int, dataset: str, checkpoint: str) -> str:
    """Where the gradient store of (projected dimension, dataset, checkpoint) lives in ``grads.zarr``."""
    return f"dim{dim}/{dataset}/{checkpoint}"


GRADIENT_TYPES = ("adam", "sgd", "margin")


def gradient_dataset(dataset: str, gradient_type: str) -> str:
    """Where a dataset's stores of one gradient type live: the pool's Adam features under ``train`` and
    a target's plain gradients under its own name (what LESS reads), any other type under
    ``<dataset>.<type>`` (``train.sgd`` for TracIn, ``train.margin`` and ``target-....margin`` for TRAK)."""
    default = "adam" if dataset == TRAIN else "sgd"
    return dataset if gradient_type == default else f"{dataset}.{gradient_type}"


def target_dataset(name: str, examples_sha256: str) -> str:
    """Dataset name of a target: its short name plus a hash of its content (examples, tasks, ids)."""
    return f"target-{name}-{examples_sha256[:12]}"


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


SUBSETS_FORMAT = "influence-subsets"
SUBSETS_VERSION = 1
UNIT_OUTCOMES = ("loss", "accuracy", "probability", "margin", "choice_correct")  # rows of a unit's arrays
POOL = "pool"


def random_mask(n: int, size: int, seed: int, unit: int) -> np.ndarray:
    """Unit ``unit``'s subset of a random design: ``size`` of ``n`` examples, a pure function of
    (seed, unit), so every worker derives the same masks and a design can grow without rewriting."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng([seed, unit]).choice(n, size=size, replace=False)] = True
    return mask


class SubsetStore:
    """Models trained on subsets of the pool (the counterfactual engine's units) and their outcomes.

    ``runs/x/subsets.zarr/<name>/`` holds the pool's ids, each evaluated target's ids and subtasks
    (``targets/<dataset>/``), the design (``random``: unit ``k`` trains on :func:`random_mask`;
    ``explicit``: the ``masks`` array, one named row per unit), the training settings and the model
    fingerprint; ``units/unit-<k>/`` holds one finished model's ``mask`` (n_pool bool) and its
    outcomes (:data:`UNIT_OUTCOMES` x examples, float32) on the pool (``pool``) and on every target
    (``target-<...>``). A unit is published whole (built under a temporary name and renamed), so it
    exists complete or not at all; ``claims/`` holds the workers' locks (:class:`~influence.units.UnitClaims`).
    """

    def __init__(self, root: str | Path, name: str):
        self.root, self.name = Path(root), name
        self.path = self.root / name
        self.group = zarr.open_group(store=str(self.root), path=name, mode="r")

    @classmethod
    def open(cls, root: str | Path, name: str) -> SubsetStore:
        if not Path(root, name, "zarr.json").is_file():
            known = ", ".join(stored_subsets(root)) or "none"
            raise InfluenceError(f"no subset models named '{name}' in {root} (stored: {known}); "
                                 "train them with `influence subsets train`")
        store = cls(root, name)
        if store.metadata.get("format") != SUBSETS_FORMAT or store.metadata.get("format_version") != SUBSETS_VERSION:
            raise StoreMismatchError("format_version", SUBSETS_VERSION, store.metadata.get("format_version"), str(store.path))
        return store

    @classmethod
    def open_or_create(cls, root: str | Path, name: str, metadata: dict, pool_ids: list[str],
                       targets: dict[str, tuple[list[str], list[str]]], masks: np.ndarray | None = None) -> SubsetStore:
        """Open ``root/name`` checking ``metadata`` and the evaluated targets, or create it. Several
        workers may call this at once: creation is serialised by a lock and published whole."""
        metadata = {"format": SUBSETS_FORMAT, "format_version": SUBSETS_VERSION, **metadata}
        Path(root).mkdir(parents=True, exist_ok=True)
        with creation_lock(root, name):
            if not Path(root, name, "zarr.json").is_file():
                _remove_partials(root, name)
                _publish(root, name, lambda tmp: _build_subsets(root, tmp, metadata, pool_ids, targets, masks))
        store = cls.open(root, name)
        where = str(store.path)
        fields = tuple(k for k in metadata if k not in ("influence_version", "targets"))
        check_metadata(store.metadata, metadata, where + " (another design, model, pool or training settings; "
                       "choose another --name)", fields)
        stored, wanted = set(store.targets), set(targets)
        if stored != wanted:
            raise StoreMismatchError("targets", sorted(wanted), sorted(stored), where + " (these subset models evaluate "
                                     "other targets; give the models that evaluate these another name)")
        if masks is not None and not np.array_equal(store.group["masks"][:], masks):
            raise StoreMismatchError("masks", "the requested subsets", "other subsets", where)
        return store

    @property
    def metadata(self) -> dict:
        return dict(self.group.attrs)

    @property
    def design(self) -> dict:
        return self.metadata["design"]

    @property
    def n_pool(self) -> int:
        return int(self.metadata["n_pool"])

    @property
    def targets(self) -> dict[str, dict]:
        """Evaluated targets: dataset name -> {target, n_examples, examples_sha256, multiple_choice}."""
        return self.metadata["targets"]

    @property
    def pool_ids(self) -> np.ndarray:
        return self.group["ids"][:]

    def target_labels(self, dataset: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, subtasks) of an evaluated target."""
        self.require_target(dataset)
        return self.group[f"targets/{dataset}/ids"][:], self.group[f"targets/{dataset}/tasks"][:]

    @property
    def pool_measured(self) -> bool:
        """Whether every model was also measured on the pool (not for selection retraining)."""
        return bool(self.metadata.get("pool_measured", True))

    def require_target(self, dataset: str) -> None:
        if dataset == POOL and not self.pool_measured:
            raise InfluenceError(f"{self.path}: these models were not measured on the pool's examples")
        if dataset != POOL and dataset not in self.targets:
            names = ", ".join(t["target"] for t in self.targets.values()) or "none"
            raise InfluenceError(f"{self.path}: these subset models did not evaluate this target (or it changed "
                                 f"since: its content hash differs); they evaluated: {names}. Train subset models "
                                 "that evaluate it (`influence subsets train --target ... --name ...`)")

    @property
    def n_units(self) -> int | None:
        """Units of an explicit design; None for a random design (it grows with ``--k``)."""
        return int(self.group["masks"].shape[0]) if self.design["kind"] == "explicit" else None

    @property
    def unit_names(self) -> list[str]:
        return list(self.design.get("names", []))

    def mask(self, unit: int) -> np.ndarray:
        design = self.design
        if design["kind"] == "explicit":
            return self.group["masks"][unit]
        return random_mask(self.n_pool, design["size"], design["seed"], unit)

    def unit_path(self, unit: int) -> str:
        return f"{self.name}/units/unit-{unit:06d}"

    def is_done(self, unit: int) -> bool:
        return Path(self.root, self.unit_path(unit), "zarr.json").is_file()

    def done_units(self) -> list[int]:
        folder = self.path / "units"
        if not folder.is_dir():
            return []
        return sorted(int(p.name[5:]) for p in folder.iterdir() if p.name.startswith("unit-") and p.name[5:].isdigit()
                      and (p / "zarr.json").is_file())

    def write_unit(self, unit: int, mask: np.ndarray, outcomes: dict[str, dict[str, np.ndarray]], attrs: dict,
                   texts: dict[str, list[str]] | None = None) -> None:
        """Publish one finished unit: its mask, per dataset (``pool`` and each target) its outcomes,
        and optionally texts per dataset (generated responses, ``texts/<dataset>``). Callers hold the
        unit's claim, so leftovers of its earlier attempts are theirs."""
        required = {POOL, *self.targets} if self.pool_measured else set(self.targets)
        missing = sorted(required - set(outcomes))
        if missing:
            raise ValueError(f"unit {unit} lacks outcomes for {missing}")

        def build(tmp: str) -> None:
            group = zarr.create_group(store=str(self.root), path=tmp, attributes=attrs, overwrite=True)
            group.create_array("mask", data=np.asarray(mask, dtype=bool))
            for dataset, values in outcomes.items():
                rows = np.stack([np.asarray(values[o], dtype=np.float32) for o in UNIT_OUTCOMES])
                group.create_array(dataset, data=rows)
            for dataset, strings in (texts or {}).items():
                _write_strings(group, f"texts/{dataset}", strings)

        _remove_partials(self.root, self.unit_path(unit))
        _publish(self.root, self.unit_path(unit), build)

    def outcomes(self, dataset: str, outcome: str, units: list[int] | None = None) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(units, masks (units x n_pool bool), values (units x examples)) of finished units."""
        self.require_target(dataset)
        if outcome not in UNIT_OUTCOMES:
            raise InfluenceError(f"unknown outcome '{outcome}'; choose from {', '.join(UNIT_OUTCOMES)}")
        units = self.done_units() if units is None else units
        row = UNIT_OUTCOMES.index(outcome)
        masks, values = [], []
        for unit in units:
            group = zarr.open_group(store=str(self.root), path=self.unit_path(unit), mode="r")
            masks.append(group["mask"][:])
            values.append(group[dataset][row])
        n = self.n_pool if dataset == POOL else int(self.targets[dataset]["n_examples"])
        return (units, np.array(masks, dtype=bool).reshape(len(units), self.n_pool),
                np.array(values, dtype=np.float64).reshape(len(units), n))

    def texts(self, unit: int, dataset: str) -> list[str]:
        """A finished unit's texts for a dataset (e.g. its generated responses)."""
        group = zarr.open_group(store=str(self.root), path=self.unit_path(unit), mode="r")
        if f"texts/{dataset}" not in group:
            raise InfluenceError(f"{self.path}: unit {unit} stored no texts for {dataset}")
        return [str(t) for t in group[f"texts/{dataset}"][:]]

    def unit_attrs(self, unit: int) -> dict:
        return dict(zarr.open_group(store=str(self.root), path=self.unit_path(unit), mode="r").attrs)


def _build_subsets(root, path: str, metadata: dict, pool_ids: list[str], targets: dict[str, tuple[list[str], list[str]]],
                   masks: np.ndarray | None) -> None:
    group = zarr.create_group(store=str(root), path=path, attributes=metadata, overwrite=True)
    _write_strings(group, "ids", pool_ids)
    for dataset, (ids, tasks) in targets.items():
        _write_strings(group, f"targets/{dataset}/ids", ids)
        _write_strings(group, f"targets/{dataset}/tasks", tasks)
    if masks is not None:
        group.create_array("masks", data=np.asarray(masks, dtype=bool), chunks=(1, masks.shape[1]))


def stored_subsets(root: str | Path) -> list[str]:
    """Names of the subset-model stores under ``root`` (``runs/x/subsets.zarr``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "zarr.json").is_file() and PARTIAL not in p.name)
