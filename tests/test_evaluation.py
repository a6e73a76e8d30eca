import numpy as np
import pandas as pd
from click.testing import CliRunner

from influence.cli import main
from influence.data.formats import load_pool
from influence.evaluate.noisy import corrupt_pool, roc_auc


def test_roc_auc():
    positive = np.array([True, True, False, False])
    assert roc_auc(np.array([4.0, 3, 2, 1]), positive) == 1
    assert roc_auc(np.array([1.0, 2, 3, 4]), positive) == 0
    assert roc_auc(np.array([1.0, 1, 1, 1]), positive) == 0.5
    assert roc_auc(np.array([3.0, 1, 2, 0]), positive) == 0.75


def test_corrupt_pool(pool_files):
    pool = load_pool(pool_files)
    records, labels = corrupt_pool(pool, 0.25, seed=0, truncate=True)
    assert len(records) == len(pool) and labels["corrupted"].sum() == 8
    assert set(labels["kind"]) == {"none", "swap", "truncate"}
    for i, row in labels.iterrows():
        original = pool[i].messages[-1]["content"]
        new = records[i]["messages"][-1]["content"]
        if row["kind"] == "none":
            assert new == original
        elif row["kind"] == "truncate":
            assert original.startswith(new) and len(new) < len(original)
        else:
            assert new in {pool[j].messages[-1]["content"] for j in labels.index[labels["kind"] == "swap"]}


def test_evaluate_noisy_cli_on_tiny_model(tmp_path, pool_files):
    out = tmp_path / "noisy"
    result = CliRunner().invoke(main, [
        "evaluate", "noisy", "--model", "tiny-llama", "--out", str(out), "--noise", "0.25", "--truncate",
        "--fraction", "0.5", "--epochs", "2", "--batch-size", "8", "--grad-accum", "1", "--max-length", "64",
        "--lora-r", "4", "--lora-alpha", "8", "--lr", "5e-3", "--proj-dim", "16",
        *sum((["--train", f] for f in pool_files), []),
    ])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "detection.csv")
    assert {"grand", "forgetting", "el2n", "nll", "ifd", "min_margin", "mtld", "knn_distance", "semdedup",
            "ekfac_self"} <= set(table["method"])
    scored = table.set_index("method")["scored"]
    assert table["roc_auc"].between(0, 1).all() and (scored.drop("distinct2") == 32).all()
    assert scored["distinct2"] < 32  # one-word responses have no bigram: undefined, not scored
    assert "found_in_top_10%" in table.columns
    assert (out / "labels.csv").is_file() and "roc_auc" in result.output


def test_rank_cli_with_loss_scores_and_modes(tiny_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "ifd"
    result = runner.invoke(main, ["rank", "--run", tiny_run["run"], "--method", "ifd", "--select", "below",
                                  "--threshold", "1.0", "--out", str(out), "--show", "2"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "scores.csv")
    kept = sum(1 for _ in open(out / "selected.jsonl"))
    assert kept == int((table["score"] < 1).sum())
    result = runner.invoke(main, ["rank", "--run", tiny_run["run"], "--method", "el2n", "--select", "middle",
                                  "--out", str(tmp_path / "el2n")])
    assert result.exit_code == 0 and "(middle)" in result.output
    result = runner.invoke(main, ["rank", "--run", tiny_run["run"], "--method", "less"])
    assert result.exit_code == 2 and "needs --target" in result.output


def test_rank_forgetting_with_learned_threshold(tiny_run, tmp_path):
    import json

    runner = CliRunner()
    out = tmp_path / "forget"
    result = runner.invoke(main, ["rank", "--run", tiny_run["run"], "--method", "forgetting",
                                  "--learned-threshold", "0.5", "--out", str(out)])
    # the tiny model learns no example in 2 epochs: every presented example has the same count, said loudly
    assert result.exit_code == 3 and "every score equals 2" in result.output, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["learned_threshold"] == 0.5 and summary["presented"] == 12  # warm-up examples only
    assert summary["n_unscorable"] == 23 - 12
    assert "11 example(s) could not be scored" in result.output
    result = runner.invoke(main, ["rank", "--run", tiny_run["run"], "--method", "nll", "--learned-threshold", "0.5"])
    assert result.exit_code == 2 and "--learned-threshold does not apply to --method nll" in result.output
