"""The pipeline commands: warmup -> project-grads -> rank (and compare, forward-scores, targets)."""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from ..errors import InfluenceError
from .common import (
    MethodChoice,
    QuantileBand,
    device_option,
    echo_table,
    fail,
    json_option,
    positive_int,
    resumed_config,
    run_option,
    split_list,
    target_tasks_option,
    warmup_config,
    warmup_options,
)


@click.command()
@warmup_options
@click.option("--track-all", is_flag=True,
              help="Evaluate the whole pool after every epoch (training dynamics and forgetting for every example).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out after its last checkpoint.")
@click.option("--dry-run", is_flag=True, help="Print the cost (a training step timed here) and stop; writes nothing.")
def warmup(track_all, resume, dry_run, **settings) -> None:
    """Short LoRA warm-up on a random fraction of the pool; keeps a checkpoint per epoch."""
    from ..train.warmup import launch_rank
    from ..train.warmup import warmup as run_warmup

    context = click.get_current_context()
    try:
        if resume and (Path(settings["out"]) / "manifest.json").is_file():
            given = {name: value for name, value in {**settings, "track_all": track_all}.items()
                     if context.get_parameter_source(name).name != "DEFAULT"}
            config = resumed_config(settings["out"], given)
        else:
            config = warmup_config(**settings, track_all=track_all)
        run = run_warmup(config, resume=resume, dry_run=dry_run)
    except InfluenceError as err:
        fail(err)
    if run is None or launch_rank() != 0:  # a dry run, or a process of a launch that the first one reports for
        return
    m = run.manifest
    click.echo(
        f"warm-up done in {m['wall_seconds']} s: {len(m['warmup_ids'])} of {m['pool_size']} examples, "
        f"{len(m['checkpoints'])} checkpoints, {m['n_truncated']} truncated to {config.max_length} tokens -> {run.path}"
    )


@click.command("project-grads")
@run_option
@click.option("--target", default=None, help="Target registry name (see `influence targets`) or data file.")
@target_tasks_option
@click.option("--proj-dim", default=None,
              help="Projected dimension, or several comma-separated (e.g. 4096,8192): gradients are computed once "
                   "[default: the run's stored dimensions, else 8192].")
@click.option("--seed", default=None, type=int, help="Projection seed [default: the stores', else 0].")
@click.option("--batch-size", default=8, show_default=True, help="Examples per backward pass.")
@click.option("--chunk-size", default=None, type=click.IntRange(min=1),
              help="Examples per stored chunk, the resume unit [default: the stores', else 128].")
@click.option("--skip-train", is_flag=True, help="Only the target (the pool's stores already exist).")
@click.option("--overwrite", is_flag=True, help="Replace stores made with other settings instead of refusing.")
@device_option
@click.option("--train-gradient", default="adam", show_default=True,
              help="Pool features, comma-separated: adam (LESS), sgd (plain gradient, for TracIn), margin (TRAK's "
                   "model-output gradient; the target then gets it too).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes that split the chunks (each with its share of the CPU threads). On GPUs: "
                   "torchrun --nproc-per-node N -m influence project-grads --run-dir RUN ...")
@click.option("--shard", default=None, help="Only chunks c with c % n == i (i/n): a static split for job arrays.")
@click.option("--store", default=None,
              help="Keep the run's gradient stores at this fsspec URL (s3://bucket/x/grads.zarr, gs://...) instead of "
                   "RUN/grads.zarr; recorded in the run for every later command.")
@click.option("--dry-run", is_flag=True, help="Print the cost (measured on one batch here) and stop.")
@json_option
def project_grads(run_dir, target, target_tasks, proj_dim, seed, batch_size, chunk_size, skip_train, overwrite,
                  device, train_gradient, workers, shard, store, dry_run, as_json) -> None:
    """Per-example LoRA gradients of the pool (Adam) and the target (SGD), projected, into Zarr."""
    from ..core.units import parse_worker
    from ..gradients.collect import project_grads as run_project
    from ..gradients.collect import stored_settings

    tasks = split_list(target_tasks)
    try:
        stored = stored_settings(run_dir)  # what the run's stores were made with: nothing to repeat on resume
        seed = stored["seed"] if seed is None else seed
        chunk_size = stored["chunk_size"] if chunk_size is None else chunk_size
        dims = [positive_int(d, "--proj-dim") for d in split_list(proj_dim)] if proj_dim else stored["proj_dim"]
        reports = run_project(run_dir, target, dims, seed, batch_size, chunk_size, tasks,
                              include_train=not skip_train, overwrite=overwrite, device=device,
                              train_gradients=split_list(train_gradient) or [], shard=parse_worker(shard, "--shard"),
                              workers=workers, dry_run=dry_run, store=store)
    except InfluenceError as err:
        fail(err)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in reports], indent=2))
        return
    for r in reports:
        note = f", resumed {r.resumed_chunks} chunks" if r.resumed_chunks else ""
        note += f", {r.busy_chunks} chunks by other processes" if r.busy_chunks else ""
        bad = f", {r.n_nonfinite} NON-FINITE" if r.n_nonfinite else ""
        click.echo(f"{r.dataset:>30} {r.checkpoint}: {r.n_examples} examples, {r.n_truncated} truncated, "
                   f"{r.seconds} s{note}{bad}")


