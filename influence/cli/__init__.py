"""The ``influence`` command line: a thin layer over the Python API, one module per command group.

Every command is its settings classes (each option generated from a field, see :mod:`influence.config`) and a
few lines that call the API and print the result. Errors are turned into exit codes in one place,
:class:`Commands`: an :class:`~influence.errors.InfluenceError` (a user's mistake, a missing prerequisite, a busy
run) prints one line and exits 2; ``rank`` exits 3 for a degenerate ranking.
"""

from __future__ import annotations

import errno
import logging
import sys
from dataclasses import dataclass

import click

from ..config import build, setting, settings_options
from ..errors import InfluenceError
from . import evaluate, pipeline, subsets


class Commands(click.Group):
    """The command group, and the one error boundary: typed errors become exit codes here."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """The command line, with two conveniences: ``--config FILE`` may come after the subcommand too (it is the
        group's option, moved before it), and ``rank --method help`` (or ``evaluate lds --method help``) lists the
        methods as ``influence methods`` does, for the run and target given."""
        return super().parse_args(ctx, method_help(config_first(list(args))))

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            command = " ".join(["influence", *sys.argv[1:]]) if sys.argv and "influence" in sys.argv[0] else None
            step = ctx.invoked_subcommand or "the command"
            click.secho(f"interrupted: `{step}` stopped. What it finished is kept (every command resumes from its "
                        "stores and units): rerun " + (f"`{command}`" if command else "the same command") +
                        " to continue.", fg="yellow", err=True)
            sys.exit(130)
        except InfluenceError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(err.exit_code)
        except OSError as err:
            if err.errno not in REFUSALS:
                raise
            click.secho(f"error: {environment_refusal(err)}", fg="red", err=True)
            sys.exit(2)


def config_first(args: list[str]) -> list[str]:
    """``args`` with every ``--config FILE`` / ``--config=FILE`` moved to the front, where the group reads it."""
    moved, rest, index = [], [], 0
    while index < len(args):
        arg = args[index]
        if arg == "--":  # what follows is data, not options
            rest += args[index:]
            break
        if arg == "--config" and index + 1 < len(args):
            moved += args[index : index + 2]
            index += 2
            continue
        (moved if arg.startswith("--config=") else rest).append(arg)
        index += 1
    return moved + rest


HELP_WORDS = ("help", "list", "?")


def method_help(args: list[str]) -> list[str]:
    """``... rank --method help [--run R] [--target T]`` as ``... methods [--run R] [--target T]``."""
    def value_of(index: int, arg: str) -> str | None:
        if arg == "--method" and index + 1 < len(args):
            return args[index + 1]
        return arg.split("=", 1)[1] if arg.startswith("--method=") else None

    asked = any((value or "").lower() in HELP_WORDS for index, arg in enumerate(args) if (value := value_of(index, arg)))
    commands = [index for index, arg in enumerate(args) if arg in ("rank", "evaluate")]
    if not asked or not commands:
        return args
    kept = []
    for flag in ("--run", "--target"):  # the first of each: what `methods` takes
        for index, arg in enumerate(args):
            if arg == flag and index + 1 < len(args):
                kept += args[index : index + 2]
                break
            if arg.startswith(flag + "="):
                kept.append(arg)
                break
    return args[: commands[0]] + ["methods", *kept, *(["--json"] if "--json" in args else [])]


# The file system's refusals, which are the environment's, not a bug: a line naming the path, not a traceback.
REFUSALS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR,
            errno.EISDIR}


def environment_refusal(err: OSError) -> str:
    """One line for an OSError the file system raised: what, where, and what to do."""
    where = err.filename or "a file"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{where}: no space left on the device; free some and rerun: what was written whole is kept and "
                "the command resumes from it")
    return f"{where}: {err.strerror or err}"


@dataclass(kw_only=True)
class GlobalSettings:
    verbose: bool = setting(False, "Log influence's debug messages.", aliases=("v",))
    quiet: bool = setting(False, "No progress bars, ours or the libraries' (transformers' loading bars too).",
                          aliases=("q",))
    config_file: str | None = setting(None, "Settings from a TOML or YAML file: a table per command ([warmup], "
                                            "[evaluate.select]...) keyed by its options' names (lr = 2e-5); options "
                                            "given on the command line win.", flag="config",
                                      path={"exists": True, "dir_okay": False})


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="influence", prog_name="influence")
@settings_options(GlobalSettings)
@click.pass_context
def main(context: click.Context, **values) -> None:
    """Rank instruction-tuning data by its influence on a target task (LESS and friends).

    Typical use: `influence warmup` -> `influence project-grads` -> `influence rank`; `influence methods` lists
    the scoring methods and what their scores mean.
    """
    settings = build(GlobalSettings, values)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if settings.verbose:  # our package's debug messages, not every library's
        logging.getLogger("influence").setLevel(logging.DEBUG)
    if settings.config_file:
        from .settings_file import read_settings_file

        context.default_map = read_settings_file(settings.config_file, main)
    if settings.quiet:
        from .. import progress

        progress.QUIET = True
        silence_library_bars()


def silence_library_bars() -> None:
    """The libraries' progress bars off (transformers' "Loading weights", the hub's, datasets'): their environment
    switches for the libraries not imported yet (each reads it once, at import), their functions for those that are."""
    import os

    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ[name] = "1"
    if "transformers" in sys.modules:  # its switch turns the hub's bars off too
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


for command in (pipeline.warmup, pipeline.project_grads, pipeline.curvature, pipeline.metagrad, pipeline.rank, pipeline.compare, pipeline.methods,
                pipeline.forward_scores, pipeline.targets, pipeline.prepare_model, pipeline.status, pipeline.verify,
                pipeline.notebook,
                pipeline.report, subsets.subsets, evaluate.evaluate):
    main.add_command(command)

__all__ = ["main"]

if __name__ == "__main__":
    main()
