"""``influence subsets``: the counterfactual engine's models trained on random subsets of the pool."""

from __future__ import annotations

import json

import click

from ..config import build, given_fields, settings_options
from ..core.units import UnitSettings
from ..train.loop import TrainSettings
from ..train.subsets import SubsetSettings
from .common import AsJson, OnDevice, RunFolder, finish, given_values, say_for, wants_json

TRAINING_NOTE = "[default: the warm-up's]"


def training_options(exclude: tuple[str, ...] = ()):
    """The training settings of :class:`~influence.train.loop.TrainSettings`, each defaulting to the run's
    warm-up value (the per-unit seed comes from --seed and the unit); ``exclude`` leaves some out."""
    return settings_options(TrainSettings, optional=True, exclude=("seed", *exclude), defaults_note=TRAINING_NOTE)


@click.group()
def subsets() -> None:
    """Models trained on random subsets of the pool: memorization, datamodels, DsDm, the LDS check."""


@subsets.command("train")
@settings_options(RunFolder)
@settings_options(SubsetSettings)
@settings_options(UnitSettings)
@settings_options(OnDevice)
@training_options()
@settings_options(AsJson)
def train(**values) -> None:
    """Fine-tune K LoRA models from the base model, each on a random alpha-fraction of the pool, and
    record every model's loss, accuracy (and multiple-choice margin) on every pool and target example.

    Resumable (a finished model is never retrained) and shareable: start several processes, or
    machines with a shared folder, on one run and they split the units between them. A set that exists keeps its
    own alpha, seed and targets unless they are given."""
    from ..train.run import Run
    from ..train.subsets import stored_subset_settings, train_subsets

    run_dir = build(RunFolder, values).run_dir
    name = values["name"]
    existing = stored_subset_settings(Run(run_dir), name)  # resuming: the set's own design and targets
    base = {}
    if existing is not None and existing["design"]["kind"] == "random":
        base = {"alpha": existing["design"]["alpha"], "seed": existing["design"]["seed"],
                "targets": [t for t, _ in existing["targets"]],
                "target_tasks": sorted({x for _, tasks in existing["targets"] for x in tasks or []}) or None}
    settings = build(SubsetSettings, given_values(values), base=base)
    say = say_for(values)
    report = train_subsets(run_dir, settings, training=given_fields(TrainSettings, values),
                           units=build(UnitSettings, values), device=build(OnDevice, values).device, say=say)
    for note in report.notes:
        click.secho(note, fg="yellow", err=wants_json(values))
    if report.run is None:
        return
    seconds = report.run.seconds
    mean = f", {sum(seconds) / len(seconds):.1f} s each" if seconds else ""
    finish(values, {"store": str(report.store), "trained_now": report.run.done_now,
                    "done_before": report.run.done_before, "seconds": list(seconds), "notes": report.notes},
           f"trained {report.run.done_now} model(s){mean}; {report.run.done_before} were already done -> {report.store}")


@subsets.command("status")
@settings_options(RunFolder)
@settings_options(AsJson)
def status(**values) -> None:
    """The run's sets of subset models: design, finished units, targets evaluated, training time."""
    from ..train.run import Run
    from ..train.subset_store import SubsetStore, stored_subsets

    run = Run(build(RunFolder, values).run_dir)
    rows = []
    for name in stored_subsets(run.subsets_path):
        store = SubsetStore.open(run.subsets_path, name)
        done = store.done_units()
        seconds = [store.unit_attrs(u).get("seconds", 0) for u in done]
        rows.append({"name": name, "finished": len(done), "design": store.design, "n_pool": store.n_pool,
                     "n_units": store.n_units, "targets": [t["target"] for t in store.targets.values()],
                     "training_seconds": round(sum(seconds), 1)})
    if build(AsJson, values).as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo(f"{run.subsets_path}: no subset models yet (`influence subsets train`)")
    for row in rows:
        design = row["design"]
        what = (f"random, alpha {design['alpha']} ({design['size']} of {row['n_pool']}), seed {design['seed']}"
                if design["kind"] == "random" else f"explicit, {row['n_units']} units")
        seconds = row["training_seconds"]
        click.echo(f"{row['name']}: {row['finished']} finished; {what}; targets: {', '.join(row['targets']) or 'none'}; "
                   f"{seconds / 3600:.2f} h of training ({seconds / max(row['finished'], 1):.1f} s per model)")
