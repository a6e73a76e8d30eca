"""Exceptions with messages a user can act on: each names the file, line or field at fault."""

from __future__ import annotations


class InfluenceError(Exception):
    """Base class for every error this package raises on purpose: a user's mistake, a missing prerequisite, a
    busy run. The command line prints its message and exits with ``exit_code``."""

    exit_code = 2


class DataFormatError(InfluenceError):
    """A training or target file cannot be read; names the file and, where known, the line."""

    def __init__(self, path: str, message: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


class StoreMismatchError(InfluenceError):
    """Two gradient stores (or a store and a request) disagree on a field that must match."""

    def __init__(self, field: str, expected: object, found: object, where: str = ""):
        loc = f" in {where}" if where else ""
        super().__init__(
            f"incompatible gradient store{loc}: field '{field}' is {found!r}, expected {expected!r}"
        )
        self.field = field
        self.expected = expected
        self.found = found


class StoreCorruptError(InfluenceError):
    """Stored chunks whose bytes fail their checksum, cannot be decoded or are missing: names the store, the
    column, the chunks and the rows, and how to recompute just those."""

    def __init__(self, where: str, column: str, chunks: list[int], rows: list[tuple[int, int]], reason: str,
                 remedy: str = ""):
        spans = ", ".join(f"{a}-{b - 1}" for a, b in rows[:4]) + (", ..." if len(rows) > 4 else "")
        super().__init__(f"{where}: chunk{'s' if len(chunks) > 1 else ''} {', '.join(map(str, chunks[:8]))}"
                         f"{', ...' if len(chunks) > 8 else ''} of '{column}' (rows {spans}) {reason}"
                         + (f"; {remedy}" if remedy else ""))
        self.where, self.column, self.chunks, self.rows = where, column, chunks, rows


class RunError(InfluenceError):
    """A run directory is missing, incomplete or would be overwritten."""
