import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from influence.errors import DataFormatError, RunError
from influence.train.run import Run
from influence.train.warmup import WarmupConfig, sample_fraction, warmup

from .conftest import crash_at_epoch


def test_run_layout_and_manifest(tiny_run):
    run = Run(tiny_run["run"])
    m = run.manifest
    assert m["pool_size"] == 23 and len(m["warmup_ids"]) == 12
    assert m["config"]["lora"]["r"] == 4 and m["versions"]["torch"]
    assert all(len(f["sha256"]) == 64 for f in m["train_files"])
    checkpoints = run.checkpoints()
    assert [c.name for c in checkpoints] == ["epoch-1", "epoch-2"]
    assert all(c.mean_lr > 0 for c in checkpoints)
    assert checkpoints[0].mean_lr > checkpoints[1].mean_lr  # linear decay
    exp_avg, exp_avg_sq, hyper = checkpoints[1].adam_moments()
    assert any("lora_A" in k for k in exp_avg) and set(exp_avg) == set(exp_avg_sq)
    assert all(not k.isdigit() for k in exp_avg)  # keyed by parameter name
    assert hyper["betas"] == [0.9, 0.999]
    adapter = load_file(str(checkpoints[0].adapter_file))
    assert any("lora_B" in k for k in adapter)


def test_dynamics_recorded_per_presentation(tiny_run):
    dynamics = pd.read_parquet(Path(tiny_run["run"]) / "dynamics.parquet")
    assert len(dynamics) == 12 * 2  # every warm-up example, every epoch
    assert set(dynamics.columns) >= {"phase", "epoch", "step", "id", "loss", "token_accuracy", "exact_match"}
    assert set(dynamics["phase"]) == {"train"}
    assert dynamics["token_accuracy"].between(0, 1).all()
    assert set(dynamics["id"]) == set(Run(tiny_run["run"]).manifest["warmup_ids"])


def test_sample_fraction_is_seeded():
    assert list(sample_fraction(100, 0.05, 1)) == list(sample_fraction(100, 0.05, 1))
    assert list(sample_fraction(100, 0.05, 1)) != list(sample_fraction(100, 0.05, 2))
    assert len(sample_fraction(10, 0.01, 0)) == 1


def test_bad_input_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n{oops\n')
    out = tmp_path / "run"
    with pytest.raises(DataFormatError, match="bad.jsonl:2"):
        warmup(WarmupConfig(model="tiny-llama", train_files=[str(bad)], out=str(out)), progress=False)
    assert not out.exists()


def test_refuses_to_overwrite_a_run(tiny_run):
    with pytest.raises(RunError, match="already exists"):
        warmup(WarmupConfig(model="tiny-llama", train_files=[], out=tiny_run["run"]), progress=False)


def test_changed_pool_file_is_detected(tiny_run, tmp_path):
    run = Run(tiny_run["run"])
    manifest = json.loads((run.path / "manifest.json").read_text())
    manifest["train_files"][0]["sha256"] = "0" * 64
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunError, match="changed since the warm-up"):
        Run(copy).check_data_unchanged()


def test_interrupted_warmup_resumes_identically(tmp_path, pool_files, monkeypatch):
    import influence.train.warmup as training
    from influence.models.loading import LoraSettings

    def config(out):
        return WarmupConfig(model="tiny-llama", train_files=pool_files, out=str(out),
                            lora=LoraSettings(4, 8, 0.1, ["q_proj", "v_proj"]), fraction=0.5, epochs=3,
                            learning_rate=1e-2, batch_size=4, grad_accum=2, max_length=64, seed=3)

    reference = warmup(config(tmp_path / "ref"), progress=False)
    original = training.save_checkpoint
    crash_at_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        warmup(config(tmp_path / "crashed"), progress=False)
    monkeypatch.setattr(training, "save_checkpoint", original)
    with pytest.raises(RunError, match="--resume"):
        warmup(config(tmp_path / "crashed"), progress=False)
    changed = config(tmp_path / "crashed")
    changed.learning_rate = 1e-3
    with pytest.raises(RunError, match="'learning_rate'"):
        warmup(changed, progress=False, resume=True)
    resumed = warmup(config(tmp_path / "crashed"), progress=False, resume=True)
    assert [c.name for c in resumed.checkpoints()] == ["epoch-1", "epoch-2", "epoch-3"]
    for a, b in zip(reference.checkpoints(), resumed.checkpoints()):
        assert a.mean_lr == b.mean_lr and a.step == b.step
        ta, tb = load_file(str(a.adapter_file)), load_file(str(b.adapter_file))
        assert all(torch.equal(ta[k], tb[k]) for k in ta)  # dropout and Adam state restored exactly
        ma, mb = a.adam_moments()[1], b.adam_moments()[1]
        assert all(torch.equal(ma[k], mb[k]) for k in ma)
    dyn_a = pd.read_parquet(reference.path / "dynamics.parquet")
    dyn_b = pd.read_parquet(resumed.path / "dynamics.parquet")
    pd.testing.assert_frame_equal(dyn_a, dyn_b)


def test_refuses_non_run_folder(tmp_path, pool_files):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not an influence run"):
        warmup(WarmupConfig(model="tiny-llama", train_files=pool_files, out=str(tmp_path)), progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_cost_estimate_changes_nothing_and_dry_run_writes_nothing(tmp_path, pool_files, capsys):
    from safetensors.torch import load_file

    from influence.models.loading import LoraSettings
    from influence.train.run import Run
    from influence.train.warmup import WarmupConfig, warmup

    def config(out):  # dropout on: the timed step must leave the random state as it was
        return WarmupConfig(model="tiny-llama", train_files=pool_files, out=str(tmp_path / out), fraction=0.5,
                            epochs=1, learning_rate=5e-3, batch_size=4, grad_accum=1, max_length=64,
                            lora=LoraSettings(4, 16, 0.1, ["q_proj", "v_proj"]))

    assert warmup(config("dry"), dry_run=True) is None and not (tmp_path / "dry").exists()
    assert "warm-up: 16 examples x 1 epochs" in capsys.readouterr().err
    warmup(config("quiet"), progress=False)
    warmup(config("loud"), progress=True)
    assert "ms per token measured here" in capsys.readouterr().err
    quiet = load_file(str(Run(tmp_path / "quiet").checkpoints()[0].adapter_file))
    loud = load_file(str(Run(tmp_path / "loud").checkpoints()[0].adapter_file))
    assert all(torch.equal(quiet[k], loud[k]) for k in quiet)
