"""Never a silently wrong ranking: every case of the reliability sweep is refused loudly or made impossible."""

import json
import re
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from click.testing import CliRunner

import influence.core.chunks as store_module
from influence.cli import main
from influence.core.locks import writer_lock
from influence.data.targets import load_target
from influence.errors import DataFormatError, InfluenceError, RunError, StoreMismatchError
from influence.gradients.collect import project_grads
from influence.gradients.store import GradientStore
from influence.models.loading import LoraSettings, build_tiny_llama, model_fingerprint
from influence.scoring import registry, score
from influence.selection.rank import rank
from influence.train.run import Run
from influence.train.warmup import WarmupConfig, warmup

from .conftest import group, write_jsonl
from .test_store import _copy_run

PACKAGE = Path(__file__).resolve().parents[1]


def _config(folder, files, **kwargs):
    settings = dict(model="tiny-llama", train_files=files, out=str(folder / "run"),
                    lora=LoraSettings(4, 16, 0.0, ["q_proj", "v_proj"]), fraction=0.5, epochs=2,
                    learning_rate=5e-3, batch_size=4, grad_accum=1, max_length=96, seed=0)
    return WarmupConfig(**{**settings, **kwargs})


# 1. incomplete target stores -------------------------------------------------------------------------
def test_incomplete_target_store_is_refused(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "partial-target")
    project_grads(run_dir, tiny_run["target"], proj_dim=64, chunk_size=5, progress=False)
    path = group(tiny_run["target_dataset"], "epoch-2")
    zarr.open_group(str(run_dir / "grads.zarr"), path=path, mode="a")["done"][0] = False
    with pytest.raises(InfluenceError, match="incomplete"):
        rank(run_dir, tiny_run["target"], out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


# 2. model weights replaced, same config ----------------------------------------------------------------
def test_fingerprint_covers_the_weights():
    model, _ = build_tiny_llama()
    other, _ = build_tiny_llama()
    assert model_fingerprint("m", model) == model_fingerprint("m", other)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert model_fingerprint("m", model) != model_fingerprint("m", other)


def test_replaced_weights_are_refused_by_every_step(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "weights")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["model_fingerprint"] = manifest["model_fingerprint"][:-4] + "0000"  # as if trained on other weights
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunError, match="not the one this run was warmed up on"):
        project_grads(run_dir, tiny_run["target"], proj_dim=64, chunk_size=5, progress=False)
    with pytest.raises(RunError, match="not the one this run was warmed up on"):
        score("nll", run_dir)


