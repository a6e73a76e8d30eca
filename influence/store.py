"""The one gradient store format: a Zarr (v3) group per (dataset, checkpoint).

Inside ``runs/x/grads.zarr``, group ``<dataset>/<checkpoint>`` (dataset ``train`` or
``target-<name>``) holds:

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

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

from .errors import InfluenceError, StoreMismatchError

FORMAT = "influence-grads"
FORMAT_VERSION = 1
# Fields that must match for a store to be reused or combined with another.
METADATA_FIELDS = (
    "format",
    "format_version",
    "model",
    "checkpoint",
    "adapter_sha256",
    "gradient_type",
    "projector",
    "dtype",
    "dataset",
    "n_examples",
    "examples_sha256",
    "max_length",
    "chunk_size",
)


class GradientStore:
    def __init__(self, group: zarr.Group, where: str):
        self.group = group
        self.where = where

    # -- creation / reopening -------------------------------------------------------------------
    @classmethod
    def open_or_create(
        cls,
        root: str | Path,
        path: str,
        metadata: dict,
        ids: list[str],
        tasks: list[str],
        overwrite: bool = False,
    ) -> GradientStore:
        """Open ``root/path`` for writing, checking ``metadata``, or create it empty."""
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
        missing = [f for f in METADATA_FIELDS if f not in metadata]
        if missing:
            raise ValueError(f"store metadata lacks {missing}")
        where = f"{root}/{path}"
        existing = _open_group(root, path)
        if existing is not None and not overwrite:
            check_metadata(dict(existing.attrs), metadata, where)
            group = existing
        else:
            group = zarr.create_group(store=str(root), path=path, attributes=metadata, overwrite=True)
        n, dim, chunk = metadata["n_examples"], metadata["projector"]["output_dim"], metadata["chunk_size"]
        arrays = {
            "grads": ((n, dim), (chunk, dim), "float16", 0),
            "norms": ((n,), (chunk,), "float32", 0),
            "loss": ((n,), (chunk,), "float32", 0),
            "n_tokens": ((n,), (chunk,), "int32", 0),
            "finite": ((n,), (chunk,), "bool", False),
            "done": ((-(-n // chunk),), (max(1, -(-n // chunk)),), "bool", False),
        }
        for name, (shape, chunks, dtype, fill) in arrays.items():
            if name not in group:
                group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
        for name, values in (("ids", ids), ("tasks", tasks)):
            if name not in group:
                array = group.create_array(name, shape=(n,), chunks=(max(n, 1),), dtype=str)
                array[:] = np.asarray(values, dtype=object).astype(str)
        store = cls(group, where)
        if list(store.ids) != list(ids):
            raise StoreMismatchError("ids", "the requested examples", "different ids", where)
        return store

    @classmethod
    def open(cls, root: str | Path, path: str) -> GradientStore:
        group = _open_group(root, path, mode="r")
        if group is None:
            raise InfluenceError(f"no gradient store at {root}/{path}; run `influence project-grads` first")
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

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.n_examples)

    # -- writing ---------------------------------------------------------------------------------------
    def write_chunk(
        self, index: int, grads: np.ndarray, norms: np.ndarray, loss: np.ndarray, n_tokens: np.ndarray
    ) -> None:
        """Write one chunk; rows with NaN/inf are flagged ``finite = False``; mark done last."""
        start, stop = self.chunk_bounds(index)
        if grads.shape != (stop - start, self.group["grads"].shape[1]):
            raise ValueError(f"chunk {index} expects {(stop - start, self.group['grads'].shape[1])}, got {grads.shape}")
        finite = np.isfinite(grads).all(axis=1) & np.isfinite(norms) & np.isfinite(loss)
        self.group["grads"][start:stop] = grads.astype(np.float16)
        self.group["norms"][start:stop] = norms.astype(np.float32)
        self.group["loss"][start:stop] = loss.astype(np.float32)
        self.group["n_tokens"][start:stop] = n_tokens.astype(np.int32)
        self.group["finite"][start:stop] = finite
        self.group["done"][index] = True

    # -- reading ---------------------------------------------------------------------------------------
    def iter_chunks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(start, float16 block) over the stored gradients, ``rows`` at a time (default: chunk)."""
        if not self.complete:
            raise InfluenceError(
                f"{self.where}: store is incomplete ({len(self.pending_chunks())} chunks missing); "
                "rerun `influence project-grads` to finish it"
            )
        rows = rows or self.chunk_size
        grads = self.group["grads"]
        for start in range(0, self.n_examples, rows):
            yield start, grads[start : start + rows]

    def array(self, name: str) -> np.ndarray:
        return self.group[name][:]


def _open_group(root: str | Path, path: str, mode: str = "a") -> zarr.Group | None:
    if not Path(root, path, "zarr.json").is_file():
        return None
    return zarr.open_group(store=str(root), path=path, mode=mode)


def check_metadata(found: dict, expected: dict, where: str, fields: tuple[str, ...] = METADATA_FIELDS) -> None:
    """Raise :class:`StoreMismatchError` at the first field that differs."""
    for field in fields:
        if found.get(field) != expected.get(field):
            raise StoreMismatchError(field, expected.get(field), found.get(field), where)


def list_stores(root: str | Path, dataset: str) -> list[str]:
    """Checkpoint names that have a store for ``dataset`` under ``root``."""
    folder = Path(root, dataset)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file())
