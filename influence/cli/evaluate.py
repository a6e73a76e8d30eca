"""``influence evaluate``: evaluations that tell whether a score can be trusted."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InfluenceError
from .common import (
    echo_table,
    fail,
    json_option,
    messages_to,
    model_loading_options,
    run_option,
    split_list,
    target_tasks_option,
    warmup_config,
    warmup_options,
)
from .subsets import training_options, unit_options


@click.group()
def evaluate() -> None:
    """Evaluations that tell whether a score can be trusted."""


@evaluate.command("noisy")
@warmup_options
@click.option("--noise", default=0.2, show_default=True, help="Fraction of the pool to corrupt.")
@click.option("--truncate", is_flag=True, help="Corrupt half of the chosen examples by truncating responses.")
@click.option("--proj-dim", default=1024, show_default=True, help="Projection dimension for the GraNd pass.")
@click.option("--grad-batch-size", default=8, show_default=True, help="Batch size of the scoring passes.")
@click.option("--subsets-k", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also train this many models on random halves of the noisy pool and score memorization (0 = no).")
@json_option
def evaluate_noisy(noise, truncate, proj_dim, grad_batch_size, subsets_k, as_json, **settings) -> None:
    """Corrupt part of a pool, warm up on it, and report how well each score finds the corrupted examples."""
    from ..evaluate.noisy import evaluate_noisy as run_noisy

    try:
        table = run_noisy(warmup_config(**settings), noise, truncate, proj_dim, grad_batch_size, subsets_k=subsets_k)
    except InfluenceError as err:
        fail(err)
    echo_table(table, as_json)
    messages_to(as_json)(f"-> {Path(settings['out']) / 'detection.csv'}")


@evaluate.command("lds")
@run_option
@click.option("--target", required=True, help="Target registry name or data file.")
@target_tasks_option
@click.option("--methods", default="less,trak,tracin,datamodel,fz_influence,grand,random", show_default=True,
              help="Comma-separated methods of `rank`, ranking files (scores.csv / .parquet with id and score) or "
                   "selections (a selected.jsonl: 1 for its examples, 0 for the others).")
@click.option("--k", default=16, show_default=True, type=click.IntRange(min=3), help="Held-out subset models.")
@click.option("--heldout", default="heldout", show_default=True, help="Name of the held-out subset models.")
@click.option("--subsets", default="fit", show_default=True,
              help="The subset models the datamodels are fit on (their design and training are reused).")
@click.option("--alpha", default=None, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Held-out subset fraction [default: the fit subsets', else 0.5].")
@click.option("--seed", default=None, type=int, help="Held-out subsets' seed [default: the fit subsets' + 1].")
@click.option("--outcome", default="loss", show_default=True,
              type=click.Choice(["loss", "accuracy", "probability", "margin", "choice_correct"]),
              help="The measured outcome on the target (loss: lower is better; the others: higher).")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Bootstrap resamples of the held-out subsets for the interval.")
@click.option("--leave-out", default=None, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Also retrain without each method's top fraction and report the change of the target outcome.")
@click.option("--leave-out-repeats", default=1, show_default=True, type=click.IntRange(min=1),
              help="Models per leave-out mask (different seeds), averaged.")
@click.option("--proj-dim", default=None, type=click.IntRange(min=1), help="Projected dimension for gradient methods.")
@click.option("--regression", default=None, type=click.Choice(["lasso", "ridge"]), help="datamodel: the regression.")
@click.option("--lambda-reg", default=None, type=click.FloatRange(min=0), help="trak: ridge term of the kernel.")
@json_option
@unit_options
def evaluate_lds(run_dir, target, target_tasks, methods, k, heldout, subsets, alpha, seed, outcome, bootstrap, leave_out,
                 leave_out_repeats, proj_dim, regression, lambda_reg, as_json, worker, max_hours, dry_run, device) -> None:
    """Linear datamodeling score: on held-out subset models (trained here where missing), how well
    each method's summed scores predict the measured target outcome (Spearman per target example,
    mean, bootstrap interval); optionally the leave-some-out check."""
    from ..core.units import parse_worker
    from ..evaluate.lds import evaluate_lds as run_lds

    names = split_list(methods) or []
    try:
        report = run_lds(run_dir, target, names, k=k, heldout=heldout, subsets=subsets, alpha=alpha, seed=seed,
                         outcome=outcome, target_tasks=split_list(target_tasks), bootstrap=bootstrap, leave_out=leave_out,
                         leave_out_repeats=leave_out_repeats,
                         options={"proj_dim": proj_dim, "regression": regression, "lambda_reg": lambda_reg},
                         worker=parse_worker(worker), max_hours=max_hours, dry_run=dry_run, device=device,
                         say=messages_to(as_json))
    except InfluenceError as err:
        fail(err)
    if report is None:  # dry run
        return
    echo_table(report.table, as_json, "{:+.3f}")
    for note in report.notes:
        click.secho(note, fg="yellow", err=as_json)
    messages_to(as_json)(f"-> {report.folder}")


@evaluate.command("select")
@click.option("--subsets", "specs", required=True,
              help="Comma-separated subsets to retrain on: full, random, a method of `rank` (its top --fraction), or "
                   "data files (e.g. a selected.jsonl, or LIMA / Alpaca files).")
@click.option("--run", "run_dir", default=None, type=click.Path(file_okay=False, exists=True),
              help="The run whose model, pool and warm-up settings to use (or give --model).")
@click.option("--model", default=None, help="Base model when there is no run (subsets are then data files).")
@click.option("--target", default=None, help="The selection's target: its held-out data is the evaluation "
              "(mmlu_val: MMLU test; bbh: BBH test examples), and evaluation may never share its prompts.")
@target_tasks_option
@click.option("--eval", "eval_files", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Held-out evaluation file (answer NLL; accuracy too where records have 'choices'); repeatable.")
@click.option("--instruction", is_flag=True,
              help="Also evaluate instruction following: reference-answer NLL on Self-Instruct's 252 instructions.")
@click.option("--fraction", default=0.05, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Size of method and random subsets, as a fraction of the pool.")
@click.option("--grid-lr", default="1e-4,5e-4", show_default=True, help="Learning rates of the grid.")
@click.option("--grid-epochs", default="1,3", show_default=True, help="Epoch counts of the grid.")
@click.option("--grid-batch", default="8,32", show_default=True,
              help="Effective batch sizes of the grid (multiples of --batch-size, by gradient accumulation).")
@click.option("--grid-scheduler", default="linear,cosine", show_default=True, help="Schedulers of the grid.")
@click.option("--seeds", default=2, show_default=True, type=click.IntRange(min=1), help="Seeds per setting.")
@click.option("--baselines", default=None, help="Subsets to compare the others with [default: random and full where "
              "given, else the last subset].")
@click.option("--metric", default="nll", show_default=True, type=click.Choice(["nll", "accuracy"]),
              help="The verdict's metric on the first evaluation set (nll: lower is better).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output folder [default: RUN/select-<target>].")
@click.option("--judge", default=None, help="Pairwise judge of the models' answers to Self-Instruct instructions: a "
              "local model (hub id, folder, smollm2-135m) or an OpenAI-compatible URL (with --judge-model; key from "
              "OPENAI_API_KEY). Needs --instruction.")
@click.option("--judge-model", default=None, help="The endpoint's model name, for --judge URL.")
@click.option("--judge-n", default=32, show_default=True, type=click.IntRange(min=1),
              help="Instructions each model answers for the judge.")
@click.option("--judge-max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@json_option
@unit_options
@training_options(exclude=("learning_rate", "epochs", "grad_accum", "scheduler"))
@model_loading_options
def evaluate_select(specs, run_dir, model, target, target_tasks, eval_files, instruction, fraction, grid_lr, grid_epochs,
                    grid_batch, grid_scheduler, seeds, baselines, metric, out, judge, judge_model, judge_n,
                    judge_max_new_tokens, as_json, worker, max_hours, dry_run, device, **overrides) -> None:
    """Retrain on each subset across a hyperparameter grid (several seeds each), evaluate on held-out
    data, and report wins / ties / losses against the baselines and a verdict that survives the grid."""
    from ..config import build, given_fields
    from ..core.units import parse_worker
    from ..evaluate.select import Grid
    from ..evaluate.select import evaluate_select as run_select
    from ..models.loading import ModelLoading
    from ..train.loop import TrainSettings

    try:
        grid = Grid.parse(grid_lr, grid_epochs, grid_batch, grid_scheduler, seeds)
        report = run_select(split_list(specs) or [], run_dir=run_dir, model=model, loading=build(ModelLoading, overrides),
                            target=target,
                            target_tasks=split_list(target_tasks), eval_files=list(eval_files), instruction=instruction,
                            fraction=fraction, grid=grid, settings=given_fields(TrainSettings, overrides),
                            baselines=split_list(baselines), metric=metric, out=out, worker=parse_worker(worker),
                            max_hours=max_hours, dry_run=dry_run, device=device, judge=judge,
                            judge_model=judge_model, judge_n=judge_n, judge_max_new_tokens=judge_max_new_tokens,
                            say=messages_to(as_json))
    except InfluenceError as err:
        fail(err)
    if report is None:  # dry run
        return
    if as_json:
        click.echo((Path(report.folder) / "report.json").read_text(encoding="utf-8"))
    else:
        click.echo(report.text())
    for note in report.notes:
        click.secho(note, fg="yellow", err=as_json)
    messages_to(as_json)(f"-> {report.folder} (report.json, results.csv, summary.csv, wins.csv, report.png)")
