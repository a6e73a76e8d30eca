"""The one store format: per-example columns in a Zarr (v3) group, filled chunk by chunk and published
whole (see :class:`ChunkedStore`).

Integrity: every array is written with a CRC-32C checksum per chunk (Zarr v3's ``crc32c`` codec, last in the
codec pipeline) and every chunk is written, even one equal to the fill value, so a chunk whose bytes were
changed, truncated or deleted is found when it is read (:meth:`ChunkedStore.read`) or verified
(:meth:`ChunkedStore.verify`, ``influence verify``): an error names the store, the column, the chunks and
their rows, never a silently wrong number. Stores written before checksums are read as before.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr
from fastcrc import crc32
from filelock import FileLock
from zarr.codecs import Crc32cCodec, ZstdCodec

from ..errors import InfluenceError, RunError, StoreCorruptError, StoreMismatchError
from .storage import STAGING, StoreRoot, as_root

# Every chunk is written, even one equal to the fill value: a chunk file that is missing is then always a loss.
zarr.config.set({"array.write_empty_chunks": True})
# Errors Zarr's codecs raise for bytes they cannot decode (a checksum mismatch, a truncated frame).
DECODE_ERRORS = (ValueError, RuntimeError, TypeError)
# The command that writes each kind of store: after `influence verify --repair` it recomputes the bad chunks.
WRITERS = {"influence-grads": "influence project-grads", "influence-forward": "influence forward-scores",
           "influence-reps": "influence rank --method rds", "influence-embeddings": "influence rank --space embed:<model>"}

# Recorded for information only; never a reason to refuse a store.
INFORMATIONAL_FIELDS = ("influence_version", "checkpoint_mean_lr", "target", "target_tasks", "run_id")


Columns = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape after the example axis, dtype)


class ChunkedStore:
    """Per-example columns written chunk by chunk, with metadata checked on every reopen."""

    required_fields: tuple[str, ...] = ("format", "format_version", "dataset", "n_examples", "chunk_size")

    def __init__(self, group: zarr.Group, where: str, root: StoreRoot | None = None, path: str | None = None):
        self.group = group
        self.where = where
        self.root, self.path = root, path
        self._present: dict[str, set[int]] = {}  # read once per store object: chunk files that exist
        self._arrays: dict[str, zarr.Array] = {}
        self._done: np.ndarray | None = None
        self._layouts: dict[str, tuple | None] = {}  # per column: how to read its chunk files directly, or None

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
        checksums: bool = True,
    ):
        """Open ``root/path`` for writing, checking ``metadata``, or create it empty (``checksums=False``: without
        CRC-32C checksums, as stores were written before them; for benchmarks)."""
        missing = [f for f in cls.required_fields if f not in metadata]
        if missing:
            raise ValueError(f"store metadata lacks {missing}")
        root = as_root(root)
        where = f"{root}/{path}"
        # Several processes of one command may open a store at once: creation is serialised.
        with creation_lock(root, path):
            remove_partials(root, path)
            existing = existing_group(root, path)
            owner = dict(existing.attrs).get("run_id") if existing is not None else None
            if owner is not None and metadata.get("run_id") not in (None, owner):  # --overwrite included
                raise RunError(f"{where} belongs to another run (id {owner}), not to the run writing it (id "
                               f"{metadata['run_id']}); nothing was written: give this run its own stores")
            if existing is not None and not overwrite:
                fields = tuple(k for k in metadata if k not in INFORMATIONAL_FIELDS)
                check_metadata(dict(existing.attrs), metadata, where, fields)
                missing_arrays = [name for name in (*columns, "finite", "done", "ids", "tasks") if name not in existing]
                if missing_arrays:  # only a store of another layout (stores appear whole, see below)
                    raise StoreMismatchError("arrays", "complete layout", f"missing {missing_arrays}", where)
                group = existing
            else:
                group = publish_store(root, path, lambda tmp: _build(root, tmp, metadata, ids, tasks, columns, checksums))
        store = cls(group, where, root, path)
        if list(store.ids) != list(ids):
            raise StoreMismatchError("ids", "the requested examples", "different ids", where)
        return store

    @classmethod
    def open(cls, root: StoreRoot | str | Path, path: str, writable: bool = False):
        """Open ``root/path`` for reading (``writable``: also to change its done flags, as a repair does)."""
        root = as_root(root)
        group = existing_group(root, path, mode="a" if writable else "r")
        if group is None:
            raise InfluenceError(f"no store at {root}/{path}; run `influence project-grads` first")
        return cls(group, f"{root}/{path}", root, path)

    # -- properties ----------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict:
        return dict(self.group.attrs)

    @functools.cached_property
    def n_examples(self) -> int:
        return int(self.metadata["n_examples"])

    @functools.cached_property
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
        """(start, block) over a stored column, ``rows`` at a time (default: one chunk), each block checked."""
        self.require_complete()
        rows = rows or self.chunk_size
        for start in range(0, self.n_examples, rows):
            yield start, self.read(column, start, min(start + rows, self.n_examples))

    def array(self, name: str) -> np.ndarray:
        """A whole column (per-example columns checked as :meth:`read` checks them)."""
        if self.group[name].shape[:1] == (self.n_examples,) and name not in ("ids", "tasks"):
            return self.read(name, 0, self.n_examples)
        return self.group[name][:]

    # -- integrity -------------------------------------------------------------------------------------
    def read(self, column: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` of a per-example column (into ``out`` where it can); refuses, naming the chunks and
        rows, bytes that fail their checksum or cannot be decoded and, in a checksummed store, written chunks whose
        file is missing."""
        if column not in self._arrays:
            self._arrays[column] = self.group[column]
        array = self._arrays[column]
        try:
            values = self._read_files(column, array, start, stop, out)
            if values is None:  # not a plain local column, or a chunk that fails its checks: Zarr reads and says why
                values = array[start:stop]
        except DECODE_ERRORS as err:
            chunks = self.chunks_of(start, stop)
            bad = [c for c in chunks if not self._decodes(array, c)] or list(chunks)
            raise self._corrupt(column, bad, f"cannot be read ({read_error_reason(err)})") from None
        if checksummed(array):
            if self._done is None:
                self._done = self.group["done"][:]
            present = self.present_chunks(column)
            missing = [c for c in self.chunks_of(start, stop)
                       if self._done[c] and c not in present]
            if missing:
                raise self._corrupt(column, missing, "is missing (its file was deleted)")
        return values

    def verify(self) -> list[StoreCorruptError]:
        """Every written chunk of every per-example column read and checked: what is corrupt or missing."""
        found = []
        done = self.group["done"][:]
        for name in self.row_columns():
            array = self.group[name]
            bad = [c for c in map(int, np.flatnonzero(done)) if not self._decodes(array, c)]
            if bad:
                found.append(self._corrupt(name, bad, "cannot be read (checksum mismatch or truncated)"))
            if checksummed(array):
                missing = [c for c in map(int, np.flatnonzero(done)) if c not in self.present_chunks(name) and c not in bad]
                if missing:
                    found.append(self._corrupt(name, missing, "is missing (its file was deleted)"))
        return found

    def mark_pending(self, chunks: list[int]) -> None:
        """Mark ``chunks`` as not written, so that the command that writes the store recomputes them."""
        done = self.group["done"]
        for chunk in chunks:
            done[chunk] = False

    def row_columns(self) -> list[str]:
        """The arrays with one row per example (every column and the finite flags; not ids, tasks, done)."""
        return sorted(name for name, array in self.group.arrays()
                      if array.shape[:1] == (self.n_examples,) and name not in ("ids", "tasks", "done"))

    def _chunk_files(self, column: str, array) -> tuple[str, np.dtype, int, bool] | None:
        """How to read ``column``'s chunk files directly, when they are plain bytes in a local folder: the folder,
        the rows' dtype, one stored chunk's bytes without its checksum, and whether a CRC-32C follows; None for
        any other layout (a remote store, compression, sharding, strings)."""
        if self.root is None or self.path is None or self.root.remote:
            return None
        meta = array.metadata
        codecs = list(getattr(meta, "codecs", ()))
        names = [type(codec).__name__ for codec in codecs]
        if (getattr(meta, "zarr_format", None) != 3 or names not in (["BytesCodec"], ["BytesCodec", "Crc32cCodec"])
                or array.dtype.kind not in "biuf" or tuple(meta.chunk_grid.chunk_shape) != (self.chunk_size, *array.shape[1:])):
            return None
        dtype, endian = np.dtype(array.dtype), codecs[0].endian
        if dtype.itemsize > 1:
            if endian is None:
                return None
            dtype = dtype.newbyteorder("<" if endian.value == "little" else ">")
        return (self.root._full(f"{self.path}/{column}"), dtype,
                self.chunk_size * int(np.prod(array.shape[1:], dtype=np.int64)) * dtype.itemsize, len(codecs) == 2)

    def _read_files(self, column: str, array, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """Rows ``start:stop`` read straight from their chunk files into one array, each checksum checked; None
        when the column is not plain local bytes or a chunk is not as written (Zarr then reads it and says why).

        Written by hand because Zarr's local reads cost a fresh bytes object and a second copy per chunk: 1.9 s
        for a 150k x 8192 fp16 pool against 0.5 s here (the file read and the CRC-32C), when reading was half of
        ``rank --method less``'s time (``scripts/bench_scoring.py``)."""
        if column not in self._layouts:
            self._layouts[column] = self._chunk_files(column, array)
        layout = self._layouts[column]
        if layout is None or not 0 <= start <= stop <= array.shape[0]:
            return None
        folder, dtype, chunk_bytes, crc = layout
        shape = (stop - start, *array.shape[1:])
        usable = out is not None and out.shape == shape and out.dtype == dtype and out.flags.c_contiguous
        values = out if usable else np.empty(shape, dtype=dtype)
        row_bytes = values.itemsize * int(np.prod(values.shape[1:], dtype=np.int64))
        corner = (0,) * (array.ndim - 1)
        for chunk in self.chunks_of(start, stop):
            first = chunk * self.chunk_size
            lo, hi = max(start, first), min(stop, first + self.chunk_size)
            whole = hi - lo == self.chunk_size
            buffer = values[lo - start : hi - start] if whole else np.empty(chunk_bytes // values.itemsize, dtype)
            try:
                with open(f"{folder}/{array.metadata.encode_chunk_key((chunk, *corner))}", "rb", buffering=0) as file:
                    size = os.fstat(file.fileno()).st_size
                    if size != chunk_bytes + 4 * crc or _read_into(file, buffer) != chunk_bytes:
                        return None
                    stored = file.read(4) if crc else b""
            except FileNotFoundError:  # never written: Zarr's fill value (a written chunk's loss is found by read)
                values[lo - start : hi - start] = array.metadata.fill_value
                continue
            # CRC-32C ("iSCSI") as Zarr's codec writes it, in native byte order; fastcrc is 4x google-crc32c here
            if crc and np.uint32(crc32.iscsi(buffer.reshape(-1).view(np.uint8))).tobytes() != stored:
                return None
            if not whole:
                values[lo - start : hi - start] = buffer.view(np.uint8)[(lo - first) * row_bytes : (hi - first) * row_bytes] \
                    .view(dtype).reshape(hi - lo, *values.shape[1:])
        return values.astype(array.dtype, copy=False)

    def chunks_of(self, start: int, stop: int) -> range:
        """The chunks that hold rows ``start:stop``."""
        return range(start // self.chunk_size, -(-stop // self.chunk_size))

    def present_chunks(self, column: str) -> set[int]:
        """Indices (along the examples) of the chunk files that exist for ``column``."""
        if column not in self._present:
            if self.root is None or self.path is None:
                return set(range(self.n_chunks))  # no way to look: trust the done flags
            folder = self.root._full(f"{self.path}/{column}/c")
            names = self.root.fs.find(folder) if self.root.fs.isdir(folder) else []
            self._present[column] = {int(name[len(folder) + 1:].split("/")[0]) for name in names}
        return self._present[column]

    def _decodes(self, array, chunk: int) -> bool:
        start, stop = self.chunk_bounds(chunk)
        try:
            array[start:stop]
        except DECODE_ERRORS:
            return False
        return True

    def _corrupt(self, column: str, chunks: list[int], reason: str) -> StoreCorruptError:
        writer = WRITERS.get(self.metadata.get("format"), "the command that wrote it")
        remedy = (f"`influence verify --run RUN --repair` marks them unwritten, then `{writer}` recomputes just "
                  "those chunks")
        return StoreCorruptError(self.where, column, chunks, [self.chunk_bounds(c) for c in chunks], reason, remedy)


def checksummed(array) -> bool:
    """Whether an array's chunks carry a CRC-32C checksum (stores written before checksums do not)."""
    return any(type(codec).__name__ == "Crc32cCodec" for codec in array.metadata.codecs)


def read_error_reason(err: Exception) -> str:
    """One short line saying why a chunk could not be decoded (``checksum mismatch`` for a CRC-32C failure)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return "checksum mismatch" if "checksum" in text.lower() else text[:120]


def _read_into(file, buffer: np.ndarray) -> int:
    """Fill ``buffer`` from ``file`` (a short read is retried until end of file); the bytes read."""
    view, done = memoryview(buffer.reshape(-1).view(np.uint8)), 0
    while done < len(view):
        count = file.readinto(view[done:])
        if not count:
            break
        done += count
    return done


def _build(root: StoreRoot, path: str, metadata: dict, ids: list[str], tasks: list[str], columns: Columns,
           checksums: bool = True) -> None:
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
        # Every chunk carries a CRC-32C checksum (the last codec), checked whenever it is read.
        compressors = [Crc32cCodec()] if len(shape) > 1 else checked_codecs()
        if not checksums:
            compressors = None if len(shape) > 1 else "auto"
        group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, compressors=compressors)
    for name, values in (("ids", ids), ("tasks", tasks)):
        write_strings(group, name, values)


def checked_codecs() -> list:
    """The compressors of a small array: zstd, then a CRC-32C checksum of every chunk."""
    return [ZstdCodec(level=0), Crc32cCodec()]


def write_strings(group: zarr.Group, name: str, values: list[str]) -> None:
    """A 1-D array of variable-length strings (ids, subtask labels), checksummed."""
    array = group.create_array(name, shape=(len(values),), chunks=(max(len(values), 1),), dtype=str,
                               compressors=checked_codecs())
    array[:] = np.asarray(values, dtype=object).astype(str)


PARTIAL = STAGING  # one marker for everything being written: cleaning and status look for one name
STORE_DEPTH = 3  # stores sit at most this deep under a root (dim<d>/<dataset>/<checkpoint>): partials are not deeper


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


def remove_all_partials(root: StoreRoot | str | Path) -> list[str]:
    """Delete every store an interrupted creation left anywhere under ``root``, each only while no process is
    creating that store (its creation lock is free). Returns what was removed."""
    from filelock import Timeout

    root = as_root(root)
    if not root.exists():
        return []
    removed = []
    # maxdepth: the walk never lists the chunk files inside the stores (every object, on a remote store)
    for name in sorted(root.fs.glob(f"{root._full()}/**/*{PARTIAL}*", maxdepth=STORE_DEPTH)):
        relative = name[len(root._full()) + 1 :]
        if PARTIAL not in relative.rsplit("/", 1)[-1] or any(relative.startswith(r + "/") for r in removed):
            continue
        try:
            with creation_lock(root, relative.split(PARTIAL)[0]).acquire(timeout=0):
                root.remove(relative)
                removed.append(relative)
        except Timeout:  # being created right now by another process
            continue
    return removed


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


def chunked_stores_under(root: StoreRoot | str | Path) -> list[str]:
    """The paths (relative to ``root``) of every chunked store published under it."""
    root = as_root(root)
    if not root.exists():
        return []
    found = root.fs.glob(f"{root._full()}/**/done/zarr.json")
    paths = sorted(name[len(root._full()) + 1 : -len("/done/zarr.json")] for name in found)
    return [path for path in paths if PARTIAL not in path]
