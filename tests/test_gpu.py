"""The Triton kernels running on an accelerator against the torch path on CPU. Skipped without CUDA.

On a GPU machine: ``make test-gpu``. The same checks also run on CPU through the Triton interpreter
(``INFLUENCE_TEST_DEVICE=cpu TRITON_INTERPRET=1``, smaller shapes), which is how the tests
themselves are checked where no GPU is lent.
"""

import os

import numpy as np
import pytest
import torch

from influence.gradients.collect import project_grads
from influence.gradients.projection import Projector
from influence.gradients.store import GradientStore
from influence.kernels import projection as kernel
from influence.kernels.scoring import score_block, subtask_means
from influence.scoring import score
from influence.train.run import Run

from .conftest import group
from .test_store import _copy_run

DEVICE = os.environ.get("INFLUENCE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not DEVICE or not kernel.HAVE_TRITON,
                                reason="needs CUDA and Triton (or INFLUENCE_TEST_DEVICE=cpu TRITON_INTERPRET=1)")


@pytest.mark.parametrize("seed,input_dim,output_dim", [(0, 96, 100), (2**32 - 1, 257, 64), (12345, 130, 96)])
def test_signs_on_device_are_the_cpu_bits(seed, input_dim, output_dim):
    if not INTERPRETED:
        input_dim, output_dim = 4 * input_dim, 32 * output_dim
    on_device = kernel.signs_triton(seed, input_dim, output_dim, device=DEVICE).cpu()
    assert torch.equal(on_device, kernel.sign_tile(seed, 0, input_dim, output_dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_projection_on_device_matches_cpu(dtype):
    n, input_dim, output_dim = (5, 200, 64) if INTERPRETED else (37, 100_003, 2048)
    torch.manual_seed(0)
    x = torch.randn(n, input_dim).to(dtype)
    on_device = Projector(input_dim, output_dim, seed=3, backend="triton").project(x.to(DEVICE)).cpu()
    on_cpu = Projector(input_dim, output_dim, seed=3, backend="torch").project(x.float())
    torch.testing.assert_close(on_device, on_cpu, rtol=1e-4, atol=1e-3)


def test_fused_scoring_on_device_matches_cpu():
    checkpoints, rows, dim, tasks = (2, 40, 96, 5) if INTERPRETED else (3, 5000, 8192, 57)
    torch.manual_seed(0)
    blocks = torch.randn(checkpoints, rows, dim).half()
    n_targets = 5 * tasks
    means = torch.stack([
        subtask_means(torch.randn(n_targets, dim), torch.arange(n_targets) % tasks, tasks) for _ in range(checkpoints)
    ])
    weights = torch.rand(checkpoints)
    on_device = score_block(blocks.to(DEVICE), means.to(DEVICE), weights.to(DEVICE), "triton")
    on_cpu = score_block(blocks, means, weights, "torch")
    for a, b in zip(on_device, on_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


def test_store_written_on_device_matches_cpu(tiny_run, tmp_path, monkeypatch):
    """The whole collection (gradients, Adam feature, projection) on the device vs on CPU."""
    runs = {}
    for device in ("cpu", DEVICE):  # under the interpreter both are "cpu": the second run uses Triton
        run_dir = _copy_run(tiny_run, tmp_path, f"on-{len(runs)}-{device}")
        monkeypatch.setenv("INFLUENCE_PROJECTOR", "torch" if device == "cpu" else "triton")
        project_grads(run_dir, tiny_run["target"], proj_dim=64, seed=0, batch_size=4, chunk_size=5,
                      progress=False, device=device)
        runs[len(runs)] = run_dir
    monkeypatch.delenv("INFLUENCE_PROJECTOR")
    for checkpoint in Run(runs[0]).checkpoints():
        for dataset in ("train", tiny_run["target_dataset"]):
            a, b = (GradientStore.open(Run(runs[i]).store_path, group(dataset, checkpoint.name)) for i in (0, 1))
            x, y = a.array("grads").astype(np.float64), b.array("grads").astype(np.float64)
            cosine = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            assert cosine.min() > 0.999, (dataset, checkpoint.name, cosine.min())
            np.testing.assert_allclose(a.array("loss"), b.array("loss"), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(score("less", runs[0], tiny_run["target"], device="cpu").score,
                               score("less", runs[1], tiny_run["target"], device=DEVICE, backend="triton").score, atol=2e-3)