@click.command()
@run_option
@click.option("--target", "targets", multiple=True,
              help="Target registry name or data file (needed by less, bm25, dsir, rds); repeat for several "
                   "(one output folder each, one pass over the pool's gradients).")
@click.option("--method", default="less", show_default=True, type=MethodChoice(),
              help="Target-aware: less, random, bm25, dsir, rds, trak, tracin, memorization, fz_influence, datamodel, "
                   "dsdm; difficulty and noise: grand, el2n, forgetting, nll, ppl, nll_full, entropy, least_confidence, "
                   "mean_margin, min_margin, ifd; diversity: ttr, mtld, distinct1, distinct2, knn_distance, "
                   "prototypicality, semdedup (README: each score's sign and scale).")
@click.option("--fraction", default=0.05, show_default=True,
              help="Fraction of the pool to select (top / bottom), counted as LESS's --percentage: floor(fraction x pool).")
@click.option("--top-k", default=None, type=click.IntRange(min=1), help="Select this many instead (LESS's --max_samples).")
@click.option("--select", "--mode", "mode", default="top", show_default=True,
              type=click.Choice(["top", "bottom", "middle", "below", "above"]),
              help="Which examples to keep: highest/lowest scores, a middle quantile band, or a threshold.")
@click.option("--band", default="0.25,0.75", show_default=True, type=QuantileBand(),
              help="Quantile band for --select middle.")
@click.option("--threshold", default=None, type=float, help="Threshold for --select below/above (e.g. IFD 1).")
@click.option("--learned-threshold", default=None, type=float,
              help="forgetting: token accuracy at which an example counts as learned (default 1.0 = exact match).")
@click.option("--proj-dim", default=None, type=click.IntRange(min=1),
              help="less, grand: which projected dimension to read (default: the only one stored).")
@target_tasks_option
@click.option("--seed", default=None, type=int, help="random, dsir: seed of the draw (default 0).")
@click.option("--subsets", default=None, help="memorization, fz_influence, datamodel, dsdm: which subset models "
              "(`influence subsets train --name`; default fit).")
@click.option("--outcome", default=None, type=click.Choice(["loss", "accuracy", "probability", "margin", "choice_correct"]),
              help="memorization (default accuracy), fz_influence, datamodel (default loss): the measured outcome.")
@click.option("--regression", default=None, type=click.Choice(["lasso", "ridge"]),
              help="datamodel, dsdm: scikit-learn LassoCV (default) or RidgeCV.")
@click.option("--estimator", default=None, type=click.Choice(["datamodel", "trak"]),
              help="dsdm: the datamodel estimate (default datamodel: regression on the subset models).")
@click.option("--lambda-reg", default=None, type=click.FloatRange(min=0),
              help="trak, dsdm --estimator trak: ridge term of the kernel (default 1e-2 x mean diagonal; 0 = traker's).")
@click.option("--diversify", default=None, type=click.Choice(["kcenter", "fl", "filter", "clusters", "quota"]),
              help="Diversity-aware selection of the top: k-center greedy, facility location with the score as quality "
                   "(QDIT), the redundancy filter (DEITA), the best of each k-means cluster, or per-subtask quotas.")
@click.option("--space", default=None, help="Space of diversity (and of knn_distance, prototypicality, semdedup): grads, "
              "grads:<checkpoint>, reps, embed:<model>, or none [default: grads when the run has gradient stores].")
@click.option("--diversity-weight", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="--diversify fl: weight w of facility location against the score (quality).")
@click.option("--min-distance", default=0.1, show_default=True, type=click.FloatRange(0, 2),
              help="--diversify filter: keep an example only if every kept one is farther (cosine distance).")
@click.option("--clusters", default=None, type=click.IntRange(min=1),
              help="k-means clusters for --diversify clusters, prototypicality and semdedup [default: about sqrt(n/2)].")
