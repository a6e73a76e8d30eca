"""Options defined once: every command's settings are a dataclass whose fields carry their flag, help, choices
and range, and the command line (:func:`settings_options`), the ``--config`` file keys (click's own parameters),
the API's keywords (:func:`settings_from`) and the validation (:func:`problems`) are all generated from it.

A field is declared with :func:`setting` (or ``dataclasses.field`` with the same ``metadata`` keys):

* ``help``; ``flag`` (default ``--<name>``) and ``aliases`` (more flags for the same option);
* ``choices``, or a ``Literal[...]`` type: the values allowed (``list`` fields: each element);
* ``min`` / ``max`` with ``min_open`` / ``max_open`` (strict bounds): the range of a number;
* ``nonempty``: a list that must hold something;
* ``list``: a ``list[str]`` given as one comma-separated value; ``multiple``: one given by repeating the flag;
* ``path``: click.Path's keywords (``exists``, ``file_okay``, ``dir_okay``) for a path;
* ``type``: a click parameter type (its ``convert`` also validates API values); ``flag_value``: the value of
  the flag given without one (``--dask`` alone);
* ``prefix``: for a nested settings dataclass, the prefix of its flags (``lora.r`` -> ``--lora-r``);
* ``off_flag``: for a boolean, the flag that sets it False (``--include-train/--skip-train``);
* ``cli``: False for an API-only field.

Validation happens in one place, :func:`problems`, for values from the command line, a config file or the
API alike; messages name the option as a user types it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import click

from .errors import InfluenceError

MISSING = dataclasses.MISSING


def setting(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **metadata: Any) -> Any:
    """A settings field: ``dataclasses.field`` with its help and the metadata described in the module docstring."""
    metadata = {"help": help, **metadata}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Option:
    path: tuple[str, ...]  # field path, e.g. ("lora", "r")
    flag: str  # --lora-r
    default: Any
    help: str
    type: Any  # a click type, or bool for a flag
    is_list: bool
    aliases: tuple[str, ...] = ()  # other flags for the same option (e.g. the field's own name)
    multiple: bool = False
    flag_value: Any = None
    element: Any = str  # the type of a list's elements, converted from the command line's text
    off_flag: str | None = None  # a boolean's other flag (--include-train/--skip-train)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _inner(hint: Any) -> Any:
    """``X`` of ``X | None``; the hint itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def choices_of(hint: Any, meta: dict) -> tuple | None:
    """The values a field allows: its ``choices``, or its ``Literal`` type's (also inside ``list[...]``)."""
    if "choices" in meta:
        return tuple(meta["choices"])
    hint = _inner(hint)
    if typing.get_origin(hint) is list:
        hint = typing.get_args(hint)[0]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _click_type(hint: Any, meta: dict) -> Any:
    if meta.get("list"):  # one comma-separated value, split and checked element by element
        return click.STRING
    if "type" in meta:
        return meta["type"]
    choices = choices_of(hint, meta)
    if choices is not None and not meta.get("list"):
        return click.Choice([str(c) for c in choices])
    hint = _inner(hint)
    if hint is bool:
        return bool
    if "path" in meta:
        return click.Path(**meta["path"])
    if hint in (int, float) and ("min" in meta or "max" in meta):
        ranged = click.IntRange if hint is int else click.FloatRange
        return ranged(meta.get("min"), meta.get("max"), min_open=meta.get("min_open", False),
                      max_open=meta.get("max_open", False))
    return {int: click.INT, float: click.FLOAT}.get(hint, click.STRING)


def _element(hint: Any) -> Any:
    """The element type of a ``list[int]`` / ``list[float]`` field (str otherwise)."""
    hint = _inner(hint)
    if typing.get_origin(hint) is list and typing.get_args(hint)[0] in (int, float):
        return typing.get_args(hint)[0]
    return str


def _fields(cls: type):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init:
            yield f, hints[f.name]


def _flag(f: dataclasses.Field, prefix: str) -> str:
    """A field's command-line flag: ``--<prefix><name with dashes>``, or the ``flag`` it names."""
    return "--" + prefix + f.metadata.get("flag", f.name.replace("_", "-")).lstrip("-")


