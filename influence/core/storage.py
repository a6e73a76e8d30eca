"""Where a Zarr hierarchy of stores lives: a local folder or an fsspec URL.

A run's gradient stores (``grads.zarr``) may live on any file system fsspec reaches (``s3://``,
``gs://``, ``memory://``...): Zarr reads and writes them through its own ``FsspecStore``, and the few
file operations the stores need besides (does a store exist, which stores are there, publish a store
built under a temporary name) go through the same fsspec file system. ``file://`` URLs and plain paths
are local folders (Zarr's ``LocalStore``).

Locks never live on the remote side: object stores have none. Creation locks and chunk claims stay in
the run's local folder, so the processes of one machine (``--workers``, torchrun) cooperate on a
remote store; machines that share only the remote store split the work statically (``--shard i/n``).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import fsspec
import zarr

from ..errors import InfluenceError


class StoreRoot:
    """The root of a Zarr hierarchy: ``location`` a folder, a ``file://`` URL or any fsspec URL.

    ``locks`` is the local folder for creation locks (default: ``.locks`` beside a local root; a remote
    root needs one, the run's own folder)."""

    def __init__(self, location: str | Path, locks: str | Path | None = None):
        text = str(location)
        if text.startswith("file://"):
            text = text[len("file://"):]
        self.remote = "://" in text
        if self.remote:
            self.url = text.rstrip("/")
            try:
                self.fs, self.base = fsspec.core.url_to_fs(self.url)
            except (ImportError, ValueError) as err:  # unknown protocol, or its package is not installed
                raise InfluenceError(f"{self.url}: cannot open this store location: {err}") from None
            if locks is None:
                raise ValueError("a remote store root needs a local folder for its locks")
        else:
            self.url = text
            self.fs, self.base = fsspec.filesystem("file"), str(Path(text).absolute())
        self.locks = Path(locks) if locks is not None else Path(self.base).parent / ".locks"
        self.name = self.base.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"StoreRoot({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, StoreRoot) and (self.remote, self.base) == (other.remote, other.base)

    def __hash__(self) -> int:
        return hash((self.remote, self.base))

    def _full(self, path: str = "") -> str:
        return f"{self.base}/{path}".rstrip("/") if path else self.base

    @functools.cached_property
    def zarr_store(self):
        """What Zarr opens: a ``FsspecStore`` for a URL (one per root, so its connections are reused),
        the folder's path otherwise."""
        if not self.remote:
            return self.base
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url)

    def open_group(self, path: str, mode: str = "a") -> zarr.Group:
        return zarr.open_group(store=self.zarr_store, path=path, mode=mode)

    def create_group(self, path: str, attributes: dict) -> zarr.Group:
        return zarr.create_group(store=self.zarr_store, path=path, attributes=attributes, overwrite=True)

    def has_group(self, path: str) -> bool:
        """Whether a Zarr group (a published store) is at ``path``."""
        return self.fs.isfile(self._full(f"{path}/zarr.json"))

    def exists(self, path: str = "") -> bool:
        return self.fs.exists(self._full(path))

    def children(self, path: str = "") -> list[str]:
        """Names of the folders directly under ``path`` (none where it does not exist)."""
        folder = self._full(path)
        if not self.fs.isdir(folder):
            return []
        return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1]
                      for entry in self.fs.ls(folder, detail=True) if entry["type"] == "directory")

    def remove(self, path: str) -> None:
        """Delete the folder ``path`` and everything under it (nothing where it does not exist)."""
        full = self._full(path)
        if not self.remote:
            shutil.rmtree(full, ignore_errors=True)
        elif self.fs.exists(full):
            self.fs.rm(full, recursive=True)

    def publish(self, built: str, path: str) -> None:
        """Put the hierarchy built at ``built`` in place at ``path``, replacing what is there.

        Locally a rename: the store appears whole or not at all. On an object store, which cannot
        rename, every member is moved first and the group's own ``zarr.json`` last: until it arrives,
        :meth:`has_group` says no store is there, and the next creation clears what a crash left."""
        self.remove(path)
        source, target = self._full(built), self._full(path)
        if not self.remote:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(source, target)
            return
        marker = f"{source}/zarr.json"
        for member in sorted(self.fs.find(source)):
            if member.rstrip("/") != marker:
                self.fs.mv(member, target + member[len(source):])
        self.fs.mv(marker, f"{target}/zarr.json")
        self.remove(built)

    def leftovers(self, path: str, marker: str) -> list[str]:
        """Paths beside ``path`` whose names start with ``<its name><marker>`` (interrupted builds)."""
        parent, _, name = path.rpartition("/")
        return [f"{parent}/{child}" if parent else child for child in self.children(parent)
                if child.startswith(name + marker)]


def as_root(root: StoreRoot | str | Path) -> StoreRoot:
    """``root`` as a :class:`StoreRoot` (paths and URLs are accepted wherever a root is)."""
    return root if isinstance(root, StoreRoot) else StoreRoot(root)


STAGING = ".partial-"  # a folder being written, beside where it goes
REPLACED = ".replaced-"  # the folder a publication moved aside


def staging_folder(folder: Path) -> Path:
    """Where an output folder is written before :func:`publish_folder` puts it in place; leftovers of earlier,
    interrupted writers of ``folder`` are removed first (a replaced folder that never got its successor is
    put back)."""
    folder = Path(folder)
    parent = folder.parent
    if parent.is_dir():
        for leftover in parent.glob(f".{folder.name}{STAGING}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for replaced in sorted(parent.glob(f".{folder.name}{REPLACED}*")):
            if not folder.exists():
                os.rename(replaced, folder)
            else:
                shutil.rmtree(replaced, ignore_errors=True)
    return parent / f".{folder.name}{STAGING}{os.getpid()}"


def publish_folder(staging: Path, folder: Path) -> None:
    """Put the fully written ``staging`` folder in place of ``folder``: a reader sees the old folder or the new
    one, never a mix (renames within one parent folder)."""
    folder = Path(folder)
    aside = folder.parent / f".{folder.name}{REPLACED}{os.getpid()}"
    if folder.exists():
        os.rename(folder, aside)
    os.rename(staging, folder)
    shutil.rmtree(aside, ignore_errors=True)


def check_writable(path: str | Path) -> None:
    """Refuse, before any work, an output path (a file or a folder) that cannot be written: a parent that cannot
    be created, a read-only or forbidden folder; names the path."""
    path = Path(path).absolute()
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        raise InfluenceError(f"{path}: {existing} is a file, not a folder")
    for folder in (existing, path) if path.is_dir() else (existing,):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InfluenceError(f"{path}: {folder} cannot be written (permission denied or a read-only file "
                                 "system)")
