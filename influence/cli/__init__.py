"""The ``influence`` command line: a thin layer over the Python API, one module per command group."""

from __future__ import annotations

import logging

import click

from . import evaluate, pipeline, subsets
from .common import demo_pool_files

__all__ = ["main", "demo_pool_files"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="influence", prog_name="influence")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Rank instruction-tuning data by its influence on a target task (LESS and friends).

    Typical use: `influence warmup` -> `influence project-grads` -> `influence rank`.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s")


for command in (pipeline.warmup, pipeline.project_grads, pipeline.rank, pipeline.compare, pipeline.forward_scores,
                pipeline.targets, pipeline.prepare_model, subsets.subsets, evaluate.evaluate):
    main.add_command(command)

if __name__ == "__main__":
    main()
