"""Diversity: indicators against hand computations, selection algorithms against brute force and
textbook greedy, the redundancy filter's guarantee, reproducibility, and rank --diversify on a run."""

import itertools
import json

import numpy as np
import pytest

from influence.errors import InfluenceError
from influence.gradients.geometry import knn_distance, mean_nn_distance, semdedup, vendi_score
from influence.gradients.spaces import load_space
from influence.scoring.diversity import distinct_n, mtld, ttr, words
from influence.selection.diversify import (
    Diversify,
    cluster_balanced,
    facility_location,
    k_center_greedy,
    redundancy_filter,
    scaled_quality,
    subset_diversity,
    subtask_quota,
)
from influence.selection.rank import rank

from .conftest import write_jsonl


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def clustered(n_per=20, centers=4, dim=16, spread=0.05, seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    middles = unit(rng.normal(size=(centers, dim)))
    labels = np.repeat(np.arange(centers), n_per)
    return unit(middles[labels] + spread * rng.normal(size=(len(labels), dim))), labels


# -- lexical indicators ---------------------------------------------------------------------------------------------
def test_lexical_indicators_by_hand():
    tokens = words("The cat sat on the mat, the END.")
    assert tokens == ["the", "cat", "sat", "on", "the", "mat", "the", "end"]
    assert ttr(tokens) == pytest.approx(6 / 8)
    assert distinct_n(tokens, 1) == pytest.approx(6 / 8)
    assert distinct_n(tokens, 2) == pytest.approx(7 / 7)  # every bigram differs
    assert distinct_n(["a", "b", "a", "b"], 2) == pytest.approx(2 / 3)
    # MTLD by hand: "a a a a": TTRs 1, 0.5 -> a factor closes after the 2nd word, again after the 4th: 2 factors
    assert mtld(["a", "a", "a", "a"]) == pytest.approx(4 / 2)
    # "a b a": 1, 1, 0.667 <= 0.72 -> one factor after 3 words, nothing left: 3 / 1 forward; backward the same
    assert mtld(["a", "b", "a"]) == pytest.approx(3.0)
    # partial factor: "a b" never drops: factor share (1 - 1) / (1 - 0.72) = 0 -> the length itself
    assert mtld(["a", "b"]) == pytest.approx(2.0)
    remainder = ["a", "b", "a", "c", "c"]  # forward: factor after 3 ("a b a"), then "c c": TTR 0.5 -> factor: 5 / 2
    backward = ["c", "c", "a", "b", "a"]  # "c c": 0.5 -> factor; "a b a": 0.667 -> factor: 5 / 2
    assert mtld(remainder) == pytest.approx((5 / 2 + 5 / 2) / 2)
    assert mtld(backward) == pytest.approx(2.5)
    assert np.isnan(ttr([])) and np.isnan(mtld([]))


# -- geometric indicators and subset diversity ---------------------------------------------------------------------------
def test_knn_distance_and_semdedup_by_hand():
    x = unit([[1, 0], [1, 0.01], [0, 1], [-1, 0]])
    distances = knn_distance(x, k=1)
    expected = [1 - max(float(x[i] @ x[j]) for j in range(4) if j != i) for i in range(4)]
    np.testing.assert_allclose(distances, expected, atol=1e-6)
    assert knn_distance(x, k=3)[0] == pytest.approx(1 - float(x[0] @ x[3]))
    labels = np.zeros(4, dtype=int)
    centroid = unit([[0.5, 0.5]])
    flags, nearest = semdedup(x, labels, centroid, eps=0.01)
    # the near-identical pair: the one farther from the centroid is kept, the other flagged
    far = 0 if 1 - x[0] @ centroid[0] > 1 - x[1] @ centroid[0] else 1
    assert flags.tolist() == [far == 1, far == 0, False, False]
    assert nearest[0] == pytest.approx(float(x[0] @ x[1]))


def test_vendi_score_and_subset_report():
    same = unit(np.ones((5, 3)))
    assert vendi_score(same) == pytest.approx(1.0)
    assert vendi_score(np.eye(4, dtype=np.float32)) == pytest.approx(4.0)
    x = unit(np.random.default_rng(0).normal(size=(6, 3)))
    kernel = x.astype(np.float64) @ x.T.astype(np.float64) / 6
    eigen = np.clip(np.linalg.eigvalsh(kernel), 1e-300, None)
    assert vendi_score(x) == pytest.approx(float(np.exp(-(eigen * np.log(eigen)).sum())), rel=1e-6)
    assert mean_nn_distance(np.eye(3, dtype=np.float32)) == pytest.approx(1.0)
    points, labels = clustered()
    report = subset_diversity(points, np.arange(10), labels)  # ten points of one cluster
    assert report["selection"]["cluster_coverage"] == pytest.approx(1 / 4)
    assert report["pool"]["cluster_coverage"] == 1.0 and report["selection"]["n"] == report["random"]["n"] == 10
    assert report["selection"]["vendi"] < report["pool"]["vendi"]


# -- selection algorithms --------------------------------------------------------------------------------------------------
def covering_radius(x: np.ndarray, picks) -> float:
    return float(max(min(1 - float(x[i] @ x[j]) for j in picks) for i in range(len(x))))


@pytest.mark.parametrize("budget", [2, 3])
def test_k_center_greedy_against_brute_force(budget):
    x = unit(np.random.default_rng(3).normal(size=(9, 4)))
    picks, radius = k_center_greedy(x, budget, first=0, block=4)
    assert len(set(picks)) == budget and picks[0] == 0
    assert radius == pytest.approx(covering_radius(x, picks), abs=1e-6)  # the reported objective is exact
    optimum = min(covering_radius(x, s) for s in itertools.combinations(range(9), budget))
    # Gonzalez's 2-approximation holds for a metric: the Euclidean distance of unit vectors, sqrt(2 (1 - cos)),
    # which orders points as the cosine distance does (so the picks are the same)
    assert optimum <= radius and np.sqrt(2 * radius) <= 2 * np.sqrt(2 * optimum) + 1e-6
    # farthest-first: every pick is the point farthest from the earlier picks
    for step in range(1, budget):
        gaps = [min(1 - float(x[i] @ x[j]) for j in picks[:step]) for i in range(9)]
        assert gaps[picks[step]] == pytest.approx(max(gaps), abs=1e-6)


def test_facility_location_equals_the_textbook_greedy():
    x = unit(np.random.default_rng(4).normal(size=(12, 5)))
    quality = np.random.default_rng(5).random(12)
    budget, weight = 5, 0.6
    q = scaled_quality(quality)
    sim = np.clip(x @ x.T, 0, None)

    def objective(chosen):
        coverage = sim[:, chosen].max(axis=1).mean() if chosen else 0.0
        return (1 - weight) * q[chosen].sum() / budget + weight * coverage

    textbook = []
    for _ in range(budget):  # naive greedy: every candidate's marginal gain from the full similarity matrix
        gains = [(objective(textbook + [j]) - objective(textbook), -j) for j in range(12) if j not in textbook]
        textbook.append(-max(gains)[1])
    picks, value = facility_location(x, quality, budget, weight, block=5)
    assert picks == textbook
    assert value == pytest.approx(objective(picks))
    assert facility_location(x, quality, budget, 0.0)[0] == list(np.argsort(-q, kind="stable")[:budget])  # quality only
    with pytest.raises(InfluenceError, match="diversity-weight"):
        facility_location(x, quality, 2, 1.5)


def test_redundancy_filter_never_keeps_close_pairs_and_selection_is_reproducible():
    x, _ = clustered(n_per=30, centers=3, spread=0.2, seed=7)
    order = np.random.default_rng(8).permutation(len(x))
    kept = redundancy_filter(x, order, budget=20, min_distance=0.05)
    for i, j in itertools.combinations(kept, 2):
        assert 1 - float(x[i] @ x[j]) > 0.05
    positions = [list(order).index(k) for k in kept]
    assert positions == sorted(positions)  # walks the ranking in order
    assert redundancy_filter(x, order, 20, 0.05) == kept
    assert facility_location(x, np.ones(len(x)), 5, 0.5, sample=20, seed=1) == \
        facility_location(x, np.ones(len(x)), 5, 0.5, sample=20, seed=1)


def test_cluster_balanced_and_quota():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    order = np.arange(10)
    picks = cluster_balanced(labels, order, 5, "proportional")  # shares 3, 1.5, 0.5 -> 3, 1, 1
    assert sorted(labels[picks].tolist()) == [0, 0, 0, 1, 2] or sorted(labels[picks].tolist()) == [0, 0, 0, 1, 1]
    equal = cluster_balanced(labels, order, 6, "equal")  # 2 each, but cluster 2 has 1: its share moves on
    assert len(equal) == 6 and set(labels[equal]) == {0, 1, 2}
    per_task = np.array([[0.9, 0.0], [0.8, 0.1], [0.7, 0.2], [0.1, 0.3]])
    assert subtask_quota(per_task, 2) == [0, 3]  # task 0's best, then task 1's best
    assert subtask_quota(per_task, 4) == [0, 3, 1, 2]


# -- on a run ----------------------------------------------------------------------------------------------------
def test_rank_diversify_on_the_tiny_run(tiny_run, tmp_path):
    space = load_space(tiny_run["run"], "grads")
    assert space.vectors.shape == (23, 64) and np.allclose(np.linalg.norm(space.vectors[space.finite], axis=1), 1)
    plain = rank(tiny_run["run"], tiny_run["target"], fraction=0.3, out=tmp_path / "plain")
    summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
    diversity = summary["selection"]["diversity"]
    assert diversity["selection"]["n"] == 6 and diversity["pool"]["n"] == 23 and diversity["space"] == "grads"
    for algorithm in ("kcenter", "fl", "filter", "clusters", "quota"):
        rank(tiny_run["run"], tiny_run["target"], fraction=0.3, out=tmp_path / algorithm,
             diversify=Diversify(algorithm, min_distance=0.0))
        saved = json.loads((tmp_path / algorithm / "summary.json").read_text())
        assert saved["n_selected"] == 6 and saved["selection"]["diversify"]["algorithm"] == algorithm
    kcenter = json.loads((tmp_path / "kcenter" / "summary.json").read_text())
    assert kcenter["selected_ids"][0] == plain["id"][0]  # seeded with the best-scored example
    with pytest.raises(InfluenceError, match="picks from the top"):
        rank(tiny_run["run"], tiny_run["target"], mode="bottom", diversify="kcenter", out=tmp_path / "never")
    from influence.data.formats import load_pool
    from influence.scoring.diversity import words as split
    from influence.train.run import Run

    responses = [" ".join(m["content"] for m in e.messages if m["role"] == "assistant")
                 for e in load_pool(Run(tiny_run["run"]).train_files)]
    several_words = sum(len(split(text)) >= 2 for text in responses)
    for method in ("ttr", "mtld", "distinct1", "distinct2", "knn_distance", "prototypicality", "semdedup"):
        table = rank(tiny_run["run"], None, method=method, out=tmp_path / f"m-{method}")
        # one-word responses have no bigram: distinct2 is undefined for them (unscorable), the rest scores all
        assert table["finite"].sum() == (several_words if method == "distinct2" else 23), method
    assert several_words < 23


def test_planted_skills_are_covered_by_diverse_selection_not_by_top_b(tmp_path):
    """A pool of four planted skills where the score favours one: top-b takes only that skill; the
    cluster-balanced, k-center and facility-location selections cover every skill."""
    x, skill = clustered(n_per=25, centers=4, spread=0.05, seed=11)
    score = np.where(skill == 0, 1.0, 0.0) + 0.01 * np.random.default_rng(12).random(len(x))
    order = np.argsort(-score, kind="stable")
    budget = 8
    assert set(skill[order[:budget]]) == {0}
    from influence.gradients.geometry import kmeans

    labels, _ = kmeans(x[order], 4, seed=0)
    assert set(skill[order][cluster_balanced(labels, np.arange(len(x)), budget, "equal")]) == {0, 1, 2, 3}
    assert set(skill[order][k_center_greedy(x[order], budget, first=0)[0]]) == {0, 1, 2, 3}
    assert set(skill[order][facility_location(x[order], score[order], budget, 0.7)[0]]) == {0, 1, 2, 3}
    assert set(skill[order][redundancy_filter(x[order], np.arange(len(x)), budget, 0.5)]) == {0, 1, 2, 3}


def test_a_planted_run_covers_both_subtasks_with_quota(tmp_path):
    """On a real (tiny) run: a two-subtask target where LESS's top can miss a subtask; --diversify quota
    always takes the best of each."""
    from influence.gradients.collect import project_grads
    from influence.models.loading import LoraSettings
    from influence.train.warmup import WarmupConfig, warmup

    pool = write_jsonl(tmp_path / "pool.jsonl", [
        {"prompt": f"Add {i} and {i}.", "completion": f"{2 * i}"} for i in range(10)
    ] + [{"prompt": f"Spell word number {i}.", "completion": "w-o-r-d " * (1 + i % 3)} for i in range(10)])
    target = write_jsonl(tmp_path / "target.jsonl", [
        {"prompt": "Add 20 and 20.", "completion": "40", "task": "math"},
        {"prompt": "Spell word twenty.", "completion": "w-o-r-d", "task": "spelling"},
    ])
    config = WarmupConfig(model="tiny-llama", train_files=[str(pool)], out=str(tmp_path / "run"),
                          lora=LoraSettings(4, 16, 0.0, ["q_proj", "v_proj"]), fraction=0.5, epochs=1,
                          learning_rate=5e-3, batch_size=4, grad_accum=1, max_length=64)
    warmup(config, progress=False)
    project_grads(config.out, str(target), proj_dim=32, chunk_size=10, progress=False)
    table = rank(config.out, str(target), fraction=0.1, out=tmp_path / "quota", diversify="quota")
    summary = json.loads((tmp_path / "quota" / "summary.json").read_text())
    picked = table.set_index("id").loc[summary["selected_ids"]]
    assert picked["task:math"].idxmax() == table.sort_values("task:math", ascending=False)["id"].iloc[0]
    assert picked["task:spelling"].idxmax() == table.sort_values("task:spelling", ascending=False)["id"].iloc[0]


def test_spaces_reps_and_embeddings_and_lds_of_a_diversified_selection(tiny_run, tmp_path):
    import shutil

    from influence.evaluate.lds import evaluate_lds

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    reps = load_space(run, "reps")
    embedded = load_space(run, "embed:tiny-llama")
    assert reps.vectors.shape == embedded.vectors.shape == (23, 64)
    assert reps.finite.all() and embedded.finite.all()
    assert not np.allclose(reps.vectors, embedded.vectors)  # last token after the warm-up vs mean of the base model
    again = load_space(run, "embed:tiny-llama")  # stored: read back, not recomputed
    np.testing.assert_array_equal(again.vectors, embedded.vectors)
    with pytest.raises(InfluenceError, match="unknown"):
        load_space(run, "nowhere")
    with pytest.raises(InfluenceError, match="no such checkpoint"):
        load_space(run, "grads:epoch-9")
    rank(run, tiny_run["target"], fraction=0.3, out=tmp_path / "diverse", diversify="kcenter", space="embed:tiny-llama")
    selection = tmp_path / "diverse" / "selected.jsonl"
    report = evaluate_lds(run, tiny_run["target"], ["random", str(selection)], k=3, bootstrap=5, progress=False)
    row = report.table.set_index("method").loc["diverse/selected.jsonl"]
    assert row["effects"] == "ranking or selection file" and row["n_subsets"] == 3


def test_dq_bins_equal_the_reference_graphcut_and_the_shares_are_equal():
    """Dataset Quantization's bins against its reference written out on the dense similarity matrix (GraphCut gain
    ``lam * colsum - 2 * sum over the bin``, lam 1, naive greedy), then an equal random share of each bin."""
    from influence.selection.diversify import dataset_quantization, quantization_bins

    rng = np.random.default_rng(0)
    x = rng.normal(size=(61, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    remaining, expected = np.arange(61), []
    for _ in range(4):
        sim = x[remaining] @ x[remaining].T
        colsum, chosen = sim.sum(axis=0), []
        for _ in range(61 // 4):
            gain = colsum - 2 * sim[chosen].sum(axis=0)
            gain[chosen] = -np.inf
            chosen.append(int(np.argmax(gain)))
        expected.append(remaining[chosen])
        remaining = np.delete(remaining, chosen)
    bins = quantization_bins(x, 4)
    assert [b.tolist() for b in bins] == [e.tolist() for e in expected]
    picks = dataset_quantization(x, 10, 4, seed=1)
    shares = [len(set(picks) & set(b.tolist())) for b in bins]
    assert len(picks) == len(set(picks)) == 10 and shares == [3, 3, 2, 2]


def test_clusterclip_balances_clusters_and_clips_repeats():
    from influence.selection.diversify import cluster_clip

    labels = np.array([0] * 50 + [1] * 3)  # a big cluster and a rare one
    order, repeats = cluster_clip(labels, 40, clip=4, seed=0)
    counts = dict(zip(order, repeats))
    assert sum(repeats) == 40 and max(repeats) <= 4 and len(order) == len(set(order))
    rare = sum(v for row, v in counts.items() if labels[row] == 1)
    assert 12 <= rare <= 20  # about half the slots go to the rare cluster until its rows reach the clip (3 x 4 = 12)
    assert all(counts[row] <= 4 for row in order)
    order, repeats = cluster_clip(labels, 1000, clip=2, seed=0)
    assert sum(repeats) == 2 * len(labels)  # every row drawn up to the clip, then no slot left to fill


def test_rank_with_dq_and_clusterclip(tiny_run, tmp_path):
    import json

    from click.testing import CliRunner

    from influence.cli import main

    runner = CliRunner()
    for algorithm, extra in (("dq", ["--dq-bins", "3"]), ("clusterclip", ["--clip", "2", "--clusters", "3"])):
        out = tmp_path / algorithm
        result = runner.invoke(main, ["rank", "--run", tiny_run["run"], "--method", "random", "--fraction", "0.3",
                                      "--diversify", algorithm, "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines() if line]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["selection"]["diversify"]["algorithm"] == algorithm
        if algorithm == "clusterclip":
            assert sum(r["weight"] for r in records) == summary["selection"]["diversify"]["training_slots"]
            assert all(1 <= r["weight"] <= 2 for r in records)
        else:
            assert "weight" not in records[0] and len(records) == int(0.3 * 23)