def options_of(cls: type, prefix: str = "", path: tuple[str, ...] = ()) -> list[Option]:
    """Every CLI option of a settings dataclass, nested dataclasses flattened."""
    options = []
    for f, hint in _fields(cls):
        if f.metadata.get("cli") is False:
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if dataclasses.is_dataclass(hint):
            options += options_of(hint, f.metadata.get("prefix", f.name + "-"), path + (f.name,))
            continue
        flag = _flag(f, prefix)
        is_list = bool(f.metadata.get("list"))
        if is_list and isinstance(default, list):
            default = ",".join(map(str, default))
        aliases = tuple("-" + alias if len(alias) == 1 else "--" + prefix + alias for alias in f.metadata.get("aliases", ()))
        options.append(Option(path + (f.name,), flag, default, f.metadata.get("help", ""),
                              _click_type(hint, f.metadata), is_list, aliases, bool(f.metadata.get("multiple")),
                              f.metadata.get("flag_value"), _element(hint), f.metadata.get("off_flag")))
    return options


def flag_of(cls: type, name: str) -> str:
    """The flag of field ``name`` (dotted for a nested one) as a user types it."""
    for option in options_of(cls):
        if ".".join(option.path) == name:
            return option.flag
    return "--" + name.replace("_", "-").replace(".", "-")


def settings_options(cls: type, optional: bool = False, exclude: tuple[str, ...] = (),
                     defaults_note: str = "") -> Callable:
    """A decorator adding one click option per field of ``cls``. With ``optional`` every option defaults to
    "not given" (None), so a command can take the values it was not given from elsewhere (e.g. subset
    training from the run's warm-up settings); ``exclude`` leaves fields out (by name or dotted path)."""

    def decorate(command):
        for option in reversed(options_of(cls)):
            if option.path[-1] in exclude or ".".join(option.path) in exclude:
                continue
            command = click_option(option, optional, defaults_note)(command)
        return command

    return decorate


def click_option(option: Option, optional: bool = False, defaults_note: str = "", help: str | None = None):
    """The click option of one settings field."""
    help_text = (option.help if help is None else help) + (f" {defaults_note}" if optional and defaults_note else "")
    if option.type is bool:
        if option.off_flag:
            return click.option(f"{option.flag}/--{option.off_flag}", option.dest,
                                default=None if optional else bool(option.default), help=help_text)
        if optional:
            return click.option(f"{option.flag}/--no-{option.flag[2:]}", option.dest, default=None, help=help_text)
        return click.option(option.flag, *option.aliases, option.dest, is_flag=True, default=bool(option.default),
                            help=help_text)
    if option.multiple:
        return click.option(option.flag, *option.aliases, option.dest, type=option.type, multiple=True,
                            help=help_text)
    required = option.default is MISSING and not optional
    default = None if optional or option.default is MISSING else option.default
    extra = {"is_flag": False, "flag_value": option.flag_value} if option.flag_value is not None else {}
    return click.option(option.flag, *option.aliases, option.dest, type=option.type, default=default,
                        required=required, show_default=not optional and default is not None, help=help_text,
                        **extra)


def _cli_value(option: Option, given: Any) -> Any:
    if option.is_list and isinstance(given, str):
        parts = [part.strip() for part in given.split(",") if part.strip()]
        try:
            return [option.element(part) for part in parts]
        except ValueError:
            kind = {int: "whole numbers", float: "numbers"}.get(option.element, "values")
            raise InfluenceError(f"{option.flag} takes comma-separated {kind}, got {given!r}") from None
    if option.multiple:
        return list(given)
    return given


def build(cls: type, values: dict[str, Any], base: Any = None, **fixed: Any) -> Any:
    """An instance of ``cls`` from CLI values keyed by option dest, checked (:func:`check`). A value that is
    None (not given; an empty repeated option) comes from ``base`` (an object or dict with the same field
    names, e.g. a run's warm-up settings), else from the field's default; ``fixed`` sets top-level fields."""
    options = {option.path: option for option in options_of(cls)}
    return check(_build(cls, values, base, (), options, fixed))


def _build(cls: type, values: dict, base: Any, path: tuple[str, ...], options: dict, fixed: dict) -> Any:
    kwargs = {}
    for f, hint in _fields(cls):
        if not path and f.name in fixed:
            kwargs[f.name] = fixed[f.name]
            continue
        inherited = _field_of(base, f.name)
        if dataclasses.is_dataclass(hint):
            nested_base = None if inherited is MISSING else inherited
            kwargs[f.name] = _build(hint, values, nested_base, path + (f.name,), options, fixed)
            continue
        option = options.get(path + (f.name,))
        given = values.get(option.dest) if option is not None else None
        if given is not None and not (option.multiple and not given):
            kwargs[f.name] = _cli_value(option, given)
        elif inherited is not MISSING:
            kwargs[f.name] = inherited
    return cls(**kwargs)


