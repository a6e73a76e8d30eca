"""gradmatch and craig against independent re-computations: GRAD-MATCH's non-negative OMP written as cords'
``OrthogonalMP_REG_Parallel_V1`` states it (a fresh least-squares solve of the regularised normal equations at every
step), and CRAIG's greedy facility location on the full distance matrix; then both through ``rank``."""

import json

import numpy as np
import pandas as pd
from click.testing import CliRunner

from influence.cli import main
from influence.scoring.matching import craig, omp_nonnegative


def _reference_omp(a: np.ndarray, b: np.ndarray, budget: int, lam: float, tol: float = 1e-4):
    """cords' V1 OMP (positive=True), in numpy: A is (d, n) there, the rows of ``a`` here."""
    residual, indices, x = b.copy(), [], np.zeros(0)
    for _ in range(budget):
        if np.linalg.norm(residual) / np.linalg.norm(b) < tol:
            break
        index = int(np.argmax(a @ residual))
        if index in indices:
            break
        indices.append(index)
        rows = a[indices]
        x = np.linalg.lstsq(rows @ rows.T + lam * np.eye(len(indices)), rows @ b, rcond=None)[0]
        while len(indices) and x.min() < 0:
            del indices[int(np.argmin(x))]
            rows = a[indices]
            x = np.linalg.lstsq(rows @ rows.T + lam * np.eye(len(indices)), rows @ b, rcond=None)[0]
        residual = b - x @ a[indices]
    return indices, x


def test_omp_equals_the_reference_formulation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 24)).astype(np.float16)
    for b, lam in ((a.astype(np.float64).sum(axis=0), 0.5), (rng.normal(size=24) * 5, 0.0)):
        picks, weights, _ = omp_nonnegative(a, b, 40, lam)
        expected, x = _reference_omp(a.astype(np.float64), b, 40, lam)
        assert picks == expected and len(picks) > 5
        np.testing.assert_allclose(weights, x, rtol=1e-4, atol=1e-6)
        assert (weights >= 0).all()


def test_craig_equals_greedy_facility_location_on_the_full_matrix():
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.normal(loc=c, size=(30, 8)) for c in (-3, 0, 3)]).astype(np.float16)
    picks, weights, distance = craig(a, 6, clients=1000, seed=0)
    x = a.astype(np.float64)
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    bound = d.max() + 1
    nearest, expected = np.full(len(x), bound), []
    for _ in range(6):
        gains = np.maximum(nearest[None, :] - d, 0).sum(axis=1)
        gains[expected] = -1
        expected.append(int(np.argmax(gains)))
        nearest = np.minimum(nearest, d[expected[-1]])
    assert picks == expected
    assignment = d[:, picks].argmin(axis=1)
    np.testing.assert_array_equal(weights, np.bincount(assignment, minlength=6))
    np.testing.assert_allclose(distance, d[:, picks].min(axis=1), rtol=1e-3, atol=1e-3)
    assert weights.sum() == len(x) and {p // 30 for p in picks} == {0, 1, 2}  # every cluster gets a medoid


def test_rank_returns_the_weighted_selection(engine_run, tmp_path):
    runner = CliRunner()
    for method, extra in (("gradmatch", ["--target", engine_run["target"]]), ("gradmatch", []), ("craig", [])):
        out = tmp_path / f"{method}{len(extra)}"
        result = runner.invoke(main, ["rank", "--run", engine_run["run"], "--method", method, "--budget", "0.25",
                                      "--fraction", "0.25", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        scores = pd.read_parquet(out / "scores.parquet")
        chosen = scores[scores["weight"] > 0]
        assert len(chosen) == int(0.25 * len(scores)) and (chosen["score"] > 1).all()
        assert (scores.loc[scores["weight"] == 0, "score"] < 1).all()
        selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines() if line]
        assert [r["weight"] for r in selected] == chosen["weight"].tolist()


def test_evaluate_select_trains_with_the_weights(engine_run, tmp_path, monkeypatch):
    """A weighted selection (selected.jsonl with ``weight``) trains each example with its weight, scaled to mean 1;
    the other subsets with weight 1."""
    import influence.train.loop as loop
    from influence.evaluate.select import Grid, evaluate_select, selection_weights

    from .conftest import write_jsonl

    out = tmp_path / "craig"
    result = CliRunner().invoke(main, ["rank", "--run", engine_run["run"], "--method", "craig", "--budget", "0.25",
                                       "--fraction", "0.25", "--out", str(out)])
    assert result.exit_code == 0, result.output
    weights = selection_weights(out / "selected.jsonl")
    assert weights is not None and weights.sum() > len(weights)  # medoids stand for more than themselves
    seen = []
    original = loop.LoraTrainer.__init__

    def recording(self, *args, weights=None, **kwargs):
        seen.append(None if weights is None else np.asarray(weights, dtype=np.float64))
        original(self, *args, weights=weights, **kwargs)

    monkeypatch.setattr(loop.LoraTrainer, "__init__", recording)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": f"Multiply {i} by 3.", "completion": str(3 * i)}
                                                          for i in range(4)])
    evaluate_select([str(out / "selected.jsonl"), "random"], run_dir=engine_run["run"], target=engine_run["target"],
                    fraction=0.25, grid=Grid([1e-3], [1], [4], ["linear"], 1), eval_files=[str(held_out)],
                    out=str(tmp_path / "select"), progress=False)
    assert any(w is not None and np.allclose(w, 1) for w in seen)  # the random subset: every member weighs 1
    weighted = [w for w in seen if w is not None and not np.allclose(w, 1)]
    assert weighted and np.allclose(weighted[0].mean(), 1)
    np.testing.assert_allclose(np.sort(weighted[0]), np.sort(weights / weights.mean()), rtol=1e-6)
