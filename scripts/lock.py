"""The lock of tested versions, ``constraints.txt``: written from a virtual environment the suite passed in.

``make lock`` runs the default suite in a new environment with the newest releases that ``pyproject.toml``
allows (``make test-latest``) and, when it passes, writes that environment here::

    python scripts/lock.py write --python .venv-latest/bin/python   # constraints.txt
    python scripts/lock.py diff --python .venv-latest/bin/python    # what the newest releases change

``make setup`` (so ``make test``, ``make demo`` and CI) installs with ``pip install -c constraints.txt``.
Every distribution is pinned exactly, for the Python minor version the lock was made with (other Pythons
get the ranges of ``pyproject.toml``, as ``pip install .`` does), except the builds that depend on the
machine: torch, triton and NVIDIA's CUDA libraries. The Makefile installs torch 2.13.0's CPU wheel on a
CPU machine and leaves CUDA machines the build they have; the tested versions of those are recorded in
the lock's header, not pinned.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "constraints.txt"
# Builds chosen per machine (CPU wheel, a CUDA version), never pinned by the lock.
MACHINE_SPECIFIC = re.compile(r"^(torch|triton|pytorch-triton.*|nvidia-.*|cuda-.*)$")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")


def normalized(name: str) -> str:
    """A distribution's name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def environment(python: str) -> tuple[str, dict[str, str]]:
    """The interpreter's ``major.minor`` and its installed distributions (name -> version), without editables."""
    listing = subprocess.run([python, "-m", "pip", "list", "--format=json", "--exclude-editable"],
                             capture_output=True, text=True, check=True).stdout
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return version, {normalized(row["name"]): row["version"] for row in json.loads(listing)}


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """The pins of a lock file (name -> version)."""
    pins: dict[str, str] = {}
    if not path.is_file():
        return pins
    for line in path.read_text(encoding="utf-8").splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[normalized(match.group(1))] = match.group(2)
    return pins


def write(python: str, out: Path) -> None:
    version, installed = environment(python)
    pinned = {name: v for name, v in installed.items() if not MACHINE_SPECIFIC.match(name)}
    recorded = ", ".join(f"{name} {v}" for name, v in sorted(installed.items()) if MACHINE_SPECIFIC.match(name))
    marker = f'python_version == "{version}"'
    lines = [
        "# The versions the default suite last passed with (`make lock`, scripts/lock.py); used by `make setup`",
        f"# as `pip install -c constraints.txt`. Made with Python {version}: other Pythons get pyproject's ranges.",
        f"# Not pinned (a build per machine): {recorded or 'none installed'}.",
        *(f"{name}=={v} ; {marker}" for name, v in sorted(pinned.items())),
    ]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{out}: {len(pinned)} distributions pinned for Python {version}; not pinned: {recorded or 'none'}")


def diff(python: str, lock: Path) -> None:
    """Print how an environment differs from the lock (what the newest releases would change)."""
    _, installed = environment(python)
    pins = read_lock(lock)
    changed = [(name, pins.get(name, "-"), installed.get(name, "-")) for name in sorted(set(pins) | set(installed))
               if not MACHINE_SPECIFIC.match(name) and pins.get(name) != installed.get(name)]
    if not changed:
        print(f"the environment matches {lock.name}")
    for name, old, new in changed:
        print(f"{name:32s} {old:>14s} -> {new}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("write", "diff"))
    parser.add_argument("--python", default=sys.executable, help="the environment's interpreter")
    parser.add_argument("--lock", type=Path, default=LOCK, help="the lock file (written by `write`)")
    args = parser.parse_args()
    if args.action == "write":
        write(args.python, args.lock)
    else:
        diff(args.python, args.lock)


if __name__ == "__main__":
    main()
