"""Progress bars, decided in one place: every long step shows one through :func:`progress_bar`.

Off with ``influence --quiet``, with ``TQDM_DISABLE=1`` in the environment, or with ``progress=False`` in
the Python API. When stderr is not a terminal (a log file, CI, ``nohup``), a bar writes a plain line
at most every 30 seconds instead of redrawing itself with carriage returns.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

QUIET = False  # set by ``influence --quiet``


def progress_bar(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """A tqdm bar that follows the rules of the module docstring."""
    disable = disable or QUIET or os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
    if not disable and not _is_terminal(sys.stderr):
        kwargs.setdefault("mininterval", 30.0)
        kwargs.setdefault("ascii", True)
        kwargs["file"] = _Lines(sys.stderr)
    return tqdm(iterable, disable=disable, **kwargs)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines (for logs)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()
