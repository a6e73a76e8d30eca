"""Settings from a file (``influence --config FILE ...``): TOML or YAML, a table per command whose keys
are its options' names, e.g.::

    [warmup]
    model = "smollm2-135m"
    lr = 2e-5
    lora_r = 8
    train = ["pool.jsonl"]

    [evaluate.select]
    grid_lr = "1e-4,5e-4"

They become click's defaults (``default_map``), so an option given on the command line wins. An unknown
command or option in the file is an error naming the file and the key, before anything runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def read_settings_file(path: str, group: click.Group) -> dict:
    """The file's tables, checked against the commands and options of ``group``."""
    file = Path(path)
    try:
        if file.suffix == ".toml":
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        elif file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        else:
            raise click.BadParameter(f"{path}: use a .toml, .yaml or .yml file", param_hint="--config")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise click.BadParameter(f"{path}: not readable TOML ({err})", param_hint="--config") from None
    except Exception as err:  # yaml's errors (YAMLError and its kinds) carry the line in their text
        if isinstance(err, click.BadParameter):
            raise
        raise click.BadParameter(f"{path}: not readable YAML ({err})", param_hint="--config") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected tables of settings per command", param_hint="--config")
    return _check(data, group, path, "")


def _check(tables: dict, group: click.Group, path: str, prefix: str) -> dict:
    """``tables`` with every key turned into its parameter's name (``train`` -> ``train_files``)."""
    checked = {}
    for name, table in tables.items():
        command = group.commands.get(name)
        where = f"{prefix}{name}"
        if command is None:
            raise click.BadParameter(f"{path}: [{where}] is not a command; commands: {', '.join(sorted(group.commands))}",
                                     param_hint="--config")
        if not isinstance(table, dict):
            raise click.BadParameter(f"{path}: [{where}] must be a table of settings", param_hint="--config")
        if isinstance(command, click.Group):
            checked[name] = _check(table, command, path, where + ".")
            continue
        # an option by its long flag (train, lora-r or lora_r) or its parameter name
        known = {opt.lstrip("-").replace("-", "_"): p.name for p in command.params if p.name
                 for opt in [*getattr(p, "opts", []), p.name] if opt.startswith("--") or opt == p.name}
        unknown = sorted(key for key in table if str(key).replace("-", "_") not in known)
        if unknown:
            flags = sorted({opt[2:] for p in command.params for opt in getattr(p, "opts", []) if opt.startswith("--")})
            raise click.BadParameter(f"{path}: [{where}] has no option {unknown[0]!r}; its options: "
                                     f"{', '.join(flags)}", param_hint="--config")
        checked[name] = {known[str(key).replace("-", "_")]: value for key, value in table.items()}
    return checked
