"""Helpers shared by the command modules: option parsing, errors, the warm-up options."""

from __future__ import annotations

import sys

import click

from ..errors import InfluenceError

DEMO_POOL = ("flan_cot_sample.tsv", "p3_sample.jsonl")


def demo_pool_files() -> list[str]:
    """The embedded demo pool: small samples of FLAN-CoT and P3 (Apache-2.0), vendored in the package."""
    from importlib import resources

    folder = resources.files("influence.resources").joinpath("demo")
    return [str(folder.joinpath(name)) for name in DEMO_POOL]


# Options several commands share, defined once.
run_option = click.option("--run", "--run-dir", "run_dir", required=True, type=click.Path(file_okay=False, exists=True),
                          help="The run folder (made by `influence warmup`); --run-dir is the same (torchrun's own "
                               "parser takes --run for its --run-path).")
target_tasks_option = click.option("--target-tasks", default=None,
                                   help="Comma-separated subtasks of the target(s) to keep.")
device_option = click.option("--device", default=None, help="torch device (default: cuda when available, else cpu).")


def model_loading_options(command):
    """How a base model is loaded when no run says so (generated from :class:`~influence.models.loading.ModelLoading`)."""
    from ..config import click_options
    from ..models.loading import ModelLoading

    return click_options(ModelLoading)(command)


class QuantileBand(click.ParamType):
    """``LOW,HIGH`` quantiles with 0 <= LOW < HIGH <= 1, as a pair of floats."""

    name = "LOW,HIGH"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            low, high = (float(x) for x in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not two quantiles LOW,HIGH (e.g. 0.25,0.75)", param, ctx)
        if not 0 <= low < high <= 1:
            self.fail(f"{value!r}: needs 0 <= LOW < HIGH <= 1", param, ctx)
        return low, high


class MethodChoice(click.ParamType):
    """A scoring method of ``rank``, checked when parsed (the registry is imported only then, so that
    ``--help`` stays fast)."""

    name = "METHOD"

    def convert(self, value, param, ctx):
        from ..scoring import METHODS

        if value not in METHODS:
            self.fail(f"{value!r} is not a method; choose from {', '.join(sorted(METHODS))}", param, ctx)
        return value


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as JSON on stdout (messages go to stderr).")


def echo_table(table, as_json: bool, number_format: str = "{:.3f}") -> None:
    """A results table as text, or as JSON records with ``--json``."""
    if as_json:
        click.echo(table.to_json(orient="records", indent=2))
    else:
        click.echo(table.to_string(index=False, float_format=number_format.format))


def messages_to(as_json: bool):
    """Where progress messages go: stdout, or stderr when stdout carries JSON."""
    return (lambda message: click.echo(message, err=True)) if as_json else click.echo


def split_list(value: str | None) -> list[str] | None:
    """A comma-separated option as a list (None when not given)."""
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


def positive_int(value: str, option: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InfluenceError(f"{option} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise InfluenceError(f"{option} must be a positive integer, got {number}")
    return number


def fail(err: Exception) -> None:
    click.secho(f"error: {err}", fg="red", err=True)
    sys.exit(2)


def warmup_options(command):
    """The warm-up settings (generated from :class:`~influence.train.warmup.WarmupConfig`), shared by
    `warmup` and `evaluate noisy`."""
    from ..config import click_options
    from ..train.warmup import WarmupConfig

    command = click_options(WarmupConfig, exclude=("track_all",))(command)
    command = click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory to create.")(command)
    command = click.option("--train", "train_files", multiple=True,
                           help="Pool data: a file (.jsonl, .json, .tsv, each also .gz; .parquet; .csv), a Hugging Face "
                                "save_to_disk folder (folder:split for one split) or hf:<org>/<name>[:<split>]; repeat for "
                                "several. Default: the embedded demo pool.")(command)
    return click.option("--model", default="smollm2-135m", show_default=True,
                        help="Hugging Face id, local folder, 'smollm2-135m' (embedded) or 'tiny-llama' (tests).")(command)


def warmup_config(model: str, train_files: tuple[str, ...], out: str, track_all: bool = False, **values):
    """A :class:`~influence.train.warmup.WarmupConfig` from the values of :func:`warmup_options`."""
    from ..config import build
    from ..train.warmup import WarmupConfig

    return build(WarmupConfig, values, model=model, train_files=list(train_files) or demo_pool_files(), out=out,
                 track_all=track_all)


def resumed_config(out: str, given: dict):
    """The settings of the run in ``out`` (from its manifest) with the options given on the command line
    over them: ``warmup --resume --out RUN`` needs no flag repeated, and a given flag that differs from
    the run's is refused by the warm-up, naming the setting."""
    from ..config import build
    from ..train.run import Run
    from ..train.warmup import WarmupConfig

    saved = Run(out).manifest["config"]
    model = given.pop("model", None) or saved["model"]
    train_files = list(given.pop("train_files", None) or ()) or saved["train_files"]
    track_all = given.pop("track_all", saved.get("track_all", False))
    return build(WarmupConfig, given, base=saved, model=model, train_files=train_files, out=out, track_all=track_all)
