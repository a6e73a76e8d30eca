"""What a run holds (``influence status --run RUN``): its settings, its checkpoints, every store with how
much of it is complete and its size on disk, and the rankings, selections and reports made from it.

Read-only and cheap: it reads manifests, store attributes and ``done`` flags, never a gradient.
"""

from __future__ import annotations

import json
from pathlib import Path

import zarr

from ..core.chunks import PARTIAL
from ..train.run import Run
from .verify import last_verification


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a store's size on disk)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def chunked_stores(run: Run) -> list[dict]:
    """Every chunked store of the run (gradients, representations, forward scores): where, what, how
    complete, how large. A store being built (not yet published) is listed as such."""
    found = []
    for relative, open_group, size in _store_folders(run):
        if PARTIAL in relative:
            found.append({"store": relative, "state": "being created (or left by an interrupted creation)"})
            continue
        try:
            group = open_group()
            flags = group["done"][:]
        except Exception as err:  # an unreadable store is reported, not fatal: status must always answer
            found.append({"store": relative, "state": f"unreadable ({str(err).splitlines()[0]})"})
            continue
        attrs = dict(group.attrs)
        found.append({
            "store": relative,
            "dataset": attrs.get("dataset"),
            "checkpoint": attrs.get("checkpoint"),
            "gradient_type": attrs.get("gradient_type"),
            "n_examples": attrs.get("n_examples"),
            "chunks_done": int(flags.sum()),
            "chunks": int(flags.size),
            "state": "complete" if flags.all() else "partial (rerun the command to resume)",
            "bytes": size(),
        })
    return found


def _store_folders(run: Run):
    """(name, opener, size) of every chunked store: under the run folder, and where the run keeps its
    gradient stores when elsewhere (``project-grads --store``), named by their path or URL."""
    for done in sorted(run.path.rglob("done/zarr.json")):
        folder = done.parent.parent
        yield (folder.relative_to(run.path).as_posix(), lambda f=folder: zarr.open_group(str(f), mode="r"),
               lambda f=folder: folder_bytes(f))
    root = run.store_path
    outside = Path(root.base)
    if not root.remote and outside.is_dir() and not outside.is_relative_to(run.path.absolute()):
        for done in sorted(outside.rglob("done/zarr.json")):
            folder = done.parent.parent
            yield (str(folder), lambda f=folder: zarr.open_group(str(f), mode="r"), lambda f=folder: folder_bytes(f))
    if root.remote:
        for done in sorted(root.fs.glob(f"{root.base}/**/done/zarr.json")):
            path = done[len(root.base) + 1 : -len("/done/zarr.json")]
            yield (f"{root}/{path}", lambda p=path: root.open_group(p, mode="r"),
                   lambda p=path: int(root.fs.du(f"{root.base}/{p}")))


def run_status(run_dir: str | Path) -> dict:
    """A JSON-able description of the run (see the module docstring)."""
    run = Run(run_dir)
    manifest = run.manifest
    config = manifest["config"]
    status = {
        "run": str(run.path),
        "model": manifest["model"],
        "model_loading": manifest.get("model_loading"),
        "pool": {"files": run.train_files, "examples": manifest.get("pool_size"),
                 "warmed_up_on": len(manifest.get("warmup_ids", []))},
        "warmup": {key: config.get(key) for key in ("epochs", "learning_rate", "batch_size", "grad_accum", "max_length",
                                                    "fraction", "seed", "scheduler", "lora")},
        "warmup_seconds": manifest.get("wall_seconds"),
        "device": manifest.get("device"),
        "checkpoints": [{"name": c["name"], "epoch": c["epoch"], "step": c["step"], "mean_lr": c["mean_lr"]}
                        for c in manifest["checkpoints"]],
        "warmup_complete": len(manifest["checkpoints"]) >= int(config.get("epochs", 0)),
        "stores": chunked_stores(run),
        "subset_models": _subset_models(run),
        "rankings": _outputs(run, "rank-*", "summary.json", ("method", "target", "n_pool", "n_selected"))
        + _outputs(run, "compare-*/*", "summary.json", ("method", "target", "n_pool", "n_selected")),
        "selection_reports": _outputs(run, "select-*", "report.json", ()),
        "lds_reports": _outputs(run, "lds*", "report.json", ()),
        "methods": methods_ready(run),
        "verification": last_verification(run),
        "bytes": folder_bytes(run.path),
    }
    return status