@click.option("--balance", default="proportional", show_default=True, type=click.Choice(["proportional", "equal"]),
              help="--diversify clusters: each cluster's share of the budget.")
@click.option("--neighbours", default=None, type=click.IntRange(min=1), help="knn_distance: which neighbour (default 5).")
@click.option("--eps", default=None, type=click.FloatRange(0, 1), help="semdedup: duplicates above 1 - eps (default 0.05).")
@click.option("--dask", "dask_address", default=None, is_flag=False, flag_value="local",
              help="less: score on Dask, on a LocalCluster (--dask alone: one worker process per core) or on the "
                   "scheduler at ADDRESS (e.g. tcp://host:8786; workers must see the run's folder).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output folder [default: RUN/rank-<method>-<target>].")
@click.option("--overwrite", is_flag=True, help="Replace another method's or target's ranking in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print each target's summary as JSON instead of the text report.")
@click.option("--hf-dataset", is_flag=True, help="Also write the selection as a Hugging Face dataset folder "
              "(OUT/selected_dataset, for datasets.load_from_disk).")
@click.option("--show", default=0, show_default=True, help="Print this many top examples for a few subtasks.")
@click.option("--show-tasks", default=None, help="Comma-separated subtasks to show (default: first 4).")
def rank(run_dir, targets, method, fraction, top_k, mode, band, threshold, learned_threshold, proj_dim, target_tasks,
         seed, subsets, outcome, regression, estimator, lambda_reg, diversify, space, diversity_weight, min_distance,
         clusters, balance, neighbours, eps, dask_address, out, overwrite, as_json, hf_dataset, show, show_tasks) -> None:
    """Score and rank the pool; write scores.csv, scores.parquet, selected.jsonl, summary.json."""
    from ..scoring import METHODS
    from ..selection.diversify import Diversify
    from ..selection.outputs import example_text, pool_by_id, task_columns, top_for_task
    from ..selection.rank import output_folders, rank_many

    targets = list(targets) or [None]
    if mode not in ("top", "bottom") and click.get_current_context().get_parameter_source("fraction").name == "COMMANDLINE":
        click.secho(f"note: --fraction is not used by --select {mode} (it keeps "
                    f"{'the --band quantiles' if mode == 'middle' else 'the scores ' + mode + ' --threshold'})",
                    fg="yellow", err=True)
    try:
        options = {"learned_threshold": learned_threshold, "proj_dim": proj_dim, "target_tasks": split_list(target_tasks),
                   "seed": seed, "subsets": subsets, "outcome": outcome, "regression": regression,
                   "estimator": estimator, "lambda_reg": lambda_reg, "neighbours": neighbours, "eps": eps,
                   "dask": dask_address}
        if method in METHODS and "clusters" in inspect.signature(METHODS[method]).parameters:
            options["clusters"] = clusters
        plan = Diversify(diversify, diversity_weight, min_distance, clusters, balance) if diversify else None
        tables = rank_many(run_dir, targets, method, fraction, out, mode, band, threshold, top_k, plan, space,
                           overwrite, hf_dataset, **options)
    except (InfluenceError, ValueError) as err:
        fail(err)
    pool = pool_by_id(run_dir) if show else {}
    degenerate = False
    summaries = []
    for (target, table), folder in zip(tables.items(), output_folders(run_dir, method, targets, out)):
        n_selected = sum(1 for _ in open(folder / "selected.jsonl", encoding="utf-8"))
        summary = json.loads((folder / "summary.json").read_text())
        if as_json:
            summaries.append({"folder": str(folder), **summary})
            degenerate = degenerate or any("another influence process" not in w for w in summary.get("warnings", []))
            continue
        rho = summary["length_bias"]["spearman_score_vs_length"]
        click.echo(f"ranked {len(table)} examples with {method}{f' for {target}' if target else ''}; "
                   f"selected {n_selected} ({mode}) -> {folder}"
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
            degenerate = degenerate or "another influence process" not in warning
        unscorable = int((~table["finite"]).sum())
        if unscorable:
            click.secho(f"{unscorable} example(s) could not be scored (non-finite or not presented); ranked last",
                        fg="yellow")
        if show:
            tasks = split_list(show_tasks) or task_columns(table)[:4]
            for task in tasks:
                click.secho(f"\n== top {show} for {target}/{task}", bold=True)
                for _, row in top_for_task(table, task, show).iterrows():
                    score = row[f"task:{task}"]
                    click.echo(f"  {score:+.4f}  {row['id']:<28} {example_text(pool[row['id']], 110)}")
            if not tasks:
                click.secho(f"\n== top {show} by {method}", bold=True)
                for _, row in table.head(show).iterrows():
                    click.echo(f"  {row['score']:+.4f}  {row['id']:<28} {example_text(pool[row['id']], 110)}")
    if as_json:
        click.echo(json.dumps(summaries, indent=2, ensure_ascii=False))
    if degenerate:
        click.secho("the ranking is degenerate (see the warnings above and summary.json); exit status 3", fg="red",
                    err=True)
        sys.exit(3)


@click.command()
@run_option
@click.option("--target", required=True, help="Target registry name or data file.")
@click.option("--methods", default="less,random,bm25,dsir,rds", show_default=True,
              help="Comma-separated methods to rank with and compare.")
@click.option("--reference", default="less", show_default=True, help="The method the others are compared with.")
@click.option("--fraction", default=0.1, show_default=True, help="Top fraction whose overlap is reported.")
@click.option("--proj-dim", default=None, type=click.IntRange(min=1), help="Projected dimension for less/grand.")
@target_tasks_option
@json_option
def compare(run_dir, target, methods, reference, fraction, proj_dim, target_tasks, as_json) -> None:
    """Rank the pool with several methods and compare them: top overlap, score correlation, length bias."""
    from ..selection.compare import compare_methods

    names = split_list(methods) or []
    try:
        if reference not in names:
            raise InfluenceError(f"--reference {reference} is not among --methods")
        table = compare_methods(run_dir, target, names, fraction, reference, proj_dim=proj_dim,
                                target_tasks=split_list(target_tasks))
    except (InfluenceError, ValueError) as err:
        fail(err)
    echo_table(table, as_json)


@click.command("forward-scores")
@run_option
@click.option("--batch-size", default=8, show_default=True)
@click.option("--chunk-size", default=128, show_default=True, help="Examples per stored chunk (resume unit).")
@click.option("--overwrite", is_flag=True, help="Replace stores made with other settings instead of refusing.")
def forward_scores(run_dir, batch_size, chunk_size, overwrite) -> None:
    """Loss/uncertainty scores (nll, ppl, el2n, entropy, margins, IFD, ...) at every checkpoint, one pass."""
    from ..scoring.forward import compute_forward_scores

    try:
        for where in compute_forward_scores(run_dir, batch_size, chunk_size, overwrite):
            click.echo(f"complete: {where}")
    except InfluenceError as err:
        fail(err)


@click.command()
@json_option
def targets(as_json) -> None:
    """List the registered targets (any data file also works as a target)."""
    from ..data.targets import TARGETS

    rows = []
    for spec in TARGETS.values():
        examples = spec.loader()
        rows.append({"name": spec.name, "examples": len(examples), "subtasks": len({e.task for e in examples}),
                     "description": spec.description})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']:<10} {row['examples']:>4} examples, {row['subtasks']:>2} subtasks  {row['description']}")


@click.command("prepare-model")
def prepare_model() -> None:
    """Convert the embedded SmolLM2-135M GGUF to a cached safetensors folder (done once)."""
    from ..models.loading import prepare_smollm2

    try:
        click.echo(str(prepare_smollm2()))
    except InfluenceError as err:
        fail(err)


@click.command()
@run_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(run_dir, as_json) -> None:
    """What a run holds: settings, checkpoints, every store (complete or partial, size), rankings and reports."""
    from ..report.status import run_status, status_text

    try:
        found = run_status(run_dir)
    except InfluenceError as err:
        fail(err)
    click.echo(json.dumps(found, indent=2) if as_json else status_text(found))


@click.command()
@run_option
@click.option("--ranking", default=None, type=click.Path(file_okay=False, exists=True),
              help="The ranking folder to explore [default: the run's first rank-* folder].")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Where to write it [default: RUN/explore_rankings.ipynb].")
def notebook(run_dir, ranking, out) -> None:
    """Copy the package's notebook next to a run, set to explore it (figures, examples, verdicts)."""
    from ..report.notebook import copy_notebook

    try:
        path = copy_notebook(run_dir, ranking, out)
    except InfluenceError as err:
        fail(err)
    click.echo(f"-> {path} (open it with jupyter; needs pip install 'influence[notebooks]')")


@click.command()
@run_option
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="The HTML file [default: RUN/report.html].")
def report(run_dir, out) -> None:
    """A self-contained HTML report of a run (figures embedded, viewable offline): warm-up curves, every
    ranking's figures, agreement between rankings, LDS and selection verdicts."""
    from ..report.html import write_report

    try:
        path = write_report(run_dir, out)
    except InfluenceError as err:
        fail(err)
    click.echo(f"-> {path}")
