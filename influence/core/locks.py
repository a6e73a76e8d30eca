"""The run's writer lock: one writing command at a time on a run folder, released by the OS when a process dies."""

from __future__ import annotations

import fcntl
import functools
import os
from contextlib import contextmanager
from pathlib import Path

from ..errors import InfluenceError

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
            if not (Path(run_dir) / "manifest.json").is_file():  # not a run: the function's own check says so, and
                # no lock file is left in a folder that is not a run
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
