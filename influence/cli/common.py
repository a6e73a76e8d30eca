"""What the command modules share: the small settings every command is made of (the run folder, a target, JSON
output, a device), the method options of ``rank`` and ``evaluate lds``, and how results are printed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import click

from ..config import build, click_option, setting
from ..models.loading import device_setting

RUN_HELP = ("The run folder (made by `influence warmup`); --run-dir is the same (torchrun's own parser takes --run for "
            "its --run-path).")


@dataclass(kw_only=True)
class RunFolder:
    run_dir: str = setting(help=RUN_HELP, flag="run", aliases=("run-dir",), path={"file_okay": False, "exists": True})


@dataclass(kw_only=True)
class OptionalRunFolder:
    run_dir: str | None = setting(None, "The run whose model, pool and warm-up settings to use (or give --model).",
                                  flag="run", aliases=("run-dir",), path={"file_okay": False, "exists": True})


@dataclass(kw_only=True)
class OneTarget:
    target: str = setting(help="Target registry name or data file.")


@dataclass(kw_only=True)
class OptionalTarget:
    target: str | None = setting(None, "Target registry name (see `influence targets`) or data file.")


@dataclass(kw_only=True)
class Targets:
    targets: list[str] = setting(default_factory=list, flag="target", multiple=True,
                                 help="Target registry name or data file (needed by the target-aware methods); repeat "
                                      "for several (one output folder each, one pass over the pool's gradients).")


@dataclass(kw_only=True)
class AsJson:
    as_json: bool = setting(False, "Print the result as JSON on stdout (messages go to stderr).", flag="json")


def finish(values: dict[str, Any], result: Any, text: str) -> None:
    """A command's last word: ``result`` as JSON on stdout with --json (a script's input), else ``text``."""
    click.echo(json.dumps(result, indent=2, default=str, ensure_ascii=False) if wants_json(values) else text)


def say_for(values: dict[str, Any]):
    """Where a command's progress messages go: stderr with --json (stdout holds the JSON alone), else stdout."""
    return (lambda message: click.echo(message, err=True)) if wants_json(values) else click.echo


def wants_json(values: dict[str, Any]) -> bool:
    """Whether the command was given --json."""
    return build(AsJson, values).as_json


@dataclass(kw_only=True)
class OnDevice:
    device: str | None = device_setting()


def method_option_flags(exclude: tuple[str, ...] = ()):
    """A decorator adding one flag per option some scoring method takes (from the methods' ``Options``), each
    saying which methods take it and their defaults; ``exclude`` leaves out options the command's own settings
    define (one flag for both)."""

    def decorate(command):
        from ..scoring.base import method_options

        for name, (option, defaults) in reversed(method_options().items()):
            if name in exclude:
                continue
            values = {repr(v) for v in defaults.values()}
            default = (f"; default {next(iter(defaults.values()))}" if len(values) == 1 and None not in defaults.values()
                       else "" if len(values) == 1 else "; default " + ", ".join(f"{m}: {d}" for m, d in defaults.items()))
            help_text = f"{', '.join(defaults)}: {option.help.rstrip('.')}{default}."
            command = click_option(option, optional=True, help=help_text)(command)
        return command

    return decorate


def given_method_options(values: dict[str, Any], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The method options given on the command line (by option name; None = not given)."""
    from ..scoring.base import method_options

    found = {}
    for name, (option, _) in method_options().items():
        value = values.get(option.dest)
        if name not in exclude and value is not None and value != ():  # a repeatable flag not given is ()
            found[name] = list(value) if isinstance(value, tuple) else value
    return found


def given_values(values: dict[str, Any]) -> dict[str, Any]:
    """The command's values that were given (on the command line or in a --config file), not defaults: what
    resuming commands lay over the settings a run or a store already has."""
    context = click.get_current_context()
    return {name: value for name, value in values.items() if context.get_parameter_source(name).name != "DEFAULT"}


def echo_table(table, as_json: bool, number_format: str = "{:.3f}") -> None:
    """A results table as text, or as JSON records with ``--json``."""
    if as_json:
        click.echo(table.to_json(orient="records", indent=2))
    else:
        click.echo(table.to_string(index=False, float_format=number_format.format))


def messages_to(as_json: bool):
    """Where progress messages go: stdout, or stderr when stdout carries JSON."""
    return (lambda message: click.echo(message, err=True)) if as_json else click.echo
