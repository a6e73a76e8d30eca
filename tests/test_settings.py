"""Options defined once: settings dataclasses generate the command line, and one check serves the command
line, config files and the API alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import click
import pytest
from click.testing import CliRunner

from influence.cli import main
from influence.config import build, check, problems, setting, settings_from, settings_options
from influence.errors import InfluenceError

ROOT = Path(__file__).resolve().parents[1]


@dataclass(kw_only=True)
class Example:
    count: int = setting(3, "How many.", min=1)
    share: float = setting(0.5, "A share.", min=0, max=1, min_open=True)
    mode: Literal["a", "b"] = setting("a", "Which mode.")
    dims: list[int] = setting(default_factory=lambda: [8], help="Dimensions.", list=True, min=1, nonempty=True)
    files: list[str] = setting(default_factory=list, help="Files.", flag="file", multiple=True)
    keep: bool = setting(True, "Keep it.", off_flag="drop")

    def extra_problems(self) -> list[str]:
        return ["--mode b needs --count 2 or more"] if self.mode == "b" and self.count < 2 else []


def test_one_check_names_each_option_as_typed():
    found = problems(Example(count=0, share=0.0, mode="c", dims=[]))
    assert found == ["--count must be at least 1, got 0", "--share must be in (0, 1], got 0.0",
                     "--mode must be one of a, b, got 'c'", "--dims names nothing"]
    assert problems(Example(mode="b", count=1)) == ["--mode b needs --count 2 or more"]
    with pytest.raises(InfluenceError, match="unknown setting.*colour.*known: count"):
        settings_from(Example, colour=1)
    assert settings_from(Example, settings_from(Example, count=5), share=1.0).count == 5


def test_the_command_line_is_generated_and_checked_by_the_same_fields():
    @click.command()
    @settings_options(Example)
    def command(**values):
        click.echo(repr(build(Example, values)))

    result = CliRunner().invoke(command, ["--dims", "4,16", "--file", "x", "--file", "y", "--drop", "--mode", "b"])
    assert result.exit_code == 0, result.output
    assert "dims=[4, 16]" in result.output and "files=['x', 'y']" in result.output and "keep=False" in result.output
    assert CliRunner().invoke(command, ["--mode", "c"]).exit_code == 2  # click's own choice check
    result = CliRunner().invoke(command, ["--dims", "4,x"])
    assert isinstance(result.exception, InfluenceError) and "--dims takes comma-separated whole numbers" in str(
        result.exception)
    with pytest.raises(InfluenceError, match="--mode b needs --count 2"):
        check(Example(mode="b", count=1))


def test_no_command_option_is_written_by_hand():
    """Every option of every command comes from a settings field (cli/ holds no click.option of its own)."""
    for path in (ROOT / "influence" / "cli").glob("*.py"):
        assert "click.option(" not in path.read_text(encoding="utf-8"), path.name


def test_a_config_file_sets_generated_options(tiny_run, tmp_path):
    config = tmp_path / "settings.toml"
    config.write_text('[rank]\nmethod = "random"\nfraction = 0.2\nseed = 3\n', encoding="utf-8")
    result = CliRunner().invoke(main, ["--config", str(config), "rank", "--run", tiny_run["run"], "--space", "none",
                                       "--out", str(tmp_path / "r"), "--json"])
    assert result.exit_code == 0, result.output
    assert '"method": "random"' in result.output and '"seed": 3' in result.output and '"fraction": 0.2' in result.output
