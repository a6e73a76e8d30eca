"""The one store format: per-example columns in a Zarr (v3) group, filled chunk by chunk and published
whole (see :class:`ChunkedStore`)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import zarr
from filelock import FileLock

from ..errors import InfluenceError, StoreMismatchError
from .storage import StoreRoot, as_root

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
            remove_partials(root, path)
            existing = existing_group(root, path)
            if existing is not None and not overwrite:
                fields = tuple(k for k in metadata if k not in INFORMATIONAL_FIELDS)
                check_metadata(dict(existing.attrs), metadata, where, fields)
                missing_arrays = [name for name in (*columns, "finite", "done", "ids", "tasks") if name not in existing]
                if missing_arrays:  # only a store of another layout (stores appear whole, see below)
                    raise StoreMismatchError("arrays", "complete layout", f"missing {missing_arrays}", where)
                group = existing
            else:
                group = publish_store(root, path, lambda tmp: _build(root, tmp, metadata, ids, tasks, columns))
        store = cls(group, where)
        if list(store.ids) != list(ids):
            raise StoreMismatchError("ids", "the requested examples", "different ids", where)
        return store

    @classmethod
    def open(cls, root: StoreRoot | str | Path, path: str):
        group = existing_group(as_root(root), path, mode="r")
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
        write_strings(group, name, values)


def write_strings(group: zarr.Group, name: str, values: list[str]) -> None:
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


def publish_store(root: StoreRoot | str | Path, path: str, build) -> zarr.Group:
    """Build a store under a temporary name beside ``path``, then move it into place, so that a store
    either exists whole (ids, tasks and every array) or not at all, whenever a process is killed."""
    root = as_root(root)
    tmp = f"{path}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    build(tmp)
    root.publish(tmp, path)
    return root.open_group(path)


def remove_partials(root: StoreRoot | str | Path, path: str) -> None:
    """Delete what interrupted creations of ``path`` left behind (callers hold the run's writer lock),
    and a store whose publication on an object store was cut short (members without the group's
    ``zarr.json``)."""
    root = as_root(root)
    for leftover in root.leftovers(path, PARTIAL):
        root.remove(leftover)
    if root.remote and root.exists(path) and not root.has_group(path):
        root.remove(path)


def existing_group(root: StoreRoot, path: str, mode: str = "a") -> zarr.Group | None:
    if not root.has_group(path):
        return None
    return root.open_group(path, mode=mode)


def has_store(root: StoreRoot | str | Path, path: str) -> bool:
    """Whether a store (published whole) is at ``root/path``."""
    return as_root(root).has_group(path)


def check_metadata(found: dict, expected: dict, where: str, fields: tuple[str, ...]) -> None:
    """Raise :class:`StoreMismatchError` at the first field that differs."""
    for field in fields:
        if found.get(field) != expected.get(field):
            raise StoreMismatchError(field, expected.get(field), found.get(field), where)
