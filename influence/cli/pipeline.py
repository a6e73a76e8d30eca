"""The pipeline commands: warmup -> project-grads -> rank (and compare, methods, forward-scores, targets, status,
notebook, report). Each is its settings classes and a few lines over the API."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from ..config import build, setting, settings_options
from ..gradients.collect import ProjectSettings
from ..gradients.curvature import CurvatureSettings
from ..report.html import ReportSettings
from ..report.notebook import NotebookSettings
from ..report.verify import VerifySettings
from ..scoring.forward import ForwardSettings
from ..selection.compare import CompareSettings
from ..selection.settings import RankSettings
from ..train.metagrad import MetagradSettings
from ..train.warmup import WarmupConfig, WarmupRun
from .common import (
    AsJson,
    OneTarget,
    OptionalRunFolder,
    OptionalTarget,
    RunFolder,
    Targets,
    echo_table,
    finish,
    given_method_options,
    given_values,
    method_option_flags,
)


@click.command()
@settings_options(WarmupConfig)
@settings_options(WarmupRun)
@settings_options(AsJson)
def warmup(**values) -> None:
    """Short LoRA warm-up on a random fraction of the pool; keeps a checkpoint per epoch."""
    from ..train.run import Run
    from ..train.warmup import launch_rank
    from ..train.warmup import warmup as run_warmup

    how = build(WarmupRun, values)
    out = values["out"]
    if how.resume and (Path(out) / "manifest.json").is_file():
        # The run's own settings, with the flags given on the command line over them: a given flag that differs
        # from the run's is refused by the warm-up, naming the setting.
        config = build(WarmupConfig, given_values(values), base=Run(out).manifest["config"], out=out)
    else:
        config = build(WarmupConfig, values)
    run = run_warmup(config, resume=how.resume, dry_run=how.dry_run)
    if run is None or launch_rank() != 0:  # a dry run, or a process of a launch that the first one reports for
        return
    m = run.manifest
    finish(values, {"run": str(run.path), "seconds": m["wall_seconds"], "warmup_examples": len(m["warmup_ids"]),
                    "pool_size": m["pool_size"], "checkpoints": [c["name"]
                                                                 for c in m["checkpoints"]],
                    "truncated": m["n_truncated"], "max_length": config.max_length},
           f"warm-up done in {m['wall_seconds']} s: {len(m['warmup_ids'])} of {m['pool_size']} examples, "
           f"{len(m['checkpoints'])} checkpoints, {m['n_truncated']} truncated to {config.max_length} tokens -> "
           f"{run.path}")


@click.command("project-grads")
@settings_options(RunFolder)
@settings_options(OptionalTarget)
@settings_options(ProjectSettings)
@settings_options(AsJson)
def project_grads(**values) -> None:
    """Per-example LoRA gradients of the pool (Adam) and the target (SGD), projected, into Zarr."""
    from ..gradients.collect import project_grads as run_project

    where, target, as_json = build(RunFolder, values), build(OptionalTarget, values), build(AsJson, values)
    reports = run_project(where.run_dir, target.target, build(ProjectSettings, values))
    if as_json.as_json:
        click.echo(json.dumps([asdict(r) for r in reports], indent=2))
        return
    for r in reports:
        note = f", resumed {r.resumed_chunks} chunks" if r.resumed_chunks else ""
        note += f", {r.busy_chunks} chunks by other processes" if r.busy_chunks else ""
        bad = f", {r.n_nonfinite} NON-FINITE" if r.n_nonfinite else ""
        click.echo(f"{r.dataset:>30} {r.checkpoint}: {r.n_examples} examples, {r.n_truncated} truncated, "
                   f"{r.seconds} s{note}{bad}")


@click.command()
@settings_options(RunFolder)
@settings_options(CurvatureSettings)
@settings_options(AsJson)
def curvature(**values) -> None:
    """K-FAC / EK-FAC curvature of the LoRA parameters on the warm-up data, for rank --method ekfac|kfac|ekfac_self."""
    from ..gradients.curvature import fit_curvature

    where = build(RunFolder, values)
    fitted = [str(Path(where.run_dir) / "curvature.zarr" / path)
              for path in fit_curvature(where.run_dir, build(CurvatureSettings, values))]
    finish(values, {"fitted": fitted}, "\n".join(f"curvature fitted: {path}" for path in fitted))


@click.command()
@settings_options(RunFolder)
@settings_options(OneTarget)
@settings_options(MetagradSettings)
@settings_options(AsJson)
def metagrad(**values) -> None:
    """Exact metagradients of the warm-up or a subset model (MAGIC): d target measurement / d weight of every training
    example, for rank --method magic."""
    from ..train.metagrad import metagrad as compute

    where, target = build(RunFolder, values), build(OneTarget, values)
    folder = compute(where.run_dir, target.target, build(MetagradSettings, values))
    if folder is not None:
        meta = json.loads((folder / "meta.json").read_text())
        checked = meta.get("replay_checked_against", "checkpoints")
        finish(values, {"folder": str(folder), **meta},
               f"metagradients of {meta['n_training']} training examples through {meta['steps']} steps in "
               f"{meta['seconds']} s (peak {meta['peak_rss_gb']} GB; replay within "
               f"{meta['replay_relative_difference']:.1g} of the {checked}) -> {folder}")


@dataclass(kw_only=True)
class RankDisplay:
    """What ``rank`` prints."""

    as_json: bool = setting(False, "Print each target's summary as JSON instead of the text report.", flag="json")
    show: int = setting(0, "Print this many top examples for a few subtasks.", min=0)
    show_tasks: list[str] | None = setting(None, "Comma-separated subtasks to show (default: first 4).", list=True)


RANK_OWN = ("space", "clusters", "target_tasks")  # rank's settings that methods share (one flag for both)


@click.command()
@settings_options(RunFolder)
@settings_options(Targets)
@settings_options(RankSettings)
@method_option_flags(exclude=RANK_OWN)
@settings_options(RankDisplay)
def rank(**values) -> None:
    """Score and rank the pool; write scores.csv, scores.parquet, selected.jsonl, summary.json."""
    from ..selection.outputs import example_text, pool_by_id, task_columns, top_for_task
    from ..selection.rank import rank_many

    where, settings, display = build(RunFolder, values), build(RankSettings, values), build(RankDisplay, values)
    targets = build(Targets, values).targets or [None]
    rankings = rank_many(where.run_dir, targets, settings, method_options=given_method_options(values, RANK_OWN))
    pool = pool_by_id(where.run_dir) if display.show else {}
    if display.as_json:
        click.echo(json.dumps([{"folder": str(r.folder), **r.summary} for r in rankings.values()], indent=2,
                              ensure_ascii=False))
    for target, ranking in ([] if display.as_json else rankings.items()):
        summary, table = ranking.summary, ranking.table
        rho = summary["length_bias"]["spearman_score_vs_length"]
        click.echo(f"ranked {len(table)} examples with {settings.method}{f' for {target}' if target else ''}; "
                   f"selected {summary['n_selected']} ({settings.mode}) -> {ranking.folder}"
                   + (f"  [score vs response length: Spearman {rho:+.2f}]" if rho is not None else ""))
        diversity = summary["selection"].get("diversity")
        if diversity:
            parts = ", ".join(f"{name} {diversity[name]['vendi']:.1f}" for name in ("selection", "random", "pool"))
            click.echo(f"  diversity in {diversity['space']}: Vendi score {parts}; clusters covered "
                       f"{diversity['selection']['cluster_coverage']:.0%} (random {diversity['random']['cluster_coverage']:.0%})")
        for note in summary.get("notes", []):
            click.secho(f"note: {note}", fg="yellow", err=True)
        for warning in summary.get("warnings", []):
            click.secho(f"warning: {warning}", fg="yellow", err=True)
        unscorable = int((~table["finite"]).sum())
        if unscorable:
            click.secho(f"{unscorable} example(s) could not be scored (non-finite or not presented); ranked last",
                        fg="yellow")
        if display.show:
            tasks = display.show_tasks or task_columns(table)[:4]
            for task in tasks:
                click.secho(f"\n== top {display.show} for {target}/{task}", bold=True)
                for _, row in top_for_task(table, task, display.show).iterrows():
                    click.echo(f"  {row[f'task:{task}']:+.4f}  {row['id']:<28} {example_text(pool[row['id']], 110)}")
            if not tasks:
                click.secho(f"\n== top {display.show} by {settings.method}", bold=True)
                for _, row in table.head(display.show).iterrows():
                    click.echo(f"  {row['score']:+.4f}  {row['id']:<28} {example_text(pool[row['id']], 110)}")
    if any(r.degenerate for r in rankings.values()):
        click.secho("the ranking is degenerate (see the warnings above and summary.json); exit status 3", fg="red",
                    err=True)
        sys.exit(3)


@click.command()
@settings_options(RunFolder)
@settings_options(OneTarget)
@settings_options(CompareSettings)
@settings_options(AsJson)
def compare(**values) -> None:
    """Rank the pool with several methods and compare them: top overlap, score correlation, length bias."""
    from ..selection.compare import compare_methods

    table = compare_methods(build(RunFolder, values).run_dir, build(OneTarget, values).target,
                            build(CompareSettings, values))
    echo_table(table, build(AsJson, values).as_json)


@click.command()
@settings_options(OptionalRunFolder)
@settings_options(OptionalTarget)
@settings_options(AsJson)
def methods(**values) -> None:
    """The scoring methods of `rank`, by family: what each needs and what its score means (sign and scale). With
    --run (and --target), whether the run has what each needs, or the command that makes it."""
    from ..scoring.base import FAMILIES, FAMILY_TITLES, Target, registry
    from ..train.run import Run

    where, wanted = build(OptionalRunFolder, values), build(OptionalTarget, values).target
    run = Run(where.run_dir) if where.run_dir else None
    target = Target.of(wanted)
    rows = []
    for name, m in sorted(registry().items()):
        row = {"method": name, "family": m.family, "summary": m.summary, "needs": [str(n) for n in m.needs],
               "attribution": m.has_attribution, "options": sorted(f.name for f in m.Options.__dataclass_fields__.values()),
               "meaning": m.meaning}
        if run is not None:
            options = m.options()
            missing = [why for need in m.needs if not need.made_on_demand
                       and (why := need.missing(run, target if m.needs_target else None, options))]
            row["ready"], row["missing"] = not missing, missing
        rows.append(row)
    if build(AsJson, values).as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    indent = " " * 21
    for family in FAMILIES:
        click.secho(f"\n{FAMILY_TITLES[family]}", bold=True)
        for row in (r for r in rows if r["family"] == family):
            meaning = " ".join(row["meaning"].replace("``", "").split())
            click.echo(f"  {row['method']:<18} {row['summary']}\n" + click.wrap_text(
                f"score: {meaning}", 110, initial_indent=indent, subsequent_indent=indent + "  "))
            if run is None:
                click.echo(f"{indent}needs: {'; '.join(row['needs'])}" if row["needs"] else "", nl=bool(row["needs"]))
                continue
            click.echo(f"{indent}-> " + ("ready" if row["ready"] else "needs " + "; ".join(row["missing"])))


@click.command("forward-scores")
@settings_options(RunFolder)
@settings_options(ForwardSettings)
@settings_options(AsJson)
def forward_scores(**values) -> None:
    """Loss/uncertainty scores (nll, ppl, el2n, entropy, margins, IFD, ...) at every checkpoint, one pass."""
    from ..scoring.forward import compute_forward_scores

    stores = [str(where) for where in compute_forward_scores(build(RunFolder, values).run_dir,
                                                             build(ForwardSettings, values))]
    finish(values, {"complete": stores}, "\n".join(f"complete: {where}" for where in stores))


@click.command()
@settings_options(AsJson)
def targets(**values) -> None:
    """List the registered targets (any data file also works as a target)."""
    from ..data.targets import TARGETS

    rows = []
    for spec in TARGETS.values():
        examples = spec.loader()
        rows.append({"name": spec.name, "examples": len(examples), "subtasks": len({e.task for e in examples}),
                     "description": spec.description})
    if build(AsJson, values).as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']:<10} {row['examples']:>4} examples, {row['subtasks']:>2} subtasks  {row['description']}")


@click.command("prepare-model")
@settings_options(AsJson)
def prepare_model(**values) -> None:
    """Convert the embedded SmolLM2-135M GGUF to a cached safetensors folder (done once)."""
    from ..models.loading import prepare_smollm2

    folder = str(prepare_smollm2())
    finish(values, {"model": folder}, folder)


@click.command()
@settings_options(RunFolder)
@settings_options(AsJson)
def status(**values) -> None:
    """What a run holds: settings, checkpoints, every store (complete or partial, size), rankings and reports."""
    from ..report.status import run_status, status_text

    found = run_status(build(RunFolder, values).run_dir)
    click.echo(json.dumps(found, indent=2) if build(AsJson, values).as_json else status_text(found))


@click.command()
@settings_options(RunFolder)
@settings_options(VerifySettings)
@settings_options(AsJson)
def verify(**values) -> None:
    """Check every stored chunk of a run against its checksum and look for every written chunk's file (and every
    trained subset model); exit 4 when something is corrupt or missing. --repair marks it for recomputing."""
    from ..report.verify import verify_run

    report = verify_run(build(RunFolder, values).run_dir, build(VerifySettings, values).repair)
    if build(AsJson, values).as_json:
        click.echo(json.dumps(report.__dict__, indent=2))
    else:
        click.echo(f"checked {report.stores} stores ({report.chunks} chunks) and {report.subset_models} subset models")
        for where in report.unchecksummed:
            click.secho(f"note: {where} was written before checksums: read, but its bytes cannot be verified",
                        fg="yellow")
        for problem in report.problems:
            click.secho(f"corrupt: {problem}", fg="red")
        for repaired in report.repaired:
            click.echo(f"repaired: {repaired}")
    if report.problems and not report.repaired:
        sys.exit(4)


@click.command()
@settings_options(RunFolder)
@settings_options(NotebookSettings)
@settings_options(AsJson)
def notebook(**values) -> None:
    """Copy the package's notebook next to a run, set to explore it (figures, examples, verdicts)."""
    from ..report.notebook import copy_notebook

    settings = build(NotebookSettings, values)
    path = copy_notebook(build(RunFolder, values).run_dir, settings.ranking, settings.out)
    finish(values, {"notebook": str(path)}, f"-> {path} (open it with jupyter; needs pip install 'influence[notebooks]')")


@click.command()
@settings_options(RunFolder)
@settings_options(ReportSettings)
@settings_options(AsJson)
def report(**values) -> None:
    """A self-contained HTML report of a run (figures embedded, viewable offline): warm-up curves, every
    ranking's figures, agreement between rankings, LDS and selection verdicts."""
    from ..report.html import write_report

    settings = build(ReportSettings, values)
    path = write_report(build(RunFolder, values).run_dir, settings.out, settings.main)
    finish(values, {"report": str(path)}, f"-> {path}")
