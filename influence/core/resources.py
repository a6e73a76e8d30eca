"""What the machine has, so that a step can refuse before any allocation when it would run out of memory or disk.

Read from the operating system (``/proc/meminfo``'s MemAvailable on Linux, the physical memory elsewhere;
``shutil.disk_usage``) rather than with psutil, which the package does not otherwise need.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import InfluenceError

GiB = 2**30


def available_memory() -> int:
    """Bytes of memory a new allocation can take now (Linux: MemAvailable; elsewhere: the physical memory)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_disk(path: str | Path) -> int:
    """Free bytes on the file system that holds ``path`` (its first existing parent)."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free


def require_room(what: str, needed: int, available: int, kind: str, suggestion: str) -> None:
    """Refuse, naming the numbers, a step that needs more ``kind`` (memory, disk) than there is."""
    if needed > available:
        raise InfluenceError(f"{what} needs ~{needed / GiB:.2f} GiB of {kind}, and {available / GiB:.2f} GiB is "
                             f"available here: {suggestion}")
