"""``influence evaluate``: evaluations that tell whether a score can be trusted."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InfluenceError
from .common import fail, split_list, warmup_config, warmup_options
from .subsets import unit_options


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
def evaluate_noisy(noise, truncate, proj_dim, grad_batch_size, subsets_k, **settings) -> None:
    """Corrupt part of a pool, warm up on it, and report how well each score finds the corrupted examples."""
    from ..evaluate.noisy import evaluate_noisy as run_noisy

    try:
        table = run_noisy(warmup_config(**settings), noise, truncate, proj_dim, grad_batch_size, subsets_k=subsets_k)
    except InfluenceError as err:
        fail(err)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    click.echo(f"-> {Path(settings['out']) / 'detection.csv'}")


@evaluate.command("lds")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--target", required=True, help="Target registry name or data file.")
@click.option("--target-tasks", default=None, help="Comma-separated subtasks of the target to keep.")
@click.option("--methods", default="less,trak,tracin,datamodel,fz_influence,grand,random", show_default=True,
              help="Comma-separated methods of `rank`, or ranking files (scores.csv / .parquet with id and score).")
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
@unit_options
def evaluate_lds(run_dir, target, target_tasks, methods, k, heldout, subsets, alpha, seed, outcome, bootstrap, leave_out,
                 leave_out_repeats, proj_dim, regression, lambda_reg, worker, max_hours, dry_run, device) -> None:
    """Linear datamodeling score: on held-out subset models (trained here where missing), how well
    each method's summed scores predict the measured target outcome (Spearman per target example,
    mean, bootstrap interval); optionally the leave-some-out check."""
    from ..evaluate.lds import evaluate_lds as run_lds
    from ..units import parse_worker

    names = split_list(methods) or []
    try:
        report = run_lds(run_dir, target, names, k=k, heldout=heldout, subsets=subsets, alpha=alpha, seed=seed,
                         outcome=outcome, target_tasks=split_list(target_tasks), bootstrap=bootstrap, leave_out=leave_out,
                         leave_out_repeats=leave_out_repeats,
                         options={"proj_dim": proj_dim, "regression": regression, "lambda_reg": lambda_reg},
                         worker=parse_worker(worker), max_hours=max_hours, dry_run=dry_run, device=device,
                         say=click.echo)
    except InfluenceError as err:
        fail(err)
    if report is None:  # dry run
        return
    click.echo(report.table.to_string(index=False, float_format=lambda v: f"{v:+.3f}"))
    for note in report.notes:
        click.secho(note, fg="yellow")
    click.echo(f"-> {report.folder}")
