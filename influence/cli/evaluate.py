"""``influence evaluate``: evaluations that tell whether a score can be trusted."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import build, given_fields, settings_options
from ..core.units import UnitSettings
from ..evaluate.lds import LdsSettings
from ..evaluate.noisy import NoisySettings
from ..evaluate.select import SelectSettings
from ..models.loading import ModelLoading
from ..train.loop import TrainSettings
from ..train.warmup import WarmupConfig
from .common import (
    AsJson,
    OnDevice,
    OneTarget,
    OptionalRunFolder,
    RunFolder,
    echo_table,
    given_method_options,
    messages_to,
    method_option_flags,
)
from .subsets import training_options

LDS_OWN = ("subsets", "seed", "outcome")  # LdsSettings' own, passed on to the methods that take them


@click.group()
def evaluate() -> None:
    """Evaluations that tell whether a score can be trusted."""


@evaluate.command("noisy")
@settings_options(WarmupConfig, exclude=("track_all",))
@settings_options(NoisySettings)
@settings_options(AsJson)
def evaluate_noisy(**values) -> None:
    """Corrupt part of a pool, warm up on it, and report how well each score finds the corrupted examples."""
    from ..evaluate.noisy import evaluate_noisy as run_noisy

    config, as_json = build(WarmupConfig, values), build(AsJson, values).as_json
    echo_table(run_noisy(config, build(NoisySettings, values)), as_json)
    messages_to(as_json)(f"-> {Path(config.out) / 'detection.csv'}")


@evaluate.command("lds")
@settings_options(RunFolder)
@settings_options(OneTarget)
@settings_options(LdsSettings)
@method_option_flags(exclude=(*LDS_OWN, "device"))  # --device (OnDevice) is also the model-based methods' device
@settings_options(AsJson)
@settings_options(UnitSettings)
@settings_options(OnDevice)
def evaluate_lds(**values) -> None:
    """Linear datamodeling score: on held-out subset models (trained here where missing), how well
    each method's summed scores predict the measured target outcome (Spearman per target example,
    mean, bootstrap interval); optionally the leave-some-out check."""
    from ..evaluate.lds import evaluate_lds as run_lds

    as_json = build(AsJson, values).as_json
    report = run_lds(build(RunFolder, values).run_dir, build(OneTarget, values).target, None,
                     build(LdsSettings, values), options=given_method_options(values, LDS_OWN),
                     units=build(UnitSettings, values), device=build(OnDevice, values).device,
                     say=messages_to(as_json))
    if report is None:  # dry run
        return
    echo_table(report.table, as_json, "{:+.3f}")
    for note in report.notes:
        click.secho(note, fg="yellow", err=as_json)
    messages_to(as_json)(f"-> {report.folder}")


@evaluate.command("select")
@settings_options(OptionalRunFolder)
@settings_options(SelectSettings)
@settings_options(AsJson)
@settings_options(UnitSettings)
@settings_options(OnDevice)
@training_options(exclude=("learning_rate", "epochs", "grad_accum", "scheduler"))
@settings_options(ModelLoading)
def evaluate_select(**values) -> None:
    """Retrain on each subset across a hyperparameter grid (several seeds each), evaluate on held-out
    data, and report wins / ties / losses against the baselines and a verdict that survives the grid."""
    from ..evaluate.select import evaluate_select as run_select

    as_json = build(AsJson, values).as_json
    report = run_select(None, build(SelectSettings, values), run_dir=build(OptionalRunFolder, values).run_dir,
                        loading=build(ModelLoading, values), training=given_fields(TrainSettings, values),
                        units=build(UnitSettings, values), device=build(OnDevice, values).device,
                        say=messages_to(as_json))
    if report is None:  # dry run
        return
    if as_json:
        click.echo((Path(report.folder) / "report.json").read_text(encoding="utf-8"))
    else:
        click.echo(report.text())
    for note in report.notes:
        click.secho(note, fg="yellow", err=as_json)
    messages_to(as_json)(f"-> {report.folder} (report.json, results.csv, summary.csv, wins.csv, report.png)")
