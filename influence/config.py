"""Options defined once: settings are dataclasses whose fields carry their CLI flag and help, and the
command line is generated from them (:func:`click_options`, :func:`build`).

A field's ``metadata`` may hold ``flag`` (default ``--<name>``), ``aliases`` (more flags), ``help``,
``choices``, ``min`` / ``max``
(with ``min_open``: strict lower bound) and ``list`` (a comma-separated CLI value for a ``list[str]``
field). A field whose default is a dataclass is flattened with a prefix (``lora.r`` -> ``--lora-r``).
With ``optional=True`` every option defaults to "not given" (None), so a command can take the values
it was not given from elsewhere (e.g. subset training from the run's warm-up settings).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click


@dataclass(frozen=True)
class Option:
    path: tuple[str, ...]  # field path, e.g. ("lora", "r")
    flag: str  # --lora-r
    default: Any
    help: str
    type: Any  # a click type, or bool for a flag
    is_list: bool
    aliases: tuple[str, ...] = ()  # other flags for the same option (e.g. the field's own name)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _click_type(hint: Any, meta: dict) -> Any:
    if "choices" in meta:
        return click.Choice(list(meta["choices"]))
    if hint is bool:
        return bool
    if hint in (int, float) and ("min" in meta or "max" in meta):
        ranged = click.IntRange if hint is int else click.FloatRange
        return ranged(meta.get("min"), meta.get("max"), min_open=meta.get("min_open", False),
                      max_open=meta.get("max_open", False))
    return {int: click.INT, float: click.FLOAT}.get(hint, click.STRING)


def options_of(cls: type, prefix: str = "", path: tuple[str, ...] = ()) -> list[Option]:
    """Every CLI option of a settings dataclass, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    options = []
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        hint = hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(hint):
            options += options_of(hint, f.metadata.get("prefix", f.name + "-"), path + (f.name,))
            continue
        flag = "--" + prefix + f.metadata.get("flag", f.name.replace("_", "-")).lstrip("-")
        is_list = bool(f.metadata.get("list"))
        if is_list and isinstance(default, list):
            default = ",".join(default)
        aliases = tuple("--" + prefix + alias for alias in f.metadata.get("aliases", ()))
        options.append(Option(path + (f.name,), flag, default, f.metadata.get("help", ""),
                              _click_type(hint, f.metadata), is_list, aliases))
    return options


def click_options(cls: type, optional: bool = False, exclude: tuple[str, ...] = (),
                  defaults_note: str = "") -> Callable:
    """A decorator adding one click option per field of ``cls`` (see the module docstring)."""

    def decorate(command):
        for option in reversed(options_of(cls)):
            if option.path[-1] in exclude or ".".join(option.path) in exclude:
                continue
            help_text = option.help + (f" {defaults_note}" if optional and defaults_note else "")
            if option.type is bool:
                if optional:
                    decl = f"{option.flag}/--no-{option.flag[2:]}"
                    command = click.option(decl, option.dest, default=None, help=help_text)(command)
                else:
                    command = click.option(option.flag, *option.aliases, option.dest, is_flag=True,
                                           default=bool(option.default), help=help_text)(command)
                continue
            required = option.default is dataclasses.MISSING and not optional
            default = None if optional or option.default is dataclasses.MISSING else option.default
            command = click.option(option.flag, *option.aliases, option.dest, type=option.type, default=default,
                                   required=required, show_default=not optional and default is not None,
                                   help=help_text)(command)
        return command

    return decorate


def build(cls: type, values: dict[str, Any], base: Any = None, **fixed: Any) -> Any:
    """An instance of ``cls`` from CLI values keyed by option dest. A value that is None (not given)
    comes from ``base`` (an object or dict with the same field names, e.g. a run's warm-up settings), else
    from the field's default; ``fixed`` sets top-level fields directly."""
    options = {option.path: option for option in options_of(cls)}
    return _build(cls, values, base, (), options, fixed)


def _build(cls: type, values: dict, base: Any, path: tuple[str, ...], options: dict, fixed: dict) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if not path and f.name in fixed:
            kwargs[f.name] = fixed[f.name]
            continue
        inherited = _field_of(base, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            nested_base = None if inherited is dataclasses.MISSING else inherited
            kwargs[f.name] = _build(hints[f.name], values, nested_base, path + (f.name,), options, fixed)
            continue
        option = options.get(path + (f.name,))
        given = values.get(option.dest) if option is not None else None
        if given is not None:
            kwargs[f.name] = [part.strip() for part in given.split(",") if part.strip()] if option.is_list else given
        elif inherited is not dataclasses.MISSING:
            kwargs[f.name] = inherited
    return cls(**kwargs)


def _field_of(base: Any, name: str) -> Any:
    if isinstance(base, dict):
        return base.get(name, dataclasses.MISSING)
    return getattr(base, name, dataclasses.MISSING) if base is not None else dataclasses.MISSING


def given_fields(cls: type, values: dict[str, Any]) -> dict:
    """The CLI values that were given (not None), as a nested dict keyed by field name."""
    given: dict = {}
    for option in options_of(cls):
        value = values.get(option.dest)
        if value is None:
            continue
        if option.is_list:
            value = [part.strip() for part in value.split(",") if part.strip()]
        node = given
        for name in option.path[:-1]:
            node = node.setdefault(name, {})
        node[option.path[-1]] = value
    return given


def from_dict(cls: type, data: dict, base: dict | None = None, where: str = "settings") -> Any:
    """An instance of ``cls`` from ``base`` (a dict of its fields; extra keys ignored) updated with
    ``data`` (field names; nested settings as dicts). A key of ``data`` that is no field is an error."""
    from .errors import InfluenceError

    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InfluenceError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(names)}")
    base = base or {}
    kwargs = {}
    for name in names:
        if dataclasses.is_dataclass(hints[name]):
            if name in data or name in base:
                kwargs[name] = from_dict(hints[name], _as_dict(data.get(name)), _as_dict(base.get(name)), f"{where}.{name}")
        elif name in data:
            kwargs[name] = data[name]
        elif name in base:
            kwargs[name] = base[name]
    return cls(**kwargs)


def _as_dict(value: Any) -> dict:
    if value is None:
        return {}
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)


def settings_dict(settings: Any) -> dict:
    """A settings dataclass as plain JSON-able data (for manifests and store metadata)."""
    return dataclasses.asdict(settings)
