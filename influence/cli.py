"""The ``influence`` command line: a thin layer over the Python API."""

from __future__ import annotations

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


@main.command()
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Hugging Face id, local folder, 'smollm2-135m' (embedded) or 'tiny-llama' (tests).")
@click.option("--train", "train_files", multiple=True, type=click.Path(dir_okay=False),
              help="Pool file (.jsonl/.json/.tsv); repeat for several. Default: the embedded demo pool.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--fraction", default=0.05, show_default=True, help="Random fraction of the pool to warm up on.")
@click.option("--epochs", default=4, show_default=True, help="Epochs; one checkpoint is kept per epoch.")
@click.option("--lr", "learning_rate", default=2e-5, show_default=True, help="Peak learning rate (linear decay).")
@click.option("--warmup-ratio", default=0.03, show_default=True, help="Fraction of steps with linear LR warm-up.")
@click.option("--batch-size", default=1, show_default=True, help="Examples per forward pass.")
@click.option("--grad-accum", default=32, show_default=True, help="Forward passes per optimizer step.")
@click.option("--max-length", default=2048, show_default=True, help="Truncate examples to this many tokens.")
@click.option("--lora-r", default=128, show_default=True)
@click.option("--lora-alpha", default=512.0, show_default=True)
@click.option("--lora-dropout", default=0.1, show_default=True)
@click.option("--lora-modules", default="q_proj,k_proj,v_proj,o_proj", show_default=True,
              help="Comma-separated module names to adapt.")
@click.option("--seed", default=0, show_default=True, help="Seed of the subset, LoRA init and data order.")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast for the forward pass.")
def warmup(model, train_files, out, fraction, epochs, learning_rate, warmup_ratio, batch_size, grad_accum,
           max_length, lora_r, lora_alpha, lora_dropout, lora_modules, seed, bf16) -> None:
    """Short LoRA warm-up on a random fraction of the pool; keeps a checkpoint per epoch."""
    from .models import LoraSettings
    from .training import WarmupConfig, warmup as run_warmup

    config = WarmupConfig(
        model=model,
        train_files=list(train_files) or demo_pool_files(),
        out=out,
        lora=LoraSettings(lora_r, lora_alpha, lora_dropout, [m.strip() for m in lora_modules.split(",") if m.strip()]),
        fraction=fraction, epochs=epochs, learning_rate=learning_rate, warmup_ratio=warmup_ratio,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, seed=seed, bf16=bf16,
    )
    try:
        run = run_warmup(config)
    except InfluenceError as err:
        _fail(err)
    m = run.manifest
    click.echo(
        f"warm-up done in {m['wall_seconds']} s: {len(m['warmup_ids'])} of {m['pool_size']} examples, "
        f"{len(m['checkpoints'])} checkpoints, {m['n_truncated']} truncated to {max_length} tokens -> {run.path}"
    )


@main.command("project-grads")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--target", default=None, help="Target registry name (see `influence targets`) or data file.")
@click.option("--target-tasks", default=None, help="Comma-separated subtasks of the target to keep.")
@click.option("--proj-dim", default=8192, show_default=True, help="Projected dimension.")
@click.option("--seed", default=0, show_default=True, help="Projection seed.")
@click.option("--batch-size", default=8, show_default=True, help="Examples per backward pass.")
@click.option("--chunk-size", default=128, show_default=True, help="Examples per stored chunk (resume unit).")
@click.option("--skip-train", is_flag=True, help="Only the target (the pool's stores already exist).")
@click.option("--overwrite", is_flag=True, help="Replace stores made with other settings instead of refusing.")
def project_grads(run_dir, target, target_tasks, proj_dim, seed, batch_size, chunk_size, skip_train, overwrite) -> None:
    """Per-example LoRA gradients of the pool (Adam) and the target (SGD), projected, into Zarr."""
    from .collect import project_grads as run_project

    tasks = [t.strip() for t in target_tasks.split(",")] if target_tasks else None
    try:
        reports = run_project(run_dir, target, proj_dim, seed, batch_size, chunk_size, tasks,
                              include_train=not skip_train, overwrite=overwrite)
    except InfluenceError as err:
        _fail(err)
    for r in reports:
        note = f", resumed {r.resumed_chunks} chunks" if r.resumed_chunks else ""
        bad = f", {r.n_nonfinite} NON-FINITE" if r.n_nonfinite else ""
        click.echo(f"{r.dataset:>20} {r.checkpoint}: {r.n_examples} examples, {r.n_truncated} truncated, "
                   f"{r.seconds} s{note}{bad}")


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--target", required=True, help="The target whose gradients were projected.")
@click.option("--method", default="less", show_default=True, help="Scoring method.")
@click.option("--fraction", default=0.05, show_default=True, help="Fraction of the pool to select.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--show", default=0, show_default=True, help="Print this many top examples for a few subtasks.")
@click.option("--show-tasks", default=None, help="Comma-separated subtasks to show (default: first 4).")
def rank(run_dir, target, method, fraction, out, show, show_tasks) -> None:
    """Score and rank the pool; write scores.csv, scores.parquet, selected.jsonl, summary.json."""
    from .selection import example_text, pool_by_id, rank as run_rank, task_columns, top_for_task

    try:
        table = run_rank(run_dir, target, method, fraction, out)
    except InfluenceError as err:
        _fail(err)
    out = Path(out) if out else Path(run_dir) / f"rank-{method}-{Path(target).stem}"
    n_selected = sum(1 for _ in open(out / "selected.jsonl", encoding="utf-8"))
    click.echo(f"ranked {len(table)} examples with {method}; selected {n_selected} -> {out}")
    if show:
        pool = pool_by_id(run_dir)
        tasks = [t.strip() for t in show_tasks.split(",")] if show_tasks else task_columns(table)[:4]
        for task in tasks:
            click.secho(f"\n== top {show} for {target}/{task}", bold=True)
            for _, row in top_for_task(table, task, show).iterrows():
                score = row[f"task:{task}"]
                click.echo(f"  {score:+.4f}  {row['id']:<28} {example_text(pool[row['id']], 110)}")


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