# 3. stale stores after an adapter changed ----------------------------------------------------------------
def test_stores_from_an_old_adapter_are_refused_by_every_reader(tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    run_dir = _copy_run(tiny_run, tmp_path, "stale")
    project_grads(run_dir, tiny_run["target"], proj_dim=64, chunk_size=5, progress=False)
    score("nll", run_dir)  # forward stores exist
    adapter = Run(run_dir).checkpoints()[0].adapter_file
    tensors = load_file(str(adapter))
    save_file({k: v * 1.01 for k, v in tensors.items()}, str(adapter))
    for method in ("less", "grand", "nll"):
        with pytest.raises(StoreMismatchError, match="adapter_sha256"):
            rank(run_dir, tiny_run["target"] if method == "less" else None, method=method, out=tmp_path / method)
        assert not (tmp_path / method).exists()


# 5. two writers at once; stores appear whole ---------------------------------------------------------------
@contextmanager
def _lock_held_by_another_process(run_dir):
    """Another process holds the run's writer lock until the block ends (then it is killed)."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from influence.core.locks import writer_lock
        with writer_lock({str(run_dir)!r}, "test"):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_second_writer_is_refused_while_the_first_holds_the_run(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "two")
    with _lock_held_by_another_process(run_dir):
        with pytest.raises(InfluenceError, match="another influence process is writing"):
            project_grads(run_dir, tiny_run["target"], proj_dim=64, seed=7, chunk_size=5, progress=False)
        result = CliRunner().invoke(main, ["project-grads", "--run", str(run_dir), "--proj-dim", "64"])
        assert result.exit_code == 2 and "another influence process is writing" in result.output
        assert not (run_dir / "grads.zarr").exists()
    project_grads(run_dir, tiny_run["target"], proj_dim=64, chunk_size=5, progress=False)  # released by the kill


def test_a_store_killed_while_being_created_never_appears(tiny_run, tmp_path, monkeypatch):
    run_dir = _copy_run(tiny_run, tmp_path, "creation")
    original = store_module._build

    def dies_after_ids(root, path, metadata, ids, tasks, columns, *rest):
        original(root, path, metadata, ids, tasks, columns, *rest)
        raise KeyboardInterrupt("killed after the ids array was written")

    monkeypatch.setattr(store_module, "_build", dies_after_ids)
    with pytest.raises(KeyboardInterrupt):
        project_grads(run_dir, None, proj_dim=64, chunk_size=5, progress=False)
    folder = run_dir / "grads.zarr" / "dim64" / "train"
    assert not (folder / "epoch-1").exists() and list(folder.glob("epoch-1.partial-*"))
    monkeypatch.setattr(store_module, "_build", original)
    project_grads(run_dir, None, proj_dim=64, batch_size=4, chunk_size=5, progress=False)  # no "different ids"
    assert not list(folder.glob("*.partial-*"))  # leftovers cleaned
    np.testing.assert_array_equal(
        GradientStore.open(run_dir / "grads.zarr", group("train", "epoch-1")).array("grads"),
        GradientStore.open(Run(tiny_run["run"]).store_path, group("train", "epoch-1")).array("grads"))


def test_rank_says_when_a_writer_is_at_work(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "reading")
    project_grads(run_dir, tiny_run["target"], proj_dim=64, chunk_size=5, progress=False)
    with _lock_held_by_another_process(run_dir):
        rank(run_dir, tiny_run["target"], out=tmp_path / "r")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert any("another influence process was writing" in w for w in summary["warnings"])


# 6. degenerate training and degenerate scores --------------------------------------------------------------
def test_non_finite_training_loss_stops_the_warmup(tmp_path, pool_files, monkeypatch):
    import influence.train.loop as training

    original, calls = training.forward_response, {"n": 0}

    def diverges(model, batch):
        forward = original(model, batch)
        calls["n"] += 1
        if calls["n"] == 3:
            forward.losses = forward.losses * float("nan")
        return forward

    monkeypatch.setattr(training, "forward_response", diverges)
    with pytest.raises(RunError, match="non-finite at epoch 1, step 3"):
        warmup(_config(tmp_path, pool_files, grad_accum=1), progress=False)
    assert not Run(tmp_path / "run").manifest["checkpoints"]  # no NaN adapter was saved


def test_huge_learning_rate_gives_a_loud_degenerate_ranking(tmp_path, pool_files):
    """--lr 1e6 trains to finite but saturated weights whose gradients are exactly zero."""
    config = _config(tmp_path, pool_files, learning_rate=1e6, max_grad_norm=0)
    warmup(config, progress=False)
    target = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"Add {i}", "completion": f"{i}", "task": "ab"[i % 2]}
                                                for i in range(4)])
    project_grads(config.out, str(target), proj_dim=16, chunk_size=5, progress=False)
    result = CliRunner().invoke(main, ["rank", "--run", config.out, "--target", str(target)])
    assert result.exit_code == 3 and "degenerate" in result.output, result.output


def test_all_zero_features_are_flagged_and_exit_3(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "zero")
    project_grads(run_dir, tiny_run["target"], proj_dim=64, chunk_size=5, progress=False)
    for checkpoint in ("epoch-1", "epoch-2"):
        grads = zarr.open_group(str(run_dir / "grads.zarr"), path=group("train", checkpoint), mode="a")["grads"]
        grads[:] = 0
    result = CliRunner().invoke(main, ["rank", "--run", str(run_dir), "--target", tiny_run["target"],
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 3, result.output
    assert "no example could be scored" in result.output and "all-zero gradient" in result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["n_selected"] == 0 and summary["n_unscorable"] == 23 and len(summary["warnings"]) == 2


def test_equal_scores_are_flagged(tiny_run, tmp_path, monkeypatch):
    from influence.scoring import base

    class Flat(base.Method, register=False):
        name, family, summary, meaning = "flat", "baseline", "zero for every example", "all zero"

        def scores(self, run, target, options):
            ids = [e.id for e in run.pool()]
            return base.Scores("flat", ids, np.zeros(len(ids)), "all zero")

    monkeypatch.setitem(base._REGISTRY, "flat", Flat())
    rank(tiny_run["run"], None, method="flat", out=tmp_path / "flat")
    summary = json.loads((tmp_path / "flat" / "summary.json").read_text())
    assert any("every score equals 0" in w for w in summary["warnings"])


# 7, 8, 10. crashes that left a run unresumable -------------------------------------------------------------
def test_dynamics_killed_mid_write_leaves_the_previous_file(tmp_path, pool_files, monkeypatch):
    config = _config(tmp_path, pool_files)
    calls = {"n": 0}
    original = pd.DataFrame.to_parquet

    def dies_writing(self, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch's dynamics: half a file, then killed
            Path(path).write_bytes(b"PAR1 half")
            raise KeyboardInterrupt("killed while writing dynamics.parquet")
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", dies_writing)
    with pytest.raises(KeyboardInterrupt):
        warmup(config, progress=False)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", original)
    assert len(pd.read_parquet(tmp_path / "run" / "dynamics.parquet")) > 0  # the epoch-1 file, whole
    resumed = warmup(config, progress=False, resume=True)
    reference = warmup(_config(tmp_path / "ref", pool_files, out=str(tmp_path / "ref")), progress=False)
    pd.testing.assert_frame_equal(pd.read_parquet(resumed.path / "dynamics.parquet"),
                                  pd.read_parquet(reference.path / "dynamics.parquet"))


def test_warmup_killed_during_its_first_manifest_write_can_be_retried(tmp_path, pool_files, monkeypatch):
    import influence.train.run as run_module

    config = _config(tmp_path, pool_files, epochs=1)
    original = run_module.atomic_write

    def dies(path, write):
        write(path.with_name(path.name + ".tmp"))
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(run_module, "atomic_write", dies)
    with pytest.raises(KeyboardInterrupt):
        warmup(config, progress=False)
    monkeypatch.setattr(run_module, "atomic_write", original)
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert len(warmup(config, progress=False).checkpoints()) == 1


# bad inputs: refused before any work, naming the option, file or line, nothing written ----------------------
BAD_WARMUP = [
    (["--fraction", "0"], "--fraction"), (["--fraction", "-1"], "--fraction"), (["--fraction", "2"], "--fraction"),
    (["--batch-size", "0"], "--batch-size"), (["--grad-accum", "0"], "--grad-accum"), (["--lora-r", "0"], "--lora-r"),
    (["--lr", "-1"], "--lr"), (["--lora-dropout", "2"], "--lora-dropout"), (["--epochs", "0"], "--epochs"),
    (["--epochs", "-1"], "--epochs"), (["--max-length", "0"], "--max-length"),
    (["--lora-modules", "nothing_here"], "match no linear module"),
    (["--model", str(PACKAGE / "no-such-folder")], "no such model folder"),
    (["--model", str(PACKAGE / "tests")], "no config.json"),
]


@pytest.mark.parametrize("args,message", BAD_WARMUP)
def test_bad_warmup_options_are_refused_before_work(tmp_path, pool_files, args, message):
    out = tmp_path / "run"
    base = ["warmup", "--model", "tiny-llama", "--out", str(out), *sum((["--train", f] for f in pool_files), [])]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (out / "manifest.json").exists() and not list(out.glob("checkpoints/*"))


@pytest.mark.parametrize("args,message", [
    (["--proj-dim", "0"], "--proj-dim"), (["--proj-dim", "-5"], "--proj-dim"), (["--batch-size", "0"], "--batch-size"),
    (["--chunk-size", "0"], "--chunk-size"), (["--chunk-size", "-3"], "--chunk-size"), (["--device", "tpu9"], "--device tpu9"),
])
def test_bad_project_grads_options_are_refused(tiny_run, tmp_path, args, message):
    run_dir = _copy_run(tiny_run, tmp_path, "bad")
    result = CliRunner().invoke(main, ["project-grads", "--run", str(run_dir), "--target", tiny_run["target"], *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not (run_dir / "grads.zarr").exists()


def test_garbage_or_empty_manifest_is_named(tmp_path):
    for text in ("", "{not json", "[1, 2]", "{}"):
        (tmp_path / "manifest.json").write_text(text)
        result = CliRunner().invoke(main, ["rank", "--run", str(tmp_path), "--method", "random"])
        assert result.exit_code == 2 and "manifest.json" in result.output and "Traceback" not in result.output


def test_evaluate_noisy_never_overwrites_user_files(tmp_path, pool_files):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    runner = CliRunner()
    result = runner.invoke(main, ["evaluate", "noisy", "--model", "tiny-llama", "--out", str(out),
                                  *sum((["--train", f] for f in pool_files), [])])
    assert result.exit_code == 2 and "not empty" in result.output
    assert (out / "notes.txt").read_text() == "precious" and len(list(out.iterdir())) == 1
    result = runner.invoke(main, ["evaluate", "noisy", "--model", "tiny-llama", "--out", str(tmp_path / "new"),
                                  "--noise", "2", *sum((["--train", f] for f in pool_files), [])])
    assert result.exit_code == 2 and "--noise" in result.output and not (tmp_path / "new").exists()


def test_target_records_must_all_have_a_task_or_none(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b", "task": "x"},
                                              {"prompt": "c", "completion": "d"}])
    with pytest.raises(DataFormatError, match=r"t.jsonl:2: record has no 'task'"):
        load_target(str(path))
    path = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "a", "completion": "b", "task": ["x", "y"]}])
    with pytest.raises(DataFormatError, match=r"l.jsonl:1: field 'task' must be a string, got list"):
        load_target(str(path))


def test_text_errors_name_the_line(tmp_path):
    from influence.data.formats import load_examples

    surrogate = tmp_path / "s.jsonl"
    surrogate.write_text('{"prompt": "ok", "completion": "fine"}\n{"prompt": "bad \\ud800", "completion": "x"}\n')
    with pytest.raises(DataFormatError, match=r"s.jsonl:2: messages\[0\] contains an unpaired surrogate"):
        load_examples(surrogate)
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n')
    with pytest.raises(DataFormatError, match=r"b.jsonl:2: not UTF-8"):
        load_examples(binary)
    pretty = tmp_path / "p.json"
    pretty.write_text(json.dumps({"data": [{"prompt": "a"}], "version": 1}, indent=2))
    with pytest.raises(DataFormatError, match=r"p.json:1: the file is one JSON object \(keys: data, version\)"):
        load_examples(pretty)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "a", "completion": "b"}, indent=2))
    assert len(load_examples(one)) == 1  # a pretty-printed single record is recognised


# security stays as it is ---------------------------------------------------------------------------------------
def test_no_pickle_and_weights_only_loads_and_ids_never_paths():
    sources = {p: p.read_text() for p in [*(PACKAGE / "influence").rglob("*.py"), *(PACKAGE / "kernels").rglob("*.py")]}
    for path, text in sources.items():
        assert not re.search(r"^\s*(import|from)\s+(pickle|dill|cloudpickle)\b", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "allow_pickle=True" not in text, path
    # ids are file positions, never joined into a path
    assert not re.search(r"Path\([^)]*\.id\b|/ *\w*\.id\b", "\n".join(sources.values()))


def test_ids_with_path_characters_stay_data(tmp_path):
    evil = write_jsonl(tmp_path / "..%2F..%2Fevil.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    config = _config(tmp_path, [str(evil)], fraction=1.0, epochs=1)
    warmup(config, progress=False)
    project_grads(config.out, None, proj_dim=8, chunk_size=2, progress=False)
    table = rank(config.out, None, method="grand", out=tmp_path / "r")
    assert table["id"].tolist()[0].startswith("..%2F..%2Fevil.jsonl#")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["scores.csv", "scores.parquet", "selected.jsonl",
                                                                  "summary.json"]


def test_writer_lock_is_released_on_error(tmp_path):
    with pytest.raises(ValueError):
        with writer_lock(tmp_path, "x"):
            raise ValueError("boom")
    with writer_lock(tmp_path, "x"):
        pass
    assert registry()["less"]  # the scoring package imports cleanly with the lock machinery
