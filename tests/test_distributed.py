"""Gradient extraction across processes: --workers, --shard and torchrun split the chunks of the same
stores and end byte-identical to one process; a crashed process's chunks are taken on the next run."""

import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from influence.core.locks import writer_lock
from influence.errors import InfluenceError
from influence.gradients.collect import project_grads

PACKAGE = Path(__file__).resolve().parents[1]
SETTINGS = dict(proj_dim=16, chunk_size=3, batch_size=2, train_gradients=["adam", "sgd"])


def _copy(tiny_run, folder: Path) -> Path:
    shutil.copytree(tiny_run["run"], folder, ignore=shutil.ignore_patterns("grads.zarr", "subsets.zarr", "lds", "rank-*"))
    return folder


def _arrays(run_dir: Path) -> dict:
    """Every array and every store's attributes under grads.zarr (claims and locks aside)."""
    root = zarr.open_group(str(Path(run_dir) / "grads.zarr"), mode="r")
    found = {}
    for name, member in root.members(max_depth=None):
        if isinstance(member, zarr.Array):
            found[name] = member[:]
        else:
            found[name + "/attrs"] = dict(member.attrs)
    return found


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert a[key] == b[key], key
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@contextmanager
def threads(count: int):
    """torch's intra-op threads: on CPU, how a matrix product is split between threads can change
    float rounding, so runs compare byte for byte at one thread per process (on GPUs each rank
    computes as a single process would)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tiny_run, tmp_path_factory):
    """One process with one thread, as each worker process runs here."""
    run_dir = _copy(tiny_run, tmp_path_factory.mktemp("one-process") / "run")
    with threads(1):
        project_grads(run_dir, tiny_run["target"], progress=False, **SETTINGS)
    return _arrays(run_dir)


def test_two_worker_processes_equal_one_process(tiny_run, reference, tmp_path):
    run_dir = _copy(tiny_run, tmp_path / "run")
    with threads(2):  # each of the 2 workers gets one
        reports = project_grads(run_dir, tiny_run["target"], progress=False, workers=2, **SETTINGS)
    _same(_arrays(run_dir), reference)
    assert len(reports) == 2 * len({(r.dataset, r.checkpoint) for r in reports})  # both workers report


def test_static_shards_merge_to_one_process(tiny_run, reference, tmp_path):
    run_dir = _copy(tiny_run, tmp_path / "run")
    with threads(1):
        first = project_grads(run_dir, tiny_run["target"], progress=False, shard=(0, 2), **SETTINGS)
        assert all(r.resumed_chunks == 0 for r in first)
        done = zarr.open_array(str(run_dir / "grads.zarr" / "dim16" / "train" / "epoch-1" / "done"), mode="r")[:]
        assert done[0::2].all() and not done[1::2].any()
        project_grads(run_dir, tiny_run["target"], progress=False, shard=(1, 2), **SETTINGS)
    _same(_arrays(run_dir), reference)


CRASH = textwrap.dedent("""
    import os, sys
    import influence.gradients.store as store
    original = store.GradientStore.write_chunk
    def dies_on_third(self, index, *args, **kwargs):
        if index == 2:
            os._exit(9)  # killed mid-run: chunks 0 and 1 are written, the rest are not
        return original(self, index, *args, **kwargs)
    store.GradientStore.write_chunk = dies_on_third
    from influence.gradients.collect import project_grads
    project_grads(sys.argv[1], sys.argv[2], progress=False, shard=(0, 1), proj_dim=16, chunk_size=3, batch_size=2,
                  train_gradients=["adam", "sgd"])