def _field_of(base: Any, name: str) -> Any:
    if isinstance(base, dict):
        return base.get(name, MISSING)
    return getattr(base, name, MISSING) if base is not None else MISSING


def given_fields(cls: type, values: dict[str, Any]) -> dict:
    """The CLI values that were given (not None), as a nested dict keyed by field name."""
    given: dict = {}
    for option in options_of(cls):
        value = values.get(option.dest)
        if value is None or (option.multiple and not value):
            continue
        node = given
        for name in option.path[:-1]:
            node = node.setdefault(name, {})
        node[option.path[-1]] = _cli_value(option, value)
    return given


def from_dict(cls: type, data: dict, base: dict | None = None, where: str = "settings") -> Any:
    """An instance of ``cls`` from ``base`` (a dict of its fields; extra keys ignored) updated with
    ``data`` (field names; nested settings as dicts). A key of ``data`` that is no field is an error."""
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


def settings_from(cls: type, settings: Any = None, /, where: str | None = None, **values: Any) -> Any:
    """The settings an API verb runs with: ``settings`` (an instance of ``cls``, or None for the defaults)
    with the keyword ``values`` over it, checked (:func:`check`). A keyword that is no field of ``cls`` is
    an error naming the known ones."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise InfluenceError(f"{where or cls.__name__}: unknown setting(s) {', '.join(unknown)}; known: "
                             f"{', '.join(names)}")
    if settings is None:
        try:
            settings = cls(**values)
        except TypeError as err:  # a required field left out
            raise InfluenceError(f"{where or cls.__name__}: {err}") from None
    elif values:
        settings = dataclasses.replace(settings, **values)
    return check(settings)


def problems(settings: Any, prefix: str = "") -> list[str]:
    """What is out of range or not allowed in ``settings`` (nested ones too), each named by its flag."""
    found = []
    for f, hint in _fields(type(settings)):
        value = getattr(settings, f.name)
        meta = f.metadata
        if dataclasses.is_dataclass(hint):
            found += problems(value, meta.get("prefix", f.name + "-")) if value is not None else []
            continue
        found += _field_problems(_flag(f, prefix), value, hint, meta)
    extra = getattr(settings, "extra_problems", None)  # what depends on several fields
    return found + (extra() if extra is not None else [])


def _field_problems(flag: str, value: Any, hint: Any, meta: dict) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) and (meta.get("list") or meta.get("multiple")
                                                            or typing.get_origin(_inner(hint)) is list) else [value]
    if meta.get("nonempty") and not values:
        return [f"{flag} names nothing"]
    choices = choices_of(hint, meta)
    if choices is not None:
        bad = [v for v in values if v not in choices]
        if bad:
            return [f"{flag} must be one of {', '.join(map(str, choices))}, got {bad[0]!r}"]
    if "type" in meta and isinstance(meta["type"], click.ParamType):
        for v in values:
            try:
                meta["type"].convert(v, None, None)
            except click.BadParameter as err:
                return [f"{flag}: {err.message}"]
    low, high = meta.get("min"), meta.get("max")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (low is None and high is None):
            continue
        too_low = low is not None and (v <= low if meta.get("min_open") else v < low)
        too_high = high is not None and (v >= high if meta.get("max_open") else v > high)
        if too_low or too_high:
            return [f"{flag} must be {_range_text(low, high, meta)}, got {v}"]
    return []


def _range_text(low, high, meta: dict) -> str:
    if high is None:
        return f"{'above' if meta.get('min_open') else 'at least'} {low}"
    if low is None:
        return f"{'below' if meta.get('max_open') else 'at most'} {high}"
    return f"in {'(' if meta.get('min_open') else '['}{low}, {high}{')' if meta.get('max_open') else ']'}"


def check(settings: Any) -> Any:
    """``settings`` when every field is allowed; else an :class:`InfluenceError` listing what is not."""
    found = problems(settings)
    if found:
        raise InfluenceError("; ".join(found))
    return settings
