import numpy as np
import pytest
import torch
import zarr

from influence.errors import StoreMismatchError
from influence.gradients.collect import project_grads
from influence.gradients.store import GradientStore
from influence.kernels.scoring import RunningTopK
from influence.scoring import score
from influence.scoring.less import less_top_k
from influence.train.run import Run

from .conftest import group
from .test_store import _copy_run


def _direct_less(run_dir, target_group):
    """LESS from the stored gradients with plain numpy, in matching.py's order: weighted sum of the full
    cosine matrices over checkpoints, then the mean over each subtask, then the max."""
    run = Run(run_dir)
    lrs = np.array([c.mean_lr for c in run.checkpoints()])
    weights = lrs / lrs.sum()
    influence = 0
    for c, w in zip(run.checkpoints(), weights):
        x = GradientStore.open(run.store_path, group("train", c.name)).array("grads").astype(np.float64)
        t_store = GradientStore.open(run.store_path, group(target_group, c.name))
        t = t_store.array("grads").astype(np.float64)
        tasks = np.array(t_store.tasks)
        influence = influence + w * (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    names = sorted(set(tasks))
    per_task = np.stack([influence[:, tasks == name].mean(axis=1) for name in names], axis=1)
    return per_task.max(axis=1), per_task, names


def test_less_matches_direct_numpy(tiny_run):
    scores = score("less", tiny_run["run"], tiny_run["target"], rows_per_block=3)
    expected, per_task, names = _direct_less(tiny_run["run"], tiny_run["target_dataset"])
    assert scores.task_names == names == ["math", "words"]
    np.testing.assert_allclose(scores.score, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.per_task, per_task, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(scores.score) <= 1)
    assert len(set(np.round(scores.score, 6))) > 5  # not constant
    assert abs(sum(scores.details["checkpoint_weights"]) - 1) < 1e-12


def test_top_k_streams_the_head_of_the_ranking(tiny_run):
    scores = score("less", tiny_run["run"], tiny_run["target"])
    order = np.argsort(-scores.score, kind="stable")
    for rows_per_block in (1, 3, None):
        head = less_top_k(tiny_run["run"], tiny_run["target"], k=5, rows_per_block=rows_per_block)
        assert head["pool_index"].tolist() == order[:5].tolist()
        assert head["id"].tolist() == [scores.ids[i] for i in order[:5]]
        np.testing.assert_allclose(head["score"], scores.score[order[:5]], rtol=1e-6)
        assert head["rank"].tolist() == [1, 2, 3, 4, 5]


def test_running_top_k_is_a_stable_sort_of_the_finite_scores():
    scores = torch.tensor([0.5, float("nan"), 0.9, 0.5, -1.0, float("inf"), 0.9, 0.1, 0.5])
    finite = torch.isfinite(scores)
    expected = torch.sort(torch.where(finite, scores, -torch.inf), descending=True, stable=True).indices[:6]
    for block in (1, 2, 4, 9):
        top = RunningTopK(6)
        for start in range(0, len(scores), block):
            top.update(scores[start : start + block], start)
        assert top.indices.tolist() == expected.tolist() == [2, 6, 0, 3, 8, 7]
        assert torch.equal(top.values, scores[expected])
    assert len(RunningTopK(20).values) == 0


def test_refuses_target_with_other_projector(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "mixed")
    project_grads(run_dir, None, proj_dim=64, seed=0, chunk_size=5, progress=False)
    project_grads(run_dir, tiny_run["target"], proj_dim=64, seed=1, chunk_size=5, include_train=False, progress=False)
    with pytest.raises(StoreMismatchError) as info:
        score("less", run_dir, tiny_run["target"])
    assert info.value.field == "projector"


def test_refuses_target_from_another_adapter(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "adapter")
    project_grads(run_dir, tiny_run["target"], proj_dim=64, chunk_size=5, progress=False)
    path = group(tiny_run["target_dataset"], "epoch-2")
    zarr.open_group(str(run_dir / "grads.zarr"), path=path, mode="a").attrs["adapter_sha256"] = "f" * 64
    with pytest.raises(StoreMismatchError) as info:
        score("less", run_dir, tiny_run["target"])
    assert info.value.field == "adapter_sha256" and path in str(info.value)


def test_missing_target_store_says_what_to_run(tiny_run):
    with pytest.raises(Exception, match="project-grads"):
        score("less", tiny_run["run"], "bbh")


SCORING_CHECK = r"""
import torch
from influence.kernels.scoring import score_block, subtask_means
torch.manual_seed(0)
for checkpoints, rows, dim, tasks in ((2, 37, 200, 3), (1, 5, 64, 20), (3, 40, 96, 1)):
    blocks = torch.randn(checkpoints, rows, dim).half()
    blocks[:, 2] = 0  # an all-zero row stays finite
    n_targets = 2 * tasks + 1  # every subtask has targets
    targets = torch.randn(checkpoints, n_targets, dim)
    means = torch.stack([subtask_means(t, torch.arange(n_targets) % tasks, tasks) for t in targets])
    weights = torch.rand(checkpoints)
    a_task, a_score = score_block(blocks, means, weights, "triton")
    b_task, b_score = score_block(blocks, means, weights, "torch")
    torch.testing.assert_close(a_task, b_task, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_score, b_score, rtol=1e-5, atol=1e-6)
    # against the definition: cosines with every target, mean per subtask, max, weighted sum
    cos = torch.nn.functional.cosine_similarity(blocks.float()[:, :, None], targets[:, None], dim=-1, eps=1e-12)
    per_task = torch.stack([cos[..., torch.arange(n_targets) % tasks == s].mean(-1) for s in range(tasks)], -1)
    weighted = (weights[:, None, None] * per_task).sum(0)  # LESS: checkpoint sum, then max over subtasks
    torch.testing.assert_close(b_score, weighted.max(-1).values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b_task, weighted, rtol=1e-4, atol=1e-5)
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
