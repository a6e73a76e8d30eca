"""Folded target scoring: a subtask's target vectors folded into their mean before the pool is read give the same
scores as the products with every target example averaged afterwards (LESS's cosines, TracIn's and TRAK's dot
products are linear in the target's vector), on random stores with unequal subtask sizes and on the tiny run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from influence.gradients.store import GradientStore
from influence.kernels.scoring import score_block, subtask_means, unit_rows
from influence.scoring import attribution, score
from influence.scoring.products import folded_products, pairwise_products

TASKS = ["a"] * 1 + ["b"] * 4 + ["c"] * 7  # unequal subtask sizes


def random_stores(tmp_path, checkpoints: int = 3, rows: int = 37, dim: int = 24) -> list[GradientStore]:
    rng = np.random.default_rng(0)
    stores = []
    for c in range(checkpoints):
        meta = {"model": "m", "checkpoint": f"c{c}", "adapter_sha256": "-", "gradient_type": "sgd", "feature": "f",
                "projector": {"output_dim": dim}, "dtype": "float16", "dataset": "train", "n_examples": rows,
                "examples_sha256": "x", "max_length": 0, "chunk_size": 8}
        store = GradientStore.open_or_create(tmp_path / "g", f"train/c{c}", meta, [str(i) for i in range(rows)],
                                             [""] * rows)
        for chunk in store.pending_chunks():
            start, stop = store.chunk_bounds(chunk)
            n = stop - start
            store.write_chunk(chunk, rng.standard_normal((n, dim)).astype(np.float16), np.ones(n), np.ones(n),
                              np.ones(n, dtype=np.int32))
        stores.append(store)
    return stores


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])
def test_folded_products_equal_the_mean_of_the_unfolded_ones(tmp_path, weights):
    stores = random_stores(tmp_path)
    sides = [torch.randn(len(TASKS), 24, generator=torch.Generator().manual_seed(c)) for c in range(3)]
    unfolded, _ = pairwise_products(stores, sides, weights)
    folded, names, counts = folded_products(stores, sides, weights, TASKS)
    tasks = np.array(TASKS)
    expected = np.stack([unfolded[:, tasks == name].mean(axis=1) for name in names], axis=1)
    assert names == ["a", "b", "c"] and counts.tolist() == [1, 4, 7]
    np.testing.assert_allclose(folded, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])
def test_less_folds_its_unit_targets_exactly(tmp_path, weights):
    """LESS's kernel scores against each subtask's mean unit target vector; the explicit mean of the cosines (the
    computation LESS's matching.py does) gives the same per-subtask scores and the same order."""
    stores = random_stores(tmp_path)
    blocks = torch.stack([torch.from_numpy(store.array("grads")) for store in stores])
    targets = [torch.randn(len(TASKS), 24, generator=torch.Generator().manual_seed(10 + c)) for c in range(3)]
    index = torch.tensor([sorted(set(TASKS)).index(t) for t in TASKS])
    means = torch.stack([subtask_means(t, index, 3) for t in targets])
    per_task, score = score_block(blocks, means, torch.tensor(weights))
    cosines = sum(w * unit_rows(blocks[c]) @ unit_rows(targets[c]).T for c, w in enumerate(weights))
    tasks = np.array(TASKS)
    explicit = np.stack([cosines[:, tasks == name].mean(dim=1).numpy() for name in ("a", "b", "c")], axis=1)
    np.testing.assert_allclose(per_task.numpy(), explicit, rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.argsort(-score.numpy(), kind="stable"), np.argsort(-explicit.max(axis=1), kind="stable"))


@pytest.mark.parametrize("method", ["tracin", "trak"])
def test_tracin_and_trak_rank_alike_folded_or_not(method, engine_run):
    folded = score(method, engine_run["run"], engine_run["target"])
    unfolded = attribution(method, engine_run["run"], engine_run["target"]).scores()
    scale = np.nanmax(np.abs(unfolded.score))
    np.testing.assert_allclose(folded.score, unfolded.score, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(folded.per_task, unfolded.per_task, rtol=1e-4, atol=1e-6 * scale)
    assert folded.task_names == unfolded.task_names and folded.details == unfolded.details
    assert spearmanr(folded.score, unfolded.score).statistic > 0.9999


@pytest.mark.parametrize("weights", [None, [1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])
def test_less_on_the_tiny_run_folded_equals_every_target_example_scored(tiny_run, weights):
    """LESS's stream (folded: one product per subtask) against the cosines with every target example, averaged over
    each subtask afterwards, on the tiny run's stores at the run's own and other checkpoint weightings: the same
    per-subtask scores (fp32) and the same ranking."""
    from influence.gradients.store import open_checkpoint_stores
    from influence.scoring.less.core import iter_scored_blocks, load_less_inputs
    from influence.train.run import Run

    inputs = load_less_inputs(tiny_run["run"], tiny_run["target"], "cpu", "torch")
    weights = inputs.weights if weights is None else np.asarray(weights)
    folded = np.concatenate([per_task.numpy() for _, per_task, _ in
                             iter_scored_blocks(inputs.train, inputs.means, weights, rows_per_block=4)])
    targets = open_checkpoint_stores(Run(tiny_run["run"]), inputs.targets[0].dataset, inputs.dim)
    sides = [unit_rows(torch.from_numpy(store.array("grads"))) for store in targets]
    cosines, _ = pairwise_products(inputs.train, sides, weights, normalize=True)
    tasks = targets[0].tasks
    unfolded = np.stack([cosines[:, tasks == name].mean(axis=1) for name in inputs.targets[0].task_names], axis=1)
    assert len(inputs.targets[0].task_names) > 1 and np.isfinite(unfolded).all()
    np.testing.assert_allclose(folded, unfolded, rtol=1e-5, atol=1e-6)
    order = np.argsort(-folded.max(axis=1), kind="stable")
    assert np.array_equal(order, np.argsort(-unfolded.max(axis=1), kind="stable"))
