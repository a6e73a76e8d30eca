"""``influence evaluate``: evaluations that tell whether a score can be trusted."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InfluenceError
from .common import fail, warmup_config, warmup_options


@click.group()
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
    from ..evaluate.noisy import evaluate_noisy as run_noisy

    try:
        table = run_noisy(warmup_config(**settings), noise, truncate, proj_dim, grad_batch_size)
    except InfluenceError as err:
        fail(err)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    click.echo(f"-> {Path(settings['out']) / 'detection.csv'}")
