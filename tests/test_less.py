import numpy as np
import pytest
import zarr

from influence.collect import project_grads
from influence.errors import StoreMismatchError
from influence.run import Run
from influence.scoring import less_scores
from influence.store import GradientStore

from .test_store import _copy_run


def _direct_less(run_dir, target_group):
    """LESS from the stored gradients with plain numpy: full cosine matrix, mean, max, weighted sum."""
    run = Run(run_dir)
    lrs = np.array([c.mean_lr for c in run.checkpoints()])
    weights = lrs / lrs.sum()
    total, per_task = 0, 0
    for c, w in zip(run.checkpoints(), weights):
        x = GradientStore.open(run.store_path, f"train/{c.name}").array("grads").astype(np.float64)
        t_store = GradientStore.open(run.store_path, f"{target_group}/{c.name}")
        t = t_store.array("grads").astype(np.float64)
        tasks = np.array(t_store.tasks)
        cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
        names = sorted(set(tasks))
        means = np.stack([cos[:, tasks == name].mean(axis=1) for name in names], axis=1)
        total = total + w * means.max(axis=1)
        per_task = per_task + w * means
    return total, per_task, names


def test_less_matches_direct_numpy(tiny_run):
    scores = less_scores(tiny_run["run"], tiny_run["target"], rows_per_block=3)
    expected, per_task, names = _direct_less(tiny_run["run"], "target-tgt")
    assert scores.task_names == names == ["math", "words"]
    np.testing.assert_allclose(scores.score, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.per_task, per_task, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(scores.score) <= 1)
    assert len(set(np.round(scores.score, 6))) > 5  # not constant
    assert abs(sum(scores.details["checkpoint_weights"]) - 1) < 1e-12


def test_refuses_target_with_other_projector(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "mixed")
    project_grads(run_dir, None, proj_dim=64, seed=0, chunk_size=5, progress=False)
    project_grads(run_dir, tiny_run["target"], proj_dim=64, seed=1, chunk_size=5, include_train=False, progress=False)
    with pytest.raises(StoreMismatchError) as info:
        less_scores(run_dir, tiny_run["target"])
    assert info.value.field == "projector"


def test_refuses_target_from_another_adapter(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "adapter")
    project_grads(run_dir, tiny_run["target"], proj_dim=64, chunk_size=5, progress=False)
    group = zarr.open_group(str(run_dir / "grads.zarr"), path="target-tgt/epoch-2", mode="a")
    group.attrs["adapter_sha256"] = "f" * 64
    with pytest.raises(StoreMismatchError) as info:
        less_scores(run_dir, tiny_run["target"])
    assert info.value.field == "adapter_sha256" and "target-tgt/epoch-2" in str(info.value)


def test_missing_target_store_says_what_to_run(tiny_run):
    with pytest.raises(Exception, match="project-grads"):
        less_scores(tiny_run["run"], "bbh")


SCORING_CHECK = r"""
import torch
from influence.kernels.scoring import score_block, subtask_means
torch.manual_seed(0)
for rows, dim, tasks in ((37, 200, 3), (5, 64, 20)):
    block = torch.randn(rows, dim).half()
    block[2] = 0  # an all-zero row stays finite
    targets = torch.randn(11, dim)
    means = subtask_means(targets, torch.arange(11) % tasks, tasks)
    a_cos, a_best = score_block(block, means, "triton")
    b_cos, b_best = score_block(block, means, "torch")
    torch.testing.assert_close(a_cos, b_cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_best, b_best, rtol=1e-5, atol=1e-6)
print("ok")
"""


def test_fused_scoring_kernel_matches_torch_in_interpreter():
    import os
    import subprocess
    import sys

    from influence.kernels.scoring import HAVE_TRITON

    assert HAVE_TRITON, "triton is a dependency on Linux"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", SCORING_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
