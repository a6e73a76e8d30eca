"""Compare two run folders file by file: are the outputs of two runs of the same commands identical?

    python scripts/compare_runs.py runs/demo-before runs/demo-after

Every file is compared byte for byte, except what records the run itself rather than its results: the
manifest's timings, command line, code commit and folder paths (listed in VOLATILE), and the locks. JSON
files that differ are compared value by value so the report names the keys. Exit status 0 when every
compared file is identical, 1 otherwise. Used to check that a refactoring changed no output (`make demo`
before and after).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# What a run records about how and when it ran, not what it computed.
VOLATILE = {"manifest.json": {"wall_seconds", "started", "finished", "command_line", "influence_commit", "out",
                              "created", "timings", "provenance"}}
# Keys that differ between any two runs by design, in every JSON file: the run's random id (stores and rankings
# record it to refuse other runs' files).
ANYWHERE = {"run_id"}
SKIPPED = (".locks", ".influence.lock")


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
            and not any(part in SKIPPED for part in p.relative_to(folder).parts)}


def json_differences(a, b, path: str = "", ignore: set[str] = frozenset()) -> list[str]:
    """Paths of the values that differ between two JSON documents (keys in ``ignore`` skipped at any depth)."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b)):
            if key in ignore:
                continue
            found += json_differences(a.get(key), b.get(key), f"{path}.{key}" if path else key, ignore)
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in json_differences(x, y, f"{path}[{i}]", ignore)]
    return [] if a == b else [path or "(whole document)"]


def compare(before: Path, after: Path) -> tuple[int, list[str]]:
    """(files compared, problems)."""
    a, b = files(before), files(after)
    problems = [f"only in {before}: {name}" for name in sorted(a - b)] + [f"only in {after}: {name}" for name in sorted(b - a)]
    same = 0
    for name in sorted(a & b):
        left, right = (before / name).read_bytes(), (after / name).read_bytes()
        if left == right:
            same += 1
            continue
        if name.endswith(".json"):
            ignore = VOLATILE.get(Path(name).name, set()) | ANYWHERE
            differing = json_differences(json.loads(left), json.loads(right), ignore=ignore)
            # paths written into a run name its own folder: equal once each run's folder is taken out
            differing = [d for d in differing if not _same_but_folder(json.loads(left), json.loads(right), d,
                                                                      str(before.resolve()), str(after.resolve()))]
            if not differing:
                same += 1
                continue
            problems.append(f"{name}: differs at {', '.join(differing[:6])}")
        else:
            problems.append(f"{name}: bytes differ" + _text_lines(left, right))
    return same, problems


def _text_lines(left: bytes, right: bytes, most: int = 6) -> str:
    """The lines of two text files that differ (embedded images compared whole), or nothing for binary files."""
    import difflib
    import re

    try:
        a, b = (re.sub(r"base64,[A-Za-z0-9+/=]+", lambda m: f"<image {hash(m.group(0)) & 0xffff:04x}>", x.decode("utf-8"))
                for x in (left, right))
    except UnicodeDecodeError:
        return ""
    changed = [line[:200] for line in difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return ":\n    " + "\n    ".join(changed[:most]) + (f"\n    ... {len(changed) - most} more" if len(changed) > most else "")


def _same_but_folder(a, b, path: str, folder_a: str, folder_b: str) -> bool:
    def value(doc):
        for part in path.replace("]", "").replace("[", ".").split("."):
            doc = doc[int(part)] if isinstance(doc, list) else doc.get(part) if isinstance(doc, dict) else None
        return doc

    x, y = value(a), value(b)
    return isinstance(x, str) and isinstance(y, str) and x.replace(folder_a, "RUN") == y.replace(folder_b, "RUN")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    same, problems = compare(args.before, args.after)
    for problem in problems:
        print(problem)
    print(f"{same} files identical, {len(problems)} differing or missing ({args.before} vs {args.after})")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
