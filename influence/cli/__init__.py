"""The ``influence`` command line: a thin layer over the Python API, one module per command group."""

from __future__ import annotations

import logging

import click

from . import evaluate, pipeline, subsets
from .common import demo_pool_files

__all__ = ["main", "demo_pool_files"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="influence", prog_name="influence")
@click.option("-v", "--verbose", is_flag=True, help="Log influence's debug messages.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (as TQDM_DISABLE=1 does).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="Settings from a TOML or YAML file: a table per command ([warmup], [evaluate.select]...) keyed by "
                   "its options' names (lr = 2e-5); options given on the command line win.")
@click.pass_context
def main(context: click.Context, verbose: bool, quiet: bool, config_file: str | None) -> None:
    """Rank instruction-tuning data by its influence on a target task (LESS and friends).

    Typical use: `influence warmup` -> `influence project-grads` -> `influence rank`.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose:  # our package's debug messages, not every library's
        logging.getLogger("influence").setLevel(logging.DEBUG)
    if config_file:
        from .settings_file import read_settings_file

        context.default_map = read_settings_file(config_file, main)
    if quiet:
        from .. import progress

        progress.QUIET = True


for command in (pipeline.warmup, pipeline.project_grads, pipeline.rank, pipeline.compare, pipeline.forward_scores,
                pipeline.targets, pipeline.prepare_model, pipeline.status, pipeline.notebook, pipeline.report,
                subsets.subsets, evaluate.evaluate):
    main.add_command(command)

if __name__ == "__main__":
    main()
