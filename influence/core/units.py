"""The one unit-of-work mechanism: independent units, each computed whole and published last, so an
interrupted job resumes at the first unfinished unit and ends identical to an uninterrupted one.

* Per-example passes: a chunk of a :class:`~influence.core.chunks.ChunkedStore` is the unit. Forward scores
  and representations use :func:`~influence.models.passes.fill_pending`; gradient collection
  (``influence.gradients.collect``) walks the same chunks with its own batching, since it projects several
  batches at once.
* Models: one trained model is the unit (subset training, selection retraining). :func:`run_units`
  walks the units, :class:`UnitClaims` lets several processes or machines share them without ever
  working on one unit twice at once, ``--worker i/n`` splits them statically, and a time cap stops
  before a unit that would end past it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
from filelock import FileLock, Timeout

from ..config import setting
from ..errors import InfluenceError
from ..progress import progress_bar


def check_sizes(**sizes: int) -> None:
    """Refuse a non-positive batch size, chunk size or dimension, naming the option."""
    bad = [f"--{name.replace('_', '-')} must be at least 1, got {value}" for name, value in sizes.items()
           if not isinstance(value, int) or value < 1]
    if bad:
        raise InfluenceError("; ".join(bad))


def parse_worker(value: str | None, option: str = "--worker") -> tuple[int, int] | None:
    """``"i/n"`` (this worker's index, 0-based, and the number of workers) or None."""
    if not value:
        return None
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise InfluenceError(f"{option} must look like i/n (e.g. 0/4), got {value!r}") from None
    if count < 1 or not 0 <= index < count:
        raise InfluenceError(f"{option} {value}: need 0 <= i < n")
    return index, count


class WorkerShare(click.ParamType):
    """``i/n`` on the command line: this worker's index (0-based) and the number of workers, as a pair."""

    name = "I/N"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, tuple):
            return value
        try:
            return parse_worker(value, param.opts[0] if param is not None else "--worker")
        except InfluenceError as err:
            self.fail(str(err), param, ctx)


@dataclass(kw_only=True)
class UnitSettings:
    """How a command whose work is units (models to train) runs them."""

    worker: tuple[int, int] | None = setting(
        None, "Take only units u with u % n == i (i/n, e.g. 0/4), for schedulers without a shared file system lock; "
              "otherwise start as many processes as you like on one store.", type=WorkerShare())
    max_hours: float | None = setting(None, "Start no unit that would end after this many hours; rerun to continue.",
                                      min=0, min_open=True)
    dry_run: bool = setting(False, "Print the cost estimate and stop.")

    @property
    def max_seconds(self) -> float | None:
        return None if self.max_hours is None else self.max_hours * 3600


class UnitClaims:
    """Claims on units of work shared by several processes or machines: a unit is claimed by holding
    its lock file in ``folder`` (``filelock``: released by the OS when a process dies, so a crashed
    worker's unit is free again at once and no unit is ever worked on twice at the same time). Locks
    need a file system with working ``flock`` (local disks, NFSv4); elsewhere give each worker a
    static share with ``--worker i/n``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def claim(self, unit: int) -> Iterator[bool]:
        """Yields True while this process holds ``unit``, False when another process holds it."""
        lock = FileLock(str(self.folder / f"unit-{unit:06d}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()


def _work_in_process(queue, function, kwargs: dict, threads: int, index: int, progress: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        queue.put((index, "ok", function(**kwargs, progress=progress and index == 0)))
    except InfluenceError as err:
        queue.put((index, "error", str(err)))


def in_processes(function: Callable, workers: int, kwargs: dict, progress: bool = True) -> list:
    """``function(**kwargs)`` in ``workers`` processes here (each with its share of the CPU threads, the first
    showing progress), which share the work by claims; their results, in process order. A user's error in any
    process is raised here; what the others finished is kept."""
    import multiprocessing

    import torch

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    threads = max(1, torch.get_num_threads() // workers)
    processes = [context.Process(target=_work_in_process, args=(queue, function, kwargs, threads, i, progress))
                 for i in range(workers)]
    for process in processes:
        process.start()
    results = [queue.get() for _ in processes]
    for process in processes:
        process.join()
    errors = [message for _, status, message in results if status == "error"]
    failed = [p.exitcode for p in processes if p.exitcode]
    if errors or failed:
        raise InfluenceError("; ".join(errors) or f"a worker process failed (exit codes {failed}); rerun to finish: "
                             "the units already written are kept")
    return [result for _, _, result in sorted(results, key=lambda r: r[0])]


@dataclass
class UnitReport:
    """What a call of :func:`run_units` did."""

    units: int  # units this worker is responsible for
    done_before: int  # already finished when it started
    done_now: int  # finished by this call
    busy: list[int] = field(default_factory=list)  # held by other workers when their turn came
    left: list[int] = field(default_factory=list)  # not started: the time cap was reached
    seconds: list[float] = field(default_factory=list)  # wall time of each unit finished here


def run_units(units: list[int], is_done: Callable[[int], bool], work: Callable[[int], None], claims: UnitClaims,
              worker: tuple[int, int] | None = None, max_seconds: float | None = None,
              estimate_seconds: float | None = None, progress: bool = True, desc: str = "units") -> UnitReport:
    """Do every unit of ``units`` that is not done: claim it, check again that no one finished it
    meanwhile, ``work(unit)`` (which must publish its result atomically, so that ``is_done`` turns
    true only when it is whole). With ``worker = (i, n)`` only units ``u`` with ``u % n == i``; with
    ``max_seconds`` no unit is started that would end past the cap (expected duration: the mean of
    the units done so far, else ``estimate_seconds``). Resuming is calling it again."""
    mine = [u for u in units if worker is None or u % worker[1] == worker[0]]
    todo = [u for u in mine if not is_done(u)]
    report = UnitReport(len(mine), len(mine) - len(todo), 0)
    started = time.time()
    bar = progress_bar(total=len(mine), initial=report.done_before, desc=desc, unit="unit", disable=not progress)
    try:
        for position, unit in enumerate(todo):
            expected = float(np.mean(report.seconds)) if report.seconds else (estimate_seconds or 0.0)
            if max_seconds is not None and time.time() - started + expected > max_seconds:
                report.left = todo[position:]
                break
            with claims.claim(unit) as held:
                if not held:
                    report.busy.append(unit)
                    continue
                if is_done(unit):  # another worker finished it between our check and our claim
                    bar.update(1)
                    continue
                begun = time.time()
                work(unit)
                report.seconds.append(time.time() - begun)
                report.done_now += 1
            bar.update(1)
    finally:
        bar.close()
    return report
