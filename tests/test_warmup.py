import json
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from influence.errors import DataFormatError, RunError
from influence.run import Run
from influence.training import WarmupConfig, sample_fraction, warmup


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
