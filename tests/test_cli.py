import json
import re
import shutil
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from influence.cli import main


def test_end_to_end_cli(tmp_path, pool_files):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(main, [
        "warmup", "--model", "tiny-llama", "--out", str(run), "--fraction", "0.3", "--epochs", "2",
        "--batch-size", "4", "--grad-accum", "1", "--max-length", "96", "--lora-r", "4", "--lora-alpha", "8",
        "--lr", "1e-3", *sum((["--train", f] for f in pool_files), []),
    ])
    assert result.exit_code == 0, result.output
    assert "2 checkpoints" in result.output
    result = runner.invoke(main, ["project-grads", "--run", str(run), "--target", "mmlu_val",
                                  "--target-tasks", "anatomy,astronomy", "--proj-dim", "32", "--chunk-size", "8"])
    assert result.exit_code == 0, result.output
    assert re.search(r"target-mmlu_val-[0-9a-f]{12} epoch-2: 10 examples", result.output)
    out = tmp_path / "sel"
    result = runner.invoke(main, ["rank", "--run", str(run), "--target", "mmlu_val", "--fraction", "0.25",
                                  "--out", str(out), "--show", "2"])
    assert result.exit_code == 0, result.output
    assert "top 2 for mmlu_val/anatomy" in result.output
    table = pd.read_csv(out / "scores.csv")
    assert list(table.columns[:4]) == ["id", "source", "score", "rank"]
    assert len(table) == 32 and table["rank"].tolist() == list(range(1, 33))
    assert table["score"].is_monotonic_decreasing
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == 8
    # records come back in their own format: the top one is exactly the pool's record
    top_id = table["id"][0]
    source, index = top_id.split("#")
    if source == "chat.jsonl":
        original = json.loads(Path(pool_files[0]).read_text().splitlines()[int(index)])
        assert selected[0] == original
    assert set(pd.read_parquet(out / "scores.parquet").columns) >= {"task:anatomy", "task:astronomy"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "less" and summary["n_selected"] == 8 and "[-1, 1]" in summary["score_meaning"]


def test_cli_errors_are_clear(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    result = runner.invoke(main, ["warmup", "--model", "tiny-llama", "--out", str(tmp_path / "r"), "--train", str(bad)])
    assert result.exit_code == 2 and "bad.jsonl:1" in result.output and "unknown record format" in result.output
    assert not (tmp_path / "r").exists()
    result = runner.invoke(main, ["rank", "--run", str(tmp_path), "--target", "mmlu_val"])
    assert result.exit_code == 2 and "no manifest.json" in result.output


def test_unknown_target_lists_registry(tiny_run, tmp_path):
    runner = CliRunner()
    run = tmp_path / "copy"
    shutil.copytree(tiny_run["run"], run, ignore=shutil.ignore_patterns("grads.zarr"))
    result = runner.invoke(main, ["project-grads", "--run", str(run), "--target", "mmlu_value", "--skip-train"])
    assert result.exit_code == 2
    assert "unknown target 'mmlu_value'" in result.output and "bbh, mmlu_val, tydiqa" in result.output


def test_targets_and_help():
    runner = CliRunner()
    result = runner.invoke(main, ["targets"])
    assert result.exit_code == 0 and "mmlu_val" in result.output and "285 examples" in result.output
    for command in ("warmup", "project-grads", "rank", "targets"):
        assert runner.invoke(main, [command, "--help"]).exit_code == 0


def test_every_public_name_resolves():
    import influence

    for name in influence.__all__:
        assert getattr(influence, name) is not None, name


def test_version_and_short_help():
    from click.testing import CliRunner

    from influence.cli import main

    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output.startswith("influence, version ")
    assert "Usage: " in runner.invoke(main, ["rank", "-h"]).output
