"""LESS's baselines (random, bm25, dsir, rds), targets keyed by content, several targets, top-k, length bias."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from influence.cli import main
from influence.core.chunks import ChunkedStore
from influence.data.formats import load_pool
from influence.data.targets import load_target
from influence.errors import InfluenceError
from influence.gradients.collect import project_grads
from influence.gradients.representations import compute_representations
from influence.scoring import score, score_many
from influence.scoring.baselines import dsir_log_weights, example_text
from influence.selection.modes import select
from influence.selection.outputs import spearman
from influence.selection.rank import rank, rank_many
from influence.train.run import Run

from .conftest import write_jsonl
from .test_store import _copy_run


def test_random_is_seeded_and_uniform(tiny_run):
    a, b, c = (score("random", tiny_run["run"], seed=s).score for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and ((a >= 0) & (a < 1)).all()


def test_bm25_is_mean_over_subtask_queries_then_max(tiny_run):
    import bm25s

    scores = score("bm25", tiny_run["run"], tiny_run["target"])
    pool = load_pool(Run(tiny_run["run"]).train_files)
    targets = load_target(tiny_run["target"])
    # independent: one query at a time against a fresh index
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([example_text(e) for e in pool], show_progress=False), show_progress=False)
    for j, name in enumerate(scores.task_names):
        queries = [t for t in targets if t.task == name]
        per_query = [retriever.get_scores(bm25s.tokenize(example_text(q), return_ids=False, show_progress=False)[0])
                     for q in queries]
        np.testing.assert_allclose(scores.per_task[:, j], np.mean(per_query, axis=0), rtol=1e-5)
    np.testing.assert_allclose(scores.score, scores.per_task.max(axis=1), rtol=1e-6)
    # the "Add i and i+1" examples share words with the target's "Add i and 1" prompts
    adds = np.array([e.id.startswith("chat") for e in pool])
    assert scores.score[adds].mean() > scores.score[~adds].mean()


def _sha_bucket(token, buckets=10_000):
    return int(hashlib.sha256(token.encode()).hexdigest(), 16) % buckets


def test_dsir_log_weight_is_the_log_likelihood_ratio(tiny_run):
    scores = score("dsir", tiny_run["run"], tiny_run["target"], seed=3)
    pool = load_pool(Run(tiny_run["run"]).train_files)
    targets = load_target(tiny_run["target"])
    # independent: hashed unigrams + bigrams of word-punct tokens, two bag-of-words models, log ratio
    import re

    def counts(text):
        words = re.findall(r"\w+|[^\w\s]+", text.lower())
        grams = words + [" ".join(p) for p in zip(words, words[1:])]
        out = np.zeros(10_000)
        for g in grams:
            out[_sha_bucket(g)] += 1
        return out

    p_counts = np.stack([counts(example_text(e)) for e in pool])
    t_counts = np.stack([counts(example_text(t)) for t in targets])
    p_raw, p_tgt = p_counts.sum(0) / p_counts.sum(), t_counts.sum(0) / t_counts.sum()
    expected = p_counts @ (np.log(p_tgt + 1e-8) - np.log(p_raw + 1e-8))
    np.testing.assert_allclose(scores.columns["log_importance_weight"], expected, rtol=1e-9)
    np.testing.assert_allclose(dsir_log_weights(p_counts, t_counts), expected)
    noise = scores.score - expected  # Gumbel, seeded
    np.testing.assert_allclose(noise, np.random.default_rng(3).gumbel(size=len(pool)))


def test_rds_is_last_token_cosine_and_resumes(tiny_run, tmp_path, monkeypatch):
    import torch

    from influence.data.templates import collate, encode_example
    from influence.models.loading import load_adapter, load_base_model

    run_dir = _copy_run(tiny_run, tmp_path, "rds")
    import influence.gradients.representations as rds

    calls = {"n": 0}
    original = rds.last_token_states

    def flaky(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return original(model, batch)

    monkeypatch.setattr(rds, "last_token_states", flaky)
    with pytest.raises(KeyboardInterrupt):
        compute_representations(run_dir, tiny_run["target"], batch_size=4, chunk_size=5, progress=False)
    monkeypatch.setattr(rds, "last_token_states", original)
    scores = score("rds", run_dir, tiny_run["target"])  # finishes the interrupted store first
    # independent: full forward of each example alone, last position's final hidden state
    run = Run(run_dir)
    base, tokenizer = load_base_model("tiny-llama")
    model = load_adapter(base, run.checkpoints()[-1].path).eval()

    def rep(example):
        batch = collate([encode_example(example, tokenizer, run.max_length)], tokenizer.pad_token_id)
        with torch.no_grad():
            return model(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                         output_hidden_states=True).hidden_states[-1][0, -1].numpy()

    pool = np.stack([rep(e) for e in load_pool(run.train_files)])
    targets = load_target(tiny_run["target"])
    t = np.stack([rep(e) for e in targets])
    cos = (pool / np.linalg.norm(pool, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    tasks = np.array([e.task for e in targets])
    expected = np.stack([cos[:, tasks == name].mean(1) for name in scores.task_names], 1).max(1)
    np.testing.assert_allclose(scores.score, expected, rtol=1e-4, atol=1e-5)
    stores = list((run.path / "grads.zarr" / "reps").glob("*/epoch-2"))
    assert len(stores) == 2 and all(ChunkedStore.open(run.store_path, str(p.relative_to(run.path / "grads.zarr"))).complete
                                    for p in stores)


def test_target_with_same_name_but_other_content_is_refused(tiny_run, tmp_path):
    """Two files named tgt.jsonl: each gets its own stores; a changed file is refused, never mixed."""
    run_dir = _copy_run(tiny_run, tmp_path, "names")
    first = tiny_run["target"]
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    second = str(write_jsonl(other_dir / "tgt.jsonl", [
        {"prompt": f"Colour {i}?", "completion": "blue", "task": "words"} for i in range(4)]))
    project_grads(run_dir, first, proj_dim=64, chunk_size=5, progress=False)
    project_grads(run_dir, second, proj_dim=64, chunk_size=5, include_train=False, progress=False)
    a, b = score("less", run_dir, first), score("less", run_dir, second)
    assert a.details["target_store"] != b.details["target_store"]
    assert b.task_names == ["words"] and a.task_names == ["math", "words"]
    np.testing.assert_allclose(a.score, score("less", tiny_run["run"], first).score, rtol=1e-5, atol=2e-6)
    # the file changes after project-grads: refused with what to do
    changed = tmp_path / "changed"
    changed.mkdir()
    shutil.copy(first, changed / "tgt2.jsonl")
    project_grads(run_dir, str(changed / "tgt2.jsonl"), proj_dim=64, chunk_size=5, include_train=False, progress=False)
    with open(changed / "tgt2.jsonl", "a") as fh:
        fh.write(json.dumps({"prompt": "Add 9 and 1.", "completion": "10", "task": "math"}) + "\n")
    with pytest.raises(InfluenceError, match="changed since its gradients were computed"):
        rank(run_dir, str(changed / "tgt2.jsonl"), out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_subtask_store_is_found_without_target_tasks(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "subset")
    project_grads(run_dir, tiny_run["target"], proj_dim=64, chunk_size=5, target_tasks=["math"], progress=False)
    only_math = score("less", run_dir, tiny_run["target"])
    assert only_math.task_names == ["math"]
    np.testing.assert_allclose(only_math.score, score("less", tiny_run["run"], tiny_run["target"]).per_task[:, 0],
                               rtol=1e-5, atol=1e-6)
    project_grads(run_dir, tiny_run["target"], proj_dim=64, chunk_size=5, include_train=False, progress=False)
    assert score("less", run_dir, tiny_run["target"]).task_names == ["math", "words"]  # the full target wins


def test_several_targets_in_one_pass_equal_one_by_one(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "many")
    other = str(write_jsonl(tmp_path / "colours.jsonl", [
        {"prompt": f"Colour {i}?", "completion": "red", "task": ["a", "b", "c"][i % 3]} for i in range(6)]))
    project_grads(run_dir, tiny_run["target"], proj_dim=64, chunk_size=5, progress=False)
    project_grads(run_dir, other, proj_dim=64, chunk_size=5, include_train=False, progress=False)
    together = score_many("less", run_dir, [tiny_run["target"], other], rows_per_block=4)
    for target, scores in zip((tiny_run["target"], other), together):
        alone = score("less", run_dir, target)
        np.testing.assert_allclose(scores.score, alone.score, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(scores.per_task, alone.per_task, rtol=1e-5, atol=2e-6)
        assert scores.task_names == alone.task_names
    tables = rank_many(run_dir, [tiny_run["target"], other], out=tmp_path / "out", top_k=3)
    for name in ("tgt", "colours"):
        summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
        assert summary["n_selected"] == 3 and summary["selection"]["top_k"] == 3
    assert len(tables) == 2


def test_cli_rank_baselines_several_targets_and_top_k(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "cli")
    other = str(write_jsonl(tmp_path / "colours.jsonl", [
        {"prompt": f"Colour {i}?", "completion": "red", "task": ["a", "b"][i % 2]} for i in range(4)]))
    runner = CliRunner()
    result = runner.invoke(main, ["project-grads", "--run", str(run_dir), "--target", tiny_run["target"],
                                  "--proj-dim", "32,64", "--chunk-size", "5", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["project-grads", "--run", str(run_dir), "--target", other, "--skip-train",
                                  "--proj-dim", "64", "--chunk-size", "5"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["rank", "--run", str(run_dir), "--target", tiny_run["target"]])
    assert result.exit_code == 2 and "--proj-dim" in result.output  # two dimensions stored: choose
    for method in ("less", "random", "bm25", "dsir", "rds"):
        out = tmp_path / f"rank-{method}"
        result = runner.invoke(main, ["rank", "--run", str(run_dir), "--method", method, "--target", tiny_run["target"],
                                      "--target", other, "--top-k", "4", "--proj-dim", "64", "--out", str(out)]
                               if method == "less" else
                               ["rank", "--run", str(run_dir), "--method", method, "--target", tiny_run["target"],
                                "--target", other, "--top-k", "4", "--out", str(out)])
        assert result.exit_code == 0, (method, result.output)
        for name in ("tgt", "colours"):
            summary = json.loads((out / name / "summary.json").read_text())
            assert summary["method"] == method and summary["n_selected"] == 4
            assert summary["length_bias"]["pool"]["n"] == 23 and summary["length_bias"]["selected"]["n"] == 4
            assert len((out / name / "selected.jsonl").read_text().splitlines()) == 4
    result = runner.invoke(main, ["rank", "--run", str(run_dir), "--method", "grand", "--seed", "3"])
    assert result.exit_code == 2 and "--seed does not apply to --method grand" in result.output


def test_selection_counts_like_less_and_length_bias_is_reported(tiny_run, tmp_path):
    table = rank(tiny_run["run"], tiny_run["target"], fraction=0.3, out=tmp_path / "r")
    assert (table["rank"].diff().dropna() == 1).all()
    assert len(select(table, fraction=0.3)) == int(0.3 * 23)  # LESS: int(percentage * total)
    assert len(select(table, top_k=5)) == 5
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    rho = summary["length_bias"]["spearman_score_vs_length"]
    assert rho == pytest.approx(spearman(table["score"], table["response_chars"]))
    lengths = table.set_index("id")["response_chars"]
    selected = [json.loads(line) for line in (tmp_path / "r" / "selected.jsonl").read_text().splitlines()]
    assert summary["length_bias"]["selected"]["n"] == len(selected)
    assert summary["length_bias"]["selected"]["median"] == pytest.approx(
        float(np.median([lengths[i] for i in summary["selected_ids"]])))


def test_spearman_against_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    assert spearman([1, 2, 3, np.nan, 5], [1, 3, 2, 7, 5]) == pytest.approx(0.8)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_compare_reports_overlap_and_length_bias(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "compare")
    project_grads(run_dir, tiny_run["target"], proj_dim=64, chunk_size=5, progress=False)
    result = CliRunner().invoke(main, ["compare", "--run", str(run_dir), "--target", tiny_run["target"],
                                       "--methods", "less,random,bm25,dsir", "--fraction", "0.3"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert "top_0.3_overlap_with_less" in lines[0] and len(lines) == 5
    less_row = next(line.split() for line in lines if line.split()[0] == "less")
    assert float(less_row[1]) == 1.0 and float(less_row[2]) == 1.0  # less against itself
    for method in ("less", "random", "bm25", "dsir"):
        assert (run_dir / "compare-tgt" / method / "summary.json").is_file()  # never over a ranking of the user