""")


def test_a_killed_process_loses_nothing_and_the_rerun_completes_identically(tiny_run, reference, tmp_path):
    run_dir = _copy(tiny_run, tmp_path / "run")
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    killed = subprocess.run([sys.executable, str(script), str(run_dir), tiny_run["target"]], cwd=PACKAGE,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == 9, killed.stderr
    done = zarr.open_group(str(run_dir / "grads.zarr"), path="dim16/train/epoch-1", mode="r")["done"][:]
    assert done[:2].all() and not done[2:].any()
    with threads(2):
        project_grads(run_dir, tiny_run["target"], progress=False, workers=2, **SETTINGS)  # the lock died with it
    _same(_arrays(run_dir), reference)


def test_torchrun_form_as_documented(tiny_run, reference, tmp_path):
    run_dir = _copy(tiny_run, tmp_path / "run")
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc-per-node", "2", "-m", "influence", "project-grads", "--run-dir", str(run_dir),
               "--target", tiny_run["target"], "--proj-dim", "16", "--chunk-size", "3", "--batch-size", "2",
               "--train-gradient", "adam,sgd"]
    result = subprocess.run(command, cwd=PACKAGE, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-2000:]
    _same(_arrays(run_dir), reference)


def test_cooperation_is_refused_where_it_would_be_unsafe(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path / "run")
    with pytest.raises(InfluenceError, match="--overwrite replaces stores"):
        project_grads(run_dir, tiny_run["target"], overwrite=True, shard=(0, 2), progress=False, **SETTINGS)
    project_grads(run_dir, None, progress=False, **SETTINGS)
    done = zarr.open_array(str(run_dir / "grads.zarr" / "dim16" / "train" / "epoch-1" / "done"), mode="r")
    assert done.chunks == (1,)
    # a store of the earlier layout (all done flags in one storage chunk) is refused for several processes
    store = run_dir / "grads.zarr" / "dim16" / "train" / "epoch-2"
    flags = zarr.open_array(str(store / "done"), mode="r")[:]
    shutil.rmtree(store / "done")
    zarr.create_array(str(store / "done"), shape=flags.shape, chunks=flags.shape, dtype=bool, fill_value=False)[:] = flags
    with pytest.raises(InfluenceError, match="earlier version"):
        project_grads(run_dir, None, progress=False, shard=(0, 2), **SETTINGS)
    project_grads(run_dir, None, progress=False, **SETTINGS)  # one process may still use it
    with writer_lock(run_dir, "test", shared=True), writer_lock(run_dir, "test", shared=True):
        with pytest.raises(InfluenceError, match="another influence process"):
            with writer_lock(run_dir, "exclusive"):
                pass


# Scoring on Dask: the same blocks scored by the same function as the one-process stream.

@pytest.fixture(scope="module")
def dask_client():
    pytest.importorskip("distributed")
    from influence.scoring.dask import dask_client as client_of

    with client_of("local", workers=2) as client:
        yield client


def test_dask_scoring_equals_the_stream(tiny_run, dask_client):
    from influence.scoring import score_many
    from influence.scoring.less import less_top_k

    address = dask_client.scheduler.address
    with threads(1):  # as each single-threaded worker computes, on the CPU (also where a GPU is)
        stream = score_many("less", tiny_run["run"], [tiny_run["target"]], rows_per_block=4, device="cpu")[0]
        stream_top = less_top_k(tiny_run["run"], tiny_run["target"], 7, rows_per_block=4, device="cpu")
    on_dask = score_many("less", tiny_run["run"], [tiny_run["target"]], rows_per_block=4, dask=address)[0]
    np.testing.assert_array_equal(stream.per_task, on_dask.per_task)
    np.testing.assert_array_equal(stream.score, on_dask.score)
    dask_top = less_top_k(tiny_run["run"], tiny_run["target"], 7, rows_per_block=4, dask=address)
    assert dask_top["id"].tolist() == stream_top["id"].tolist()
    np.testing.assert_array_equal(dask_top["score"], stream_top["score"])
    with pytest.raises(InfluenceError, match="workers' CPUs"):
        less_top_k(tiny_run["run"], tiny_run["target"], 7, device="cuda", dask=address)


def test_dask_top_k_is_a_tree_over_blocks_with_ties_by_row():
    from influence.kernels.scoring import RunningTopK
    from influence.scoring.less.dask import _block_top

    scores = np.array([[0.5], [0.9], [np.nan], [0.5], [0.9], [0.1], [0.5]], dtype=np.float32)
    blocks = [_block_top(scores[i : i + 2], i, 4) for i in range(0, 7, 2)]
    merged = blocks[0].merge(blocks[1]).merge(blocks[2].merge(blocks[3]))
    whole = RunningTopK(4)
    whole.update(torch.from_numpy(scores[:, 0]), 0)
    assert merged.indices.tolist() == whole.indices.tolist() == [1, 4, 0, 3]


def test_rank_on_dask_from_the_command_line(tiny_run, dask_client, tmp_path):
    from click.testing import CliRunner

    from influence.cli import main

    runner = CliRunner()
    base = ["rank", "--run", tiny_run["run"], "--target", tiny_run["target"], "--space", "none"]
    result = runner.invoke(main, base + ["--dask", dask_client.scheduler.address, "--out", str(tmp_path / "dask")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, base + ["--out", str(tmp_path / "stream")])
    assert result.exit_code == 0, result.output
    on_dask = (tmp_path / "dask" / "scores.csv").read_text().splitlines()
    stream = (tmp_path / "stream" / "scores.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in on_dask] == [line.split(",")[0] for line in stream]  # same ranking
    result = runner.invoke(main, ["rank", "--run", tiny_run["run"], "--method", "random", "--dask"])
    assert result.exit_code == 2 and "--dask does not apply to --method random" in result.output
    result = runner.invoke(main, base + ["--dask", "tcp://127.0.0.1:9", "--out", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "cannot reach a Dask scheduler" in result.output


# Warm-up on several processes: DDP through accelerate, the same optimisation as one process.

def _warmup_config(pool_files, out, **overrides):
    from influence.models.loading import LoraSettings, ModelLoading
    from influence.train.warmup import WarmupConfig

    # 3 micro-batches per step shared by 2 processes (2 + 1), a short last step that leaves one process
    # without a micro-batch, dropout on, clipping on, and the whole pool tracked after every epoch.
    settings = dict(model="tiny-llama", train_files=pool_files, out=str(out),
                    lora=LoraSettings(4, 8, 0.1, ["q_proj", "v_proj"]), fraction=0.8, epochs=2, learning_rate=1e-2,
                    batch_size=2, grad_accum=3, max_length=64, seed=5, max_grad_norm=0.5, track_all=True,
                    loading=ModelLoading(dtype="fp32"))
    return WarmupConfig(**{**settings, **overrides})


def _warmup_command(config) -> list[str]:
    lora = config.lora
    return ["-m", "influence", "--quiet", "warmup", "--model", config.model, *[a for f in config.train_files for a in ("--train", f)],
            "--out", config.out, "--lora-r", str(lora.r), "--lora-alpha", str(lora.alpha), "--lora-dropout",
            str(lora.dropout), "--lora-modules", ",".join(lora.target_modules), "--fraction", str(config.fraction),
            "--epochs", str(config.epochs), "--lr", str(config.learning_rate), "--batch-size", str(config.batch_size),
            "--grad-accum", str(config.grad_accum), "--max-length", str(config.max_length), "--seed", str(config.seed),
            "--max-grad-norm", str(config.max_grad_norm), "--loss-weighting", config.loss_weighting, "--track-all",
            "--dtype", "fp32"]


def _same_training(one, two, bf16: bool = False) -> None:
    """Two runs trained the same model: checkpoints, Adam moments and dynamics, up to float rounding
    (``bf16``: of bf16 activations, about 1e-3 of the adapter's entries after Adam's normalisation)."""
    scale = 100 if bf16 else 1
    import pandas as pd
    from safetensors.torch import load_file

    assert [c.name for c in one.checkpoints()] == [c.name for c in two.checkpoints()]
    for a, b in zip(one.checkpoints(), two.checkpoints()):
        assert (a.step, a.mean_lr) == (b.step, b.mean_lr)
        adapter_a, adapter_b = load_file(str(a.adapter_file)), load_file(str(b.adapter_file))
        assert adapter_a.keys() == adapter_b.keys()
        for key in adapter_a:
            torch.testing.assert_close(adapter_a[key], adapter_b[key], rtol=1e-4 * scale, atol=1e-6 * scale, msg=key)
        for moments_a, moments_b in zip(a.adam_moments()[:2], b.adam_moments()[:2]):
            assert moments_a.keys() == moments_b.keys()
            for key in moments_a:
                torch.testing.assert_close(moments_a[key], moments_b[key], rtol=1e-3 * scale, atol=1e-9 * scale**3, msg=key)
    dynamics_a = pd.read_parquet(one.path / "dynamics.parquet")
    dynamics_b = pd.read_parquet(two.path / "dynamics.parquet")
    pd.testing.assert_frame_equal(dynamics_a.drop(columns=["loss", "token_accuracy"]),
                                  dynamics_b.drop(columns=["loss", "token_accuracy"]))
    np.testing.assert_allclose(dynamics_a["loss"], dynamics_b["loss"], rtol=1e-4 * scale)
    np.testing.assert_allclose(dynamics_a["token_accuracy"], dynamics_b["token_accuracy"])


def _torchrun(arguments: list[str]) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--nproc-per-node", "2", *arguments], cwd=PACKAGE, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("weighting", ["micro_batch", "token"])
def test_ddp_warmup_on_two_processes_matches_one_process(pool_files, tmp_path, weighting):
    from influence.train.run import Run
    from influence.train.warmup import warmup

    with threads(1):
        one = warmup(_warmup_config(pool_files, tmp_path / "one", loss_weighting=weighting), progress=False)
    config = _warmup_config(pool_files, tmp_path / "two", loss_weighting=weighting)
    _torchrun(_warmup_command(config))
    two = Run(config.out)
    assert two.manifest["processes"] == 2 and one.manifest["processes"] == 1
    assert one.manifest["steps"] == two.manifest["steps"]
    _same_training(one, two)


@pytest.mark.parametrize("launch", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_a_warmup_interrupted_on_one_process_resumes_on_two(pool_files, tmp_path, monkeypatch, launch):
    from influence.train.run import Run
    from influence.train.warmup import warmup

    from .conftest import crash_at_epoch

    with threads(1):
        one = warmup(_warmup_config(pool_files, tmp_path / "one"), progress=False)
        crash_at_epoch(monkeypatch, 2)
        config = _warmup_config(pool_files, tmp_path / "crashed")
        with pytest.raises(KeyboardInterrupt):
            warmup(config, progress=False)
    assert [c.name for c in Run(config.out).checkpoints()] == ["epoch-1"]
    _torchrun(_warmup_command(config) + ["--resume", *launch])
    _same_training(one, Run(config.out))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
@pytest.mark.parametrize("launch", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_warmup_on_two_gpus_matches_one_gpu(pool_files, tmp_path, launch):
    from influence.train.run import Run
    from influence.train.warmup import warmup

    one = warmup(_warmup_config(pool_files, tmp_path / "one"), progress=False)  # on cuda:0
    config = _warmup_config(pool_files, tmp_path / "two")
    _torchrun(_warmup_command(config) + launch)  # rank r on cuda:r
    assert Run(config.out).manifest["device"] == "cuda:0"
    _same_training(one, Run(config.out))


def test_fsdp_warmup_on_two_processes_matches_one_process(pool_files, tmp_path):
    """FSDP2 through torchrun (gloo on CPU): sharded weights, adapters and moments, the same training."""
    from influence.train.run import Run
    from influence.train.warmup import warmup

    with threads(1):
        one = warmup(_warmup_config(pool_files, tmp_path / "one"), progress=False)
    config = _warmup_config(pool_files, tmp_path / "two")
    _torchrun(_warmup_command(config) + ["--fsdp"])
    two = Run(config.out)
    assert two.manifest["sharded"] and two.manifest["processes"] == 2 and not one.manifest["sharded"]
    _same_training(one, two)


SHARDS_CHECK = """
import gc
import torch
from torch.distributed.tensor import DTensor
from influence.models.loading import LoraSettings, add_lora, build_tiny_llama
from influence.train.loop import LoraTrainer, TrainSettings

