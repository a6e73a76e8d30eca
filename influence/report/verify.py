"""``influence verify``: every stored chunk of a run read and checked against its checksum, every written chunk's
file looked for, every trained subset model's arrays read; ``--repair`` marks what is corrupt as not written (a
chunk) or removes it (a subset model), so the command that made it recomputes just that on its next run.

The findings are kept in ``RUN/verify.json``, which ``influence status`` shows.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import setting
from ..core.chunks import DECODE_ERRORS, ChunkedStore, checksummed, chunked_stores_under, read_error_reason
from ..core.locks import writer_lock
from ..train.run import Run, atomic_write
from ..train.subset_store import SubsetStore, stored_subsets

REPORT = "verify.json"


@dataclass(kw_only=True)
class VerifySettings:
    repair: bool = setting(False, "Mark corrupt or missing chunks as not written (and remove corrupt subset models), so "
                                  "the commands that made them recompute just those when run again.")


@dataclass
class VerifyReport:
    """What ``verify`` checked and found."""

    stores: int = 0
    chunks: int = 0
    subset_models: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unchecksummed: list[str] = field(default_factory=list)  # stores written before checksums: read, not verified


def verify_run(run_dir: str | Path, repair: bool = False) -> VerifyReport:
    """Check every store and subset model of the run (see the module docstring); with ``repair`` also mark or
    remove what failed, under the run's writer lock (never beside a command writing the same stores). Writes
    ``RUN/verify.json``."""
    run = Run(run_dir)
    if not repair:
        return _verify(run, repair=False)
    with writer_lock(run.path, "verify --repair"):
        return _verify(run, repair=True)


def _verify(run: Run, repair: bool) -> VerifyReport:
    report = VerifyReport()
    root = run.store_path
    for path in chunked_stores_under(root):
        store = ChunkedStore.open(root, path, writable=repair)
        report.stores += 1
        report.chunks += int(store.group["done"][:].sum())
        if not any(checksummed(store.group[name]) for name in store.row_columns()):
            report.unchecksummed.append(store.where)
        found = store.verify()
        report.problems += [str(problem) for problem in found]
        if repair and found:
            bad = sorted({chunk for problem in found for chunk in problem.chunks})
            store.mark_pending(bad)
            report.repaired.append(f"{store.where}: chunks {', '.join(map(str, bad))} marked not written")
    for name in stored_subsets(run.subsets_path):
        store = SubsetStore.open(run.subsets_path, name)
        for unit in store.done_units():
            report.subset_models += 1
            problem = _unit_problem(store, unit)
            if problem is None:
                continue
            report.problems.append(problem)
            if repair:
                shutil.rmtree(store.root / store.unit_path(unit))
                report.repaired.append(f"{store.path}: unit {unit} removed (`influence subsets train` retrains it)")
    record = {"checked": time.strftime("%Y-%m-%dT%H:%M:%S"), **report.__dict__}
    atomic_write(run.path / REPORT, lambda tmp: tmp.write_text(json.dumps(record, indent=2), encoding="utf-8"))
    return report


def _unit_problem(store: SubsetStore, unit: int) -> str | None:
    """Why a trained subset model's arrays cannot be trusted (a checksum mismatch, a missing chunk file), or None."""
    folder = store.root / store.unit_path(unit)
    for name, array in store.unit_group(unit).arrays():
        try:
            array[...]
        except DECODE_ERRORS as err:
            return f"{folder}/{name}: cannot be read ({read_error_reason(err)})"
        if checksummed(array) and not any((folder / name / "c").rglob("*")):
            return f"{folder}/{name}: its chunk file is missing"
    return None


def last_verification(run: Run) -> dict | None:
    """What the last ``influence verify`` of the run found (None when it never ran)."""
    path = run.path / REPORT
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

