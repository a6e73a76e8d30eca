"""The ``influence`` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .errors import InfluenceError

DEMO_POOL = ("flan_cot_sample.tsv", "p3_sample.jsonl")


def demo_pool_files() -> list[str]:
    """The embedded demo pool: small samples of FLAN-CoT and P3 (Apache-2.0), vendored in the package."""
    from importlib import resources

    folder = resources.files("influence.resources").joinpath("demo")
    return [str(folder.joinpath(name)) for name in DEMO_POOL]


def _split(value: str | None) -> list[str] | None:
    """A comma-separated option as a list (None when not given)."""
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


def _positive_int(value: str, option: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InfluenceError(f"{option} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise InfluenceError(f"{option} must be a positive integer, got {number}")
    return number


def _fail(err: Exception) -> None:
    click.secho(f"error: {err}", fg="red", err=True)
    sys.exit(2)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Rank instruction-tuning data by its influence on a target task (LESS and friends).

    Typical use: `influence warmup` -> `influence project-grads` -> `influence rank`.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s")


def warmup_options(command):
    """The warm-up settings, shared by `warmup` and `evaluate noisy`."""
    options = [
        click.option("--model", default="smollm2-135m", show_default=True,
                     help="Hugging Face id, local folder, 'smollm2-135m' (embedded) or 'tiny-llama' (tests)."),
        click.option("--train", "train_files", multiple=True, type=click.Path(dir_okay=False),
                     help="Pool file (.jsonl/.json/.tsv); repeat for several. Default: the embedded demo pool."),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory to create."),
        click.option("--fraction", default=0.05, show_default=True, help="Random fraction of the pool to warm up on."),
        click.option("--epochs", default=4, show_default=True, help="Epochs; one checkpoint is kept per epoch."),
        click.option("--lr", "learning_rate", default=2e-5, show_default=True, help="Peak learning rate (linear decay)."),
        click.option("--warmup-ratio", default=0.03, show_default=True, help="Fraction of steps with linear LR warm-up."),
        click.option("--batch-size", default=1, show_default=True, help="Examples per forward pass."),
        click.option("--grad-accum", default=32, show_default=True, help="Forward passes per optimizer step."),
        click.option("--max-length", default=2048, show_default=True, help="Truncate examples to this many tokens."),
        click.option("--lora-r", default=128, show_default=True),
        click.option("--lora-alpha", default=512.0, show_default=True),
        click.option("--lora-dropout", default=0.1, show_default=True),
        click.option("--lora-modules", default="q_proj,k_proj,v_proj,o_proj", show_default=True,
                     help="Comma-separated module names to adapt."),
        click.option("--seed", default=0, show_default=True, help="Seed of the subset, LoRA init and data order."),
        click.option("--max-grad-norm", default=1.0, show_default=True,
                     help="Clip the gradient norm of each optimizer step (the Trainer default LESS trains with); 0 = off."),
        click.option("--loss-weighting", default="micro_batch", show_default=True,
                     type=click.Choice(["micro_batch", "token"]),
                     help="Under accumulation: each forward pass's mean loss / accumulation steps (Trainer 4.36, "
                          "LESS) or every response token of the step weighted alike (Trainer >= 4.46)."),
        click.option("--bf16", is_flag=True, help="bfloat16 autocast for the forward pass."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _warmup_config(model, train_files, out, fraction, epochs, learning_rate, warmup_ratio, batch_size, grad_accum,
                   max_length, lora_r, lora_alpha, lora_dropout, lora_modules, seed, max_grad_norm, loss_weighting, bf16,
                   track_all=False):
    from .models import LoraSettings
    from .training import WarmupConfig

    return WarmupConfig(
        model=model,
        train_files=list(train_files) or demo_pool_files(),
        out=out,
        lora=LoraSettings(lora_r, lora_alpha, lora_dropout, [m.strip() for m in lora_modules.split(",") if m.strip()]),
        fraction=fraction, epochs=epochs, learning_rate=learning_rate, warmup_ratio=warmup_ratio,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, seed=seed, max_grad_norm=max_grad_norm,
        loss_weighting=loss_weighting, bf16=bf16, track_all=track_all,
    )


@main.command()
@warmup_options
@click.option("--track-all", is_flag=True,
              help="Evaluate the whole pool after every epoch (training dynamics and forgetting for every example).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out after its last checkpoint.")
def warmup(track_all, resume, **settings) -> None:
    """Short LoRA warm-up on a random fraction of the pool; keeps a checkpoint per epoch."""
    from .training import warmup as run_warmup

    try:
        run = run_warmup(_warmup_config(**settings, track_all=track_all), resume=resume)
    except InfluenceError as err:
        _fail(err)
    m = run.manifest
    click.echo(
        f"warm-up done in {m['wall_seconds']} s: {len(m['warmup_ids'])} of {m['pool_size']} examples, "
        f"{len(m['checkpoints'])} checkpoints, {m['n_truncated']} truncated to {settings['max_length']} tokens -> {run.path}"
    )


@main.command("project-grads")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--target", default=None, help="Target registry name (see `influence targets`) or data file.")
@click.option("--target-tasks", default=None, help="Comma-separated subtasks of the target to keep.")
@click.option("--proj-dim", default="8192", show_default=True,
              help="Projected dimension, or several comma-separated (e.g. 4096,8192): gradients are computed once.")
@click.option("--seed", default=0, show_default=True, help="Projection seed.")
@click.option("--batch-size", default=8, show_default=True, help="Examples per backward pass.")
@click.option("--chunk-size", default=128, show_default=True, help="Examples per stored chunk (resume unit).")
@click.option("--skip-train", is_flag=True, help="Only the target (the pool's stores already exist).")
@click.option("--overwrite", is_flag=True, help="Replace stores made with other settings instead of refusing.")
@click.option("--device", default=None, help="torch device (default: cuda when available, else cpu).")
def project_grads(run_dir, target, target_tasks, proj_dim, seed, batch_size, chunk_size, skip_train, overwrite,
                  device) -> None:
    """Per-example LoRA gradients of the pool (Adam) and the target (SGD), projected, into Zarr."""
    from .collect import project_grads as run_project

    tasks = _split(target_tasks)
    try:
        dims = [_positive_int(d, "--proj-dim") for d in _split(proj_dim) or [""]]
        reports = run_project(run_dir, target, dims, seed, batch_size, chunk_size, tasks,
                              include_train=not skip_train, overwrite=overwrite, device=device)
    except InfluenceError as err:
        _fail(err)
    for r in reports:
        note = f", resumed {r.resumed_chunks} chunks" if r.resumed_chunks else ""
        bad = f", {r.n_nonfinite} NON-FINITE" if r.n_nonfinite else ""
        click.echo(f"{r.dataset:>20} {r.checkpoint}: {r.n_examples} examples, {r.n_truncated} truncated, "
                   f"{r.seconds} s{note}{bad}")


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--target", "targets", multiple=True,
              help="Target registry name or data file (needed by less, bm25, dsir, rds); repeat for several "
                   "(one output folder each, one pass over the pool's gradients).")
@click.option("--method", default="less", show_default=True,
              help="less | random | bm25 | dsir | rds | grand | forgetting | nll | ppl | nll_full | el2n | entropy | "
                   "least_confidence | mean_margin | min_margin | ifd")
@click.option("--fraction", default=0.05, show_default=True,
              help="Fraction of the pool to select (top / bottom), counted as LESS's --percentage: floor(fraction x pool).")
@click.option("--top-k", default=None, type=click.IntRange(min=1), help="Select this many instead (LESS's --max_samples).")
@click.option("--select", "mode", default="top", show_default=True,
              type=click.Choice(["top", "bottom", "middle", "below", "above"]),
              help="Which examples to keep: highest/lowest scores, a middle quantile band, or a threshold.")
@click.option("--band", default="0.25,0.75", show_default=True, help="Quantile band for --select middle.")
@click.option("--threshold", default=None, type=float, help="Threshold for --select below/above (e.g. IFD 1).")
@click.option("--learned-threshold", default=None, type=float,
              help="forgetting: token accuracy at which an example counts as learned (default 1.0 = exact match).")
@click.option("--proj-dim", default=None, type=click.IntRange(min=1),
              help="less, grand: which projected dimension to read (default: the only one stored).")
@click.option("--target-tasks", default=None, help="Comma-separated subtasks of the target to rank against.")
@click.option("--seed", default=None, type=int, help="random, dsir: seed of the draw (default 0).")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--show", default=0, show_default=True, help="Print this many top examples for a few subtasks.")
@click.option("--show-tasks", default=None, help="Comma-separated subtasks to show (default: first 4).")
def rank(run_dir, targets, method, fraction, top_k, mode, band, threshold, learned_threshold, proj_dim, target_tasks,
         seed, out, show, show_tasks) -> None:
    """Score and rank the pool; write scores.csv, scores.parquet, selected.jsonl, summary.json."""
    from .selection import example_text, output_folders, pool_by_id, rank_many, task_columns, top_for_task

    targets = list(targets) or [None]
    try:
        low, high = (float(x) for x in band.split(","))
        options = {"learned_threshold": learned_threshold, "proj_dim": proj_dim, "target_tasks": _split(target_tasks),
                   "seed": seed}
        tables = rank_many(run_dir, targets, method, fraction, out, mode, (low, high), threshold, top_k, **options)
    except (InfluenceError, ValueError) as err:
        _fail(err)
    pool = pool_by_id(run_dir) if show else {}
    degenerate = False
    for (target, table), folder in zip(tables.items(), output_folders(run_dir, method, targets, out)):
        n_selected = sum(1 for _ in open(folder / "selected.jsonl", encoding="utf-8"))
        summary = json.loads((folder / "summary.json").read_text())
        rho = summary["length_bias"]["spearman_score_vs_length"]
        click.echo(f"ranked {len(table)} examples with {method}{f' for {target}' if target else ''}; "
                   f"selected {n_selected} ({mode}) -> {folder}"
                   + (f"  [score vs response length: Spearman {rho:+.2f}]" if rho is not None else ""))
        for warning in summary.get("warnings", []):
            click.secho(f"warning: {warning}", fg="yellow", err=True)
            degenerate = degenerate or "another influence process" not in warning
        unscorable = int((~table["finite"]).sum())
        if unscorable:
            click.secho(f"{unscorable} example(s) could not be scored (non-finite or not presented); ranked last",
                        fg="yellow")
        if show:
            tasks = _split(show_tasks) or task_columns(table)[:4]
            for task in tasks:
                click.secho(f"\n== top {show} for {target}/{task}", bold=True)
                for _, row in top_for_task(table, task, show).iterrows():
                    score = row[f"task:{task}"]
                    click.echo(f"  {score:+.4f}  {row['id']:<28} {example_text(pool[row['id']], 110)}")
            if not tasks:
                click.secho(f"\n== top {show} by {method}", bold=True)
                for _, row in table.head(show).iterrows():
                    click.echo(f"  {row['score']:+.4f}  {row['id']:<28} {example_text(pool[row['id']], 110)}")
    if degenerate:
        click.secho("the ranking is degenerate (see the warnings above and summary.json); exit status 3", fg="red",
                    err=True)
        sys.exit(3)


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--target", required=True, help="Target registry name or data file.")
@click.option("--methods", default="less,random,bm25,dsir,rds", show_default=True,
              help="Comma-separated methods to rank with and compare.")
@click.option("--reference", default="less", show_default=True, help="The method the others are compared with.")
@click.option("--fraction", default=0.1, show_default=True, help="Top fraction whose overlap is reported.")
@click.option("--proj-dim", default=None, type=click.IntRange(min=1), help="Projected dimension for less/grand.")
@click.option("--target-tasks", default=None, help="Comma-separated subtasks of the target to rank against.")
def compare(run_dir, target, methods, reference, fraction, proj_dim, target_tasks) -> None:
    """Rank the pool with several methods and compare them: top overlap, score correlation, length bias."""
    from .selection import compare_methods

    names = _split(methods) or []
    try:
        if reference not in names:
            raise InfluenceError(f"--reference {reference} is not among --methods")
        table = compare_methods(run_dir, target, names, fraction, reference, proj_dim=proj_dim,
                                target_tasks=_split(target_tasks))
    except (InfluenceError, ValueError) as err:
        _fail(err)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


@main.command("forward-scores")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--batch-size", default=8, show_default=True)
@click.option("--chunk-size", default=128, show_default=True, help="Examples per stored chunk (resume unit).")
@click.option("--overwrite", is_flag=True, help="Replace stores made with other settings instead of refusing.")
def forward_scores(run_dir, batch_size, chunk_size, overwrite) -> None:
    """Loss/uncertainty scores (nll, ppl, el2n, entropy, margins, IFD, ...) at every checkpoint, one pass."""
    from .scoring.forward import compute_forward_scores

    try:
        for where in compute_forward_scores(run_dir, batch_size, chunk_size, overwrite):
            click.echo(f"complete: {where}")
    except InfluenceError as err:
        _fail(err)


@main.group()
def evaluate() -> None:
    """Evaluations that tell whether a score can be trusted."""


@evaluate.command("noisy")
@warmup_options
@click.option("--noise", default=0.2, show_default=True, help="Fraction of the pool to corrupt.")
@click.option("--truncate", is_flag=True, help="Corrupt half of the chosen examples by truncating responses.")
@click.option("--proj-dim", default=1024, show_default=True, help="Projection dimension for the GraNd pass.")
@click.option("--grad-batch-size", default=8, show_default=True, help="Batch size of the scoring passes.")
def evaluate_noisy(noise, truncate, proj_dim, grad_batch_size, **settings) -> None:
    """Corrupt part of a pool, warm up on it, and report how well each score finds the corrupted examples."""
    from .evaluation import evaluate_noisy as run_noisy

    try:
        table = run_noisy(_warmup_config(**settings), noise, truncate, proj_dim, grad_batch_size)
    except InfluenceError as err:
        _fail(err)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    click.echo(f"-> {Path(settings['out']) / 'detection.csv'}")


@main.command()
def targets() -> None:
    """List the registered targets (any data file also works as a target)."""
    from .targets import TARGETS

    for spec in TARGETS.values():
        examples = spec.loader()
        n_tasks = len({e.task for e in examples})
        click.echo(f"{spec.name:<10} {len(examples):>4} examples, {n_tasks:>2} subtasks  {spec.description}")


@main.command("prepare-model")
def prepare_model() -> None:
    """Convert the embedded SmolLM2-135M GGUF to a cached safetensors folder (done once)."""
    from .models import prepare_smollm2

    try:
        click.echo(str(prepare_smollm2()))
    except InfluenceError as err:
        _fail(err)


if __name__ == "__main__":
    main()