def methods_ready(run: Run) -> dict:
    """Which scoring methods the run can give now (with a target, for those that need one) and, for the others,
    what is missing and which command makes it: from each method's declared needs."""
    from ..scoring.base import TARGET, registry

    ready, waiting = [], {}
    for name, method in sorted(registry().items()):
        options = method.options()
        missing = [why for need in method.needs if need is not TARGET and (why := need.missing(run, None, options))]
        if missing:
            waiting[name] = "; ".join(missing)
        else:
            ready.append(name)
    return {"ready": ready, "waiting": waiting}


def _subset_models(run: Run) -> list[dict]:
    from ..train.subset_store import SubsetStore, stored_subsets

    if not run.subsets_path.is_dir():
        return []
    return [{"name": name, "units_done": len(SubsetStore.open(run.subsets_path, name).done_units()),
             "bytes": folder_bytes(run.subsets_path / name)} for name in stored_subsets(run.subsets_path)]


def _outputs(run: Run, pattern: str, file: str, keys: tuple[str, ...]) -> list[dict]:
    rows = []
    for folder in sorted(p for p in run.path.glob(pattern) if p.is_dir()):
        entry: dict = {"folder": folder.relative_to(run.path).as_posix(), "written": (folder / file).is_file()}
        if entry["written"] and keys:
            try:
                summary = json.loads((folder / file).read_text(encoding="utf-8"))
                entry.update({key: summary.get(key) for key in keys})
            except (json.JSONDecodeError, UnicodeDecodeError):
                entry["written"] = "unreadable"
        rows.append(entry)
    return rows


def status_text(status: dict) -> str:
    """The status as lines for a terminal."""
    mb = 2**20
    lines = [f"run {status['run']}: model {status['model']}"
             + (f" ({status['model_loading']['dtype']})" if status.get("model_loading") else ""),
             f"  pool: {status['pool']['examples']} examples in {len(status['pool']['files'])} file(s); warm-up on "
             f"{status['pool']['warmed_up_on']}",
             f"  warm-up: {status['warmup']}; {len(status['checkpoints'])} checkpoint(s)"
             + ("" if status["warmup_complete"] else " (incomplete: `influence warmup ... --resume`)")
             + (f"; {status['warmup_seconds']:.0f} s" if status.get("warmup_seconds") else "")]
    if status["stores"]:
        lines.append("  stores:")
        for store in status["stores"]:
            if "chunks" in store:
                lines.append(f"    {store['store']}: {store['n_examples']} examples, {store['chunks_done']}/{store['chunks']}"
                             f" chunks, {store['bytes'] / mb:.1f} MB, {store['state']}")
            else:
                lines.append(f"    {store['store']}: {store['state']}")
    for model in status["subset_models"]:
        lines.append(f"  subset models '{model['name']}': {model['units_done']} trained, {model['bytes'] / mb:.1f} MB")
    for ranking in status["rankings"]:
        lines.append(f"  ranking {ranking['folder']}: " + (f"{ranking.get('method')}, {ranking.get('n_selected')} of "
                                                          f"{ranking.get('n_pool')} selected" if ranking["written"] is True
                                                          else "not written"))
    for kind in ("selection_reports", "lds_reports"):
        for report in status[kind]:
            lines.append(f"  {kind.replace('_', ' ')[:-1]} {report['folder']}: "
                         f"{'written' if report['written'] else 'no report yet'}")
    checked = status.get("verification")
    if checked is None:
        lines.append("  integrity: not verified yet (`influence verify --run RUN` checks every stored chunk)")
    else:
        state = f"{len(checked['problems'])} problem(s)" if checked["problems"] else "every chunk sound"
        repaired = f", {len(checked['repaired'])} repaired" if checked["repaired"] else ""
        lines.append(f"  integrity, verified {checked['checked']}: {state}{repaired} ({checked['stores']} stores, "
                     f"{checked['chunks']} chunks, {checked['subset_models']} subset models)")
        lines += [f"    {problem}" for problem in checked["problems"][:10]]
    methods = status["methods"]
    lines.append(f"  methods ready: {', '.join(methods['ready'])}")
    for reason in sorted(set(methods["waiting"].values())):
        names = [name for name, why in methods["waiting"].items() if why == reason]
        lines.append(f"  {', '.join(names)} need{'s' if len(names) == 1 else ''} {reason}")
    lines.append(f"  {status['bytes'] / mb:.1f} MB in all")
    return "\n".join(lines)
