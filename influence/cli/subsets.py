"""``influence subsets``: the counterfactual engine's models trained on random subsets of the pool."""

from __future__ import annotations

import json

import click

from ..errors import InfluenceError
from .common import device_option, fail, json_option, run_option, split_list, target_tasks_option

TRAINING_NOTE = "[default: the warm-up's]"


def training_options(command=None, *, exclude: tuple[str, ...] = ()):
    """The training settings of :class:`~influence.train.loop.TrainSettings`, each defaulting to the
    run's warm-up value (the per-unit seed comes from --seed and the unit); ``exclude`` leaves some out."""
    from ..config import click_options
    from ..train.loop import TrainSettings

    def decorate(function):
        return click_options(TrainSettings, optional=True, exclude=("seed", *exclude),
                             defaults_note=TRAINING_NOTE)(function)

    return decorate(command) if command is not None else decorate


def unit_options(command):
    """Options of every command that trains units: workers, cap, dry run, device."""
    for option in reversed([
        click.option("--worker", default=None, help="Take only units u with u % n == i (i/n, e.g. 0/4), for schedulers "
                     "without a shared file system lock; otherwise start as many processes as you like on one store."),
        click.option("--max-hours", default=None, type=click.FloatRange(min=0, min_open=True),
                     help="Start no unit that would end after this many hours; rerun to continue."),
        click.option("--dry-run", is_flag=True, help="Print the cost estimate and stop."),
        device_option,
    ]):
        command = option(command)
    return command


@click.group()
def subsets() -> None:
    """Models trained on random subsets of the pool: memorization, datamodels, DsDm, the LDS check."""


@subsets.command("train")
@run_option
@click.option("--k", required=True, type=click.IntRange(min=2),
              help="Number of subset models (units 0..k-1; a larger k adds units).")
@click.option("--alpha", default=None, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Fraction of the pool in each subset [default: the set's own when it exists, else 0.5].")
@click.option("--target", "targets", multiple=True,
              help="Target to evaluate every model on (registry name or file); repeat for several.")
@target_tasks_option
@click.option("--name", default="fit", show_default=True, help="Name of this set of subset models in the run.")
@click.option("--seed", default=None, type=int,
              help="Seed of the subsets and of each unit's training [default: the set's own when it exists, else 0].")
@unit_options
@training_options
def train(run_dir, k, alpha, targets, target_tasks, name, seed, worker, max_hours, dry_run, device, **overrides) -> None:
    """Fine-tune K LoRA models from the base model, each on a random alpha-fraction of the pool, and
    record every model's loss, accuracy (and multiple-choice margin) on every pool and target example.

    Resumable (a finished model is never retrained) and shareable: start several processes, or
    machines with a shared folder, on one run and they split the units between them."""
    from ..config import given_fields
    from ..core.units import parse_worker
    from ..train.loop import TrainSettings
    from ..train.run import Run
    from ..train.subsets import stored_subset_settings, train_subsets

    try:
        settings = given_fields(TrainSettings, overrides)
        existing = stored_subset_settings(Run(run_dir), name)  # resuming: the set's own design and targets
        if existing is not None and existing["design"]["kind"] == "random":
            alpha = existing["design"]["alpha"] if alpha is None else alpha
            seed = existing["design"]["seed"] if seed is None else seed
            if not targets:
                targets = [t for t, _ in existing["targets"]]
                target_tasks = target_tasks or ",".join(sorted({x for _, tasks in existing["targets"] for x in tasks or []})) or None
        report = train_subsets(run_dir, k, 0.5 if alpha is None else alpha, list(targets), name=name,
                               seed=0 if seed is None else seed,
                               target_tasks=split_list(target_tasks), settings=settings, worker=parse_worker(worker),
                               max_hours=max_hours, dry_run=dry_run, device=device, say=click.echo)
    except InfluenceError as err:
        fail(err)
    if report.run is not None:
        seconds = report.run.seconds
        mean = f", {sum(seconds) / len(seconds):.1f} s each" if seconds else ""
        click.echo(f"trained {report.run.done_now} model(s){mean}; {report.run.done_before} were already done -> "
                   f"{report.store}")
    for note in report.notes:
        click.secho(note, fg="yellow")


@subsets.command("status")
@run_option
@json_option
def status(run_dir, as_json) -> None:
    """The run's sets of subset models: design, finished units, targets evaluated, training time."""
    from ..train.run import Run
    from ..train.subset_store import SubsetStore, stored_subsets

    rows = []
    try:
        run = Run(run_dir)
        for name in stored_subsets(run.subsets_path):
            store = SubsetStore.open(run.subsets_path, name)
            done = store.done_units()
            seconds = [store.unit_attrs(u).get("seconds", 0) for u in done]
            rows.append({"name": name, "finished": len(done), "design": store.design, "n_pool": store.n_pool,
                         "n_units": store.n_units, "targets": [t["target"] for t in store.targets.values()],
                         "training_seconds": round(sum(seconds), 1)})
    except InfluenceError as err:
        fail(err)
    if as_json:
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