model, tokenizer = build_tiny_llama()
whole = {n: p.numel() for n, p in model.named_parameters()}
model = add_lora(model, LoraSettings(4, 8, 0.0, ["q_proj", "v_proj"]), seed=0)
trainer = LoraTrainer(model, [], [], TrainSettings(), tokenizer.pad_token_id, torch.device("cpu"), data_parallel=True,
                      shard=True)
held = {n: p.to_local().numel() for n, p in model.named_parameters() if isinstance(p, DTensor)}
assert trainer.sharded and len(held) == len(list(model.parameters())), "every parameter is sharded"
assert sum(held.values()) <= sum(whole.values()) // 2 + 4096, (sum(held.values()), sum(whole.values()))
state = trainer.whole_state()
assert all(not isinstance(t, DTensor) for t in state.weights.values())
assert {n: t.shape for n, t in state.weights.items()} == {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
del trainer, model
gc.collect()  # as the warm-up does (see influence.train.warmup.warmup)
"""


def test_fsdp_processes_hold_a_share_of_the_weights(tmp_path):
    script = tmp_path / "shards.py"
    script.write_text(SHARDS_CHECK)
    _torchrun([str(script)])


@pytest.mark.parametrize("launch", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_bf16_weights_beside_fp32_adapters_on_two_processes(pool_files, tmp_path, launch):
    """Base weights in bf16, adapters in fp32 (each FSDP unit holds one dtype): the same training."""
    from influence.models.loading import ModelLoading
    from influence.train.run import Run
    from influence.train.warmup import warmup

    bf16 = ModelLoading(dtype="bf16")
    with threads(1):
        one = warmup(_warmup_config(pool_files, tmp_path / "one", loading=bf16, epochs=1), progress=False)
    config = _warmup_config(pool_files, tmp_path / "two", loading=bf16, epochs=1)
    _torchrun(_warmup_command(config) + ["--dtype", "bf16", *launch])
    assert Run(config.out).manifest["model_loading"]["dtype"] == "bf16"
    _same_training(one, Run(config.out), bf16=True)
