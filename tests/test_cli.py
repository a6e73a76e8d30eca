import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
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
    # one schema for a mixed pool, the original record kept, and trainable as it is with the pool's ids
    assert all(set(line) >= {"id", "score", "rank", "messages", "source", "original"} for line in selected)
    assert [line["id"] for line in selected] == table["id"][:8].tolist()
    top_id = table["id"][0]
    source, index = top_id.split("#")
    originals = {"chat.jsonl": lambda i: json.loads(Path(pool_files[0]).read_text().splitlines()[i]),
                 "alpaca.json": lambda i: json.loads(Path(pool_files[1]).read_text())[i]}
    if source in originals:
        assert selected[0]["original"] == originals[source](int(index))
    from influence.data.formats import load_examples

    again = load_examples(out / "selected.jsonl")
    assert [e.id for e in again] == table["id"][:8].tolist()
    assert set(pd.read_parquet(out / "scores.parquet").columns) >= {"task:anatomy", "task:astronomy"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "less" and summary["n_selected"] == 8 and "[-1, 1]" in summary["score_meaning"]


def test_cli_errors_are_clear(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    result = runner.invoke(main, ["warmup", "--model", "tiny-llama", "--out", str(tmp_path / "r"), "--train", str(bad)])
    assert result.exit_code == 2 and "bad.jsonl:1" in result.output and "unknown record format" in result.output
    assert "--prompt-column" in result.output and f"--train '{bad}:prompt=FIELD,response=FIELD'" in result.output
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
    assert {"rank", "warmup", "project_grads", "evaluate_select", "run_status"} <= set(dir(influence))


def test_version_and_short_help():
    from click.testing import CliRunner

    from influence.cli import main

    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output.startswith("influence, version ")
    assert "Usage: " in runner.invoke(main, ["rank", "-h"]).output


def test_option_errors_before_any_work(tiny_run, tmp_path):
    """Issue 11's quoted failures: each now a clear error (exit 2) that names the option, before scoring."""
    runner = CliRunner()
    rank = ["rank", "--run", tiny_run["run"]]
    result = runner.invoke(main, rank + ["--method", "nll", "--select", "middle", "--band", "0.3"])
    assert result.exit_code == 2 and "--band" in result.output and "LOW,HIGH" in result.output
    result = runner.invoke(main, rank + ["--method", "nll", "--band", "0.8,0.2", "--select", "middle"])
    assert result.exit_code == 2 and "0 <= LOW < HIGH <= 1" in result.output
    result = runner.invoke(main, rank + ["--method", "lesss"])
    assert result.exit_code == 2 and "unknown method 'lesss'; did you mean less" in result.output and "tracin" in result.output
    result = runner.invoke(main, rank + ["--target", "nosuch"])
    assert result.exit_code == 2 and "unknown target 'nosuch'" in result.output
    result = runner.invoke(main, rank + ["--method", "nll", "--fraction", "0"])
    assert result.exit_code == 2 and "--fraction" in result.output
    run = tmp_path / "copy"
    shutil.copytree(tiny_run["run"], run)
    result = runner.invoke(main, ["project-grads", "--run", str(run), "--target", tiny_run["target"], "--skip-train",
                                  "--proj-dim", "128"])
    assert result.exit_code == 2 and "no gradients at --proj-dim 128 (stored: 64)" in result.output


def test_methods_lists_every_method_and_rank_points_to_it():
    from influence.scoring import registry

    text = " ".join(CliRunner().invoke(main, ["methods"]).output.split())
    assert not [name for name in registry() if re.search(rf"\b{name}\b", text) is None]
    assert "`influence methods`" in " ".join(CliRunner().invoke(main, ["rank", "--help"]).output.split())


def test_selection_notes(tiny_run, tmp_path):
    runner = CliRunner()
    base = ["rank", "--run", tiny_run["run"], "--method", "random", "--space", "none"]
    result = runner.invoke(main, base + ["--select", "middle", "--fraction", "0.5", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "--fraction applies to --select top / bottom, not --select middle" in result.output
    result = runner.invoke(main, base + ["--select", "middle", "--top-k", "10", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "--top-k applies to --select top / bottom" in result.output  # never ignored
    assert not (tmp_path / "m").exists()
    result = runner.invoke(main, base + ["--select", "above", "--threshold", "2", "--out", str(tmp_path / "empty")])
    assert result.exit_code == 0 and "the selection is empty" in result.output
    summary = json.loads((tmp_path / "empty" / "summary.json").read_text())
    assert summary["n_selected"] == 0 and "the selection is empty" in summary["notes"][0]


def test_ties_at_the_cut_are_reported():
    from influence.selection.modes import select, selection_notes

    table = pd.DataFrame({"id": list("abcde"), "score": [3.0, 2.0, 2.0, 2.0, 1.0], "finite": [True] * 4 + [False]})
    chosen = select(table, "top", top_k=2)
    notes = selection_notes(table, chosen, "top", 0.05, 2)
    assert any("2 example(s) left out have the same score" in n for n in notes)
    chosen = select(table, "top", top_k=5)
    assert any("5 examples asked, 4 selected: only 4 of 5 could be scored" in n for n in selection_notes(
        table, chosen, "top", 0.05, 5))


def test_status_of_a_run(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run["run"], run)
    runner = CliRunner()
    result = runner.invoke(main, ["status", "--run", str(run)])
    assert result.exit_code == 0, result.output
    assert "model tiny-llama (fp32)" in result.output and "grads.zarr/dim64/train/epoch-1" in result.output
    found = json.loads(runner.invoke(main, ["status", "--run", str(run), "--json"]).output)
    stores = {s["store"]: s for s in found["stores"]}
    train = stores["grads.zarr/dim64/train/epoch-1"]
    assert train["state"] == "complete" and train["chunks_done"] == train["chunks"] and train["bytes"] > 0
    assert found["pool"]["examples"] == 23 and len(found["checkpoints"]) == 2 and found["warmup_complete"]
    # a chunk not done shows as partial, with what to do
    import zarr

    zarr.open_group(str(run / "grads.zarr" / "dim64" / "train" / "epoch-1"), mode="a")["done"][0] = False
    found = json.loads(runner.invoke(main, ["status", "--run", str(run), "--json"]).output)
    partial = {s["store"]: s for s in found["stores"]}["grads.zarr/dim64/train/epoch-1"]
    assert partial["state"].startswith("partial") and partial["chunks_done"] == partial["chunks"] - 1
    result = runner.invoke(main, ["status", "--run", str(tmp_path)])
    assert result.exit_code == 2 and "no manifest.json" in result.output


def test_progress_bars_quiet_and_in_logs(monkeypatch, capsys):
    import io

    from influence import progress

    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress.progress_bar(total=3).disable
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setattr(progress, "QUIET", True)
    assert progress.progress_bar(total=3).disable
    monkeypatch.setattr(progress, "QUIET", False)
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    with progress.progress_bar(total=3, desc="work", mininterval=0) as bar:
        for _ in range(3):
            bar.update(1)
    assert "\r" not in log.getvalue() and "work: 100%" in log.getvalue().splitlines()[-1]


def test_resume_takes_its_settings_from_the_run(tmp_path, pool_files):
    runner = CliRunner()
    out = str(tmp_path / "run")
    first = ["warmup", "--model", "tiny-llama", "--train", pool_files[0], "--out", out, "--epochs", "1",
             "--fraction", "1", "--lora-r", "4", "--lora-modules", "q_proj", "--max-length", "64", "--lr", "1e-3"]
    assert runner.invoke(main, first).exit_code == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["command_line"] and "influence_commit" in manifest
    result = runner.invoke(main, ["warmup", "--out", out, "--resume"])  # no flag repeated
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["warmup", "--out", out, "--resume", "--lr", "0.5"])
    assert result.exit_code == 2 and "setting 'learning_rate' is 0.5 here but 0.001 in the run" in result.output


def test_settings_from_a_file(tmp_path, pool_files):
    runner = CliRunner()
    toml = tmp_path / "settings.toml"
    toml.write_text(f'[warmup]\nmodel = "tiny-llama"\ntrain = ["{pool_files[0]}"]\nepochs = 1\nfraction = 1.0\n'
                    'lr = 1e-3\nlora_r = 4\nlora_modules = "q_proj"\nmax_length = 64\n', encoding="utf-8")
    out = tmp_path / "run"
    result = runner.invoke(main, ["--config", str(toml), "warmup", "--out", str(out), "--lr", "2e-3"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["learning_rate"] == 2e-3 and config["lora"]["r"] == 4 and config["epochs"] == 1  # flags win
    yaml_file = tmp_path / "settings.yaml"
    yaml_file.write_text("rank:\n  methd: less\n", encoding="utf-8")
    result = runner.invoke(main, ["--config", str(yaml_file), "rank", "--run", str(out)])
    assert result.exit_code == 2 and "[rank] has no option 'methd'" in result.output
    yaml_file.write_text("evaluate:\n  select:\n    grid_lr: 1e-4\n  nosuch: {}\n", encoding="utf-8")
    result = runner.invoke(main, ["--config", str(yaml_file), "targets"])
    assert result.exit_code == 2 and "[evaluate.nosuch] is not a command" in result.output


def test_rank_never_overwrites_another_ranking_and_prints_json(tiny_run, tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "ranking")
    base = ["rank", "--run", tiny_run["run"], "--space", "none", "--out", out]
    assert runner.invoke(main, base + ["--method", "random"]).exit_code == 0
    assert runner.invoke(main, base + ["--method", "random"]).exit_code == 0  # the same ranking again: fine
    result = runner.invoke(main, base + ["--method", "nll"])
    assert result.exit_code == 2 and "holds a ranking made with other settings" in result.output
    result = runner.invoke(main, base + ["--method", "nll", "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed[0]["method"] == "nll" and printed[0]["folder"] == out and printed[0]["n_selected"] >= 1


def test_project_grads_prints_its_cost_first_and_dry_run_stops_there(tiny_run, tmp_path):
    runner = CliRunner()
    run = tmp_path / "copy"
    shutil.copytree(tiny_run["run"], run, ignore=shutil.ignore_patterns("grads.zarr"))
    base = ["project-grads", "--run", str(run), "--target", tiny_run["target"], "--proj-dim", "32", "--chunk-size", "5"]
    result = runner.invoke(main, base + ["--dry-run"])
    assert result.exit_code == 0, result.output
    # 23 pool + 6 target examples at 2 checkpoints; 29 x 32 dims x 2 bytes x 2 checkpoints
    assert "58 example backward passes left (0% already stored)" in result.output and "GiB" in result.output
    assert not (run / "grads.zarr").exists() or not any((run / "grads.zarr").rglob("done"))
    result = runner.invoke(main, base)
    assert result.exit_code == 0 and "58 example backward passes left" in result.output
    result = runner.invoke(main, base + ["--dry-run"])
    assert "0 example backward passes left (100% already stored)" in result.output


def test_selection_as_a_hugging_face_dataset(tiny_run, tmp_path):
    from influence.data.formats import load_examples

    out = tmp_path / "r"
    result = CliRunner().invoke(main, ["rank", "--run", tiny_run["run"], "--target", tiny_run["target"], "--space", "none",
                                       "--fraction", "0.3", "--out", str(out), "--hf-dataset"])
    assert result.exit_code == 0, result.output
    from_jsonl = load_examples(out / "selected.jsonl")
    from_dataset = load_examples(out / "selected_dataset")
    assert [e.id for e in from_dataset] == [e.id for e in from_jsonl] and len(from_jsonl) == 6
    assert [e.messages for e in from_dataset] == [e.messages for e in from_jsonl]


def test_api_in_memory_records_and_a_ranking_without_files(tmp_path):
    from influence import LoraSettings, WarmupConfig, rank, warmup
    from influence.gradients.collect import project_grads

    records = [{"prompt": f"Add {i} and 2.", "completion": f"{i + 2}", "id": f"r{i}"} for i in range(10)]
    config = WarmupConfig(model="tiny-llama", train_files=[], out=str(tmp_path / "run"), fraction=1.0, epochs=1,
                          learning_rate=5e-3, batch_size=4, grad_accum=1, max_length=64,
                          lora=LoraSettings(4, 8, 0.0, ["q_proj"]))
    run = warmup(config, progress=False, records=records)
    assert [e.id for e in run.pool()] == [f"r{i}" for i in range(10)]
    target = tmp_path / "t.jsonl"
    target.write_text(json.dumps({"prompt": "Add 1 and 2.", "completion": "3"}) + "\n")
    project_grads(run.path, str(target), proj_dim=16, chunk_size=5, progress=False)
    before = sorted(p.name for p in run.path.iterdir())
    table = rank(run.path, str(target), fraction=0.2, space="none", write=False)
    assert sorted(p.name for p in run.path.iterdir()) == before  # nothing written
    assert table["selected"].sum() == 2 and table["selected"].iloc[:2].all()
    with pytest.raises(Exception, match="a run already exists here"):
        warmup(config, progress=False, records=records)


def test_json_output(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run["run"], run, ignore=shutil.ignore_patterns("rank-*"))
    result = CliRunner().invoke(main, ["compare", "--run", str(run), "--target", tiny_run["target"],
                                       "--methods", "less,random", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {row["method"] for row in rows} == {"less", "random"}
    assert json.loads(CliRunner().invoke(main, ["targets", "--json"]).stdout)[0]["name"] == "mmlu_val"


def test_forward_scores_print_their_cost(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run["run"], run, ignore=shutil.ignore_patterns("rank-*", "forward-train"))
    shutil.rmtree(run / "grads.zarr" / "forward-train", ignore_errors=True)
    result = CliRunner().invoke(main, ["rank", "--run", str(run), "--method", "nll", "--space", "none"])
    assert result.exit_code == 0, result.output
    assert "forward scores: 23 examples x 2 checkpoint(s)" in result.output


def test_project_grads_takes_its_settings_from_the_stores(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run["run"], run)
    target = tmp_path / "other.jsonl"
    target.write_text(json.dumps({"prompt": "Add 2 and 2.", "completion": "4"}) + "\n")
    result = CliRunner().invoke(main, ["project-grads", "--run", str(run), "--target", str(target)])  # no flag repeated
    assert result.exit_code == 0, result.output
    assert "resumed 5 chunks" in result.output  # the pool's stores at 64 dims, chunks of 5: nothing recomputed
    assert sorted(p.name for p in (run / "grads.zarr").iterdir() if p.name.startswith("dim")) == ["dim64"]


def test_quiet_silences_the_libraries_bars_too(monkeypatch):
    """``--quiet`` turns off every tqdm bar: transformers' ("Loading weights") read tqdm's TQDM_DISABLE default."""
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "0")  # restored after the test
    import subprocess
    import sys

    from transformers.utils import logging as hf_logging

    from influence import progress

    monkeypatch.setattr(progress, "QUIET", False)  # restored after the test, as are the libraries' switches below
    assert not isinstance(hf_logging.tqdm(total=3), hf_logging.EmptyTqdm)
    try:
        assert CliRunner().invoke(main, ["--quiet", "methods"]).exit_code == 0
        assert isinstance(hf_logging.tqdm(total=3), hf_logging.EmptyTqdm)  # imported before: switched off
    finally:
        hf_logging.enable_progress_bar()  # and the hub's
    # in a fresh process the libraries are imported after the switch: transformers' bars never show
    code = ("import sys; from influence.cli import main; sys.argv = ['influence', '--quiet', 'methods'];\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "from transformers.utils import logging as l; print(isinstance(l.tqdm(total=3), l.EmptyTqdm))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**__import__("os").environ})
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-500:]


def test_ctrl_c_says_which_step_stopped_and_how_to_resume(monkeypatch):
    import influence.scoring.base as base

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(base, "registry", interrupted)
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 130 and "interrupted: `methods` stopped" in result.output and "rerun" in result.output
    assert "Aborted!" not in result.output


def test_every_command_prints_its_result_as_json_and_warmup_does(tmp_path, pool_files):
    import click

    def leaves(command, path):
        if isinstance(command, click.Group):
            return [leaf for name, sub in command.commands.items() for leaf in leaves(sub, [*path, name])]
        return [(" ".join(path), {o for p in command.params for o in getattr(p, "opts", [])})]

    assert not [name for name, flags in leaves(main, []) if "--json" not in flags]
    mapped = tmp_path / "qa.jsonl"
    mapped.write_text("".join(json.dumps({"question": f"What is {i}?", "answer": f"It is {i}."}) + "\n"
                              for i in range(6)), encoding="utf-8")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["warmup", "--model", "tiny-llama", "--train", pool_files[0], "--train",
                                       f"{mapped}:prompt=question,response=answer", "--out", str(out), "--epochs", "1",
                                       "--fraction", "1", "--lora-r", "4", "--lora-modules", "q_proj",
                                       "--max-length", "64", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["run"] == str(out) and summary["pool_size"] == 18 and summary["checkpoints"] == ["epoch-1"]
    from influence.train.run import Run

    run = Run(out)  # the file's own mapping is the run's: every stage reads the pool the same way
    run.check_data_unchanged()
    assert [m["content"] for m in run.pool()[-1].messages] == ["What is 5?", "It is 5."]
    result = CliRunner().invoke(main, ["forward-scores", "--run", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["complete"]


def test_config_after_the_subcommand_and_method_help(tiny_run, tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("rank:\n  methd: less\n", encoding="utf-8")
    for args in (["rank", "--run", tiny_run["run"], "--config", str(settings)],
                 ["rank", f"--config={settings}", "--run", tiny_run["run"]]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "[rank] has no option 'methd'" in result.output  # the file was read
    result = CliRunner().invoke(main, ["rank", "--method", "help", "--run", tiny_run["run"]])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "score:" in text and "-> ready" in text and "needs a target: give --target" in text
    result = CliRunner().invoke(main, ["rank", "--method=HELP", "--run", tiny_run["run"], "--target",
                                       tiny_run["target"], "--json"])
    rows = {row["method"]: row for row in json.loads(result.stdout)}
    assert rows["less"]["ready"] and not rows["trak"]["ready"] and "--train-gradient margin" in \
        " ".join(rows["trak"]["missing"])
    result = CliRunner().invoke(main, ["rank", "--run", tiny_run["run"], "--method", "Lesss"])
    assert result.exit_code == 2 and "did you mean less" in result.output
    from influence.scoring.base import get_method

    assert get_method("TRAK").name == "trak"


def test_a_folder_that_is_not_a_run_gets_a_hint_naming_the_right_folder(tiny_run, tmp_path, pool_files):
    result = CliRunner().invoke(main, ["status", "--run", str(Path(pool_files[0]).parent)])
    assert result.exit_code == 2 and "holds data files" in result.output and \
        f"--train {pool_files[0]}" in result.output and "--out runs/NAME" in result.output
    parent = tmp_path / "runs"
    shutil.copytree(tiny_run["run"], parent / "mine", ignore=shutil.ignore_patterns("*.zarr", "rank-*"))
    result = CliRunner().invoke(main, ["status", "--run", str(parent)])
    assert result.exit_code == 2 and f"--run {parent / 'mine'}" in result.output


def test_no_command_has_two_options_with_one_flag():
    """A flag declared twice reaches one of the two settings and leaves the other at its default, silently
    (`evaluate lds --device` had the run's device and the model-based methods' device under one flag)."""
    import click

    def clashes(command, path):
        if isinstance(command, click.Group):
            return [clash for name, sub in command.commands.items() for clash in clashes(sub, [*path, name])]
        flags = [flag for parameter in command.params for flag in [*parameter.opts, *parameter.secondary_opts]]
        return [(" ".join(path), flag) for flag in sorted(set(flags)) if flags.count(flag) > 1]

    assert clashes(main, []) == []
