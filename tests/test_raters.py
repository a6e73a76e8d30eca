"""The rater backend and the rated methods: alpagasus and autods against the test's OpenAI-compatible server (answers
known in advance), with retries, refusals, malformed answers, the cache, the dry run and the key kept out of the run;
a local rater model; reward and necessity against the tiny reward model scored directly."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from influence.cli import main

from .conftest import write_jsonl

RESPONSES = ["one two three", "a b c d e f g", "REFUSE this please", "GARBLE it", "FLAKY answer here now",
             "short", "seven words are in this one", "x y"]


@pytest.fixture(scope="module")
def rated_run(tmp_path_factory):
    from influence.models.loading import LoraSettings, ModelLoading
    from influence.train.warmup import WarmupConfig, warmup

    folder = tmp_path_factory.mktemp("rated")
    data = write_jsonl(folder / "pool.jsonl", [{"prompt": f"Question {i}?", "completion": r}
                                               for i, r in enumerate(RESPONSES)])
    warmup(WarmupConfig(model="tiny-llama", train_files=[str(data)], out=str(folder / "run"),
                        lora=LoraSettings(4, 16, 0.0, ["q_proj"]), fraction=0.5, epochs=1, batch_size=4, max_length=64,
                        loading=ModelLoading(dtype="fp32")), progress=False)
    return str(folder / "run")


def _rank(run: str, out, *flags: str, codes: tuple[int, ...] = (0,)):
    result = CliRunner().invoke(main, ["rank", "--run", run, "--out", str(out), *flags])
    assert result.exit_code in codes, result.output
    return pd.read_parquet(out / "scores.parquet").set_index("id"), result.output


def test_alpagasus_on_an_endpoint(rated_run, rater_server, tmp_path, monkeypatch):
    url, stats = rater_server
    monkeypatch.setenv("INFLUENCE_TEST_KEY", "sk-secret-test")
    flags = ["--method", "alpagasus", "--rater", url, "--rater-model", "stub", "--rater-key-env", "INFLUENCE_TEST_KEY"]
    before = stats.calls
    result = CliRunner().invoke(main, ["rank", "--run", rated_run, "--out", str(tmp_path / "dry"), *flags,
                                       "--rater-dry-run"])
    assert result.exit_code != 0 and "8 to make" in result.output and stats.calls == before  # nothing asked
    scores, output = _rank(rated_run, tmp_path / "a", *flags)
    assert stats.calls == before + 9  # 8 prompts, the FLAKY one twice (429, then answered)
    assert "Bearer sk-secret-test" in stats.authorizations
    for i, response in enumerate(RESPONSES):
        row = scores.loc[f"pool.jsonl#{i}"]
        if "REFUSE" in response:
            assert np.isnan(row["score"]) and row["rating_error"].startswith("refused")
        elif "GARBLE" in response:
            assert np.isnan(row["score"]) and "no rating" in row["rating_error"]
        else:
            assert row["score"] == len(response.split()) % 6 and row["rating_error"] == ""
    calls = stats.calls
    again, _ = _rank(rated_run, tmp_path / "b", *flags)
    assert stats.calls == calls  # every answer from the run's cache
    pd.testing.assert_series_equal(again["score"].sort_index(), scores["score"].sort_index())
    for path in Path(rated_run).rglob("*"):
        if path.is_file():
            assert b"sk-secret-test" not in path.read_bytes(), path  # the key is never written


def test_autods_reads_the_yes_probability(rated_run, rater_server, tmp_path):
    url, _ = rater_server
    scores, _ = _rank(rated_run, tmp_path / "autods", "--method", "autods", "--rater", url, "--rater-model", "stub")
    for i, response in enumerate(RESPONSES):
        p = 0.2 + 0.6 * (len(response.split()) % 2)  # the server's P(YES), asked for each of the two questions
        row = scores.loc[f"pool.jsonl#{i}"]
        if "REFUSE" in response:
            assert np.isnan(row["score"])
        else:
            assert row["score"] == pytest.approx(p * p, rel=1e-6)


def test_a_local_rater_and_a_prompt_file(rated_run, tmp_path, monkeypatch):
    import influence.models.raters as raters

    template = tmp_path / "prompt.txt"
    template.write_text("Rate 0-5: {instruction} / {response}")
    asked = []
    original = raters.LocalBackend._ask
    monkeypatch.setattr(raters.LocalBackend, "_ask", lambda self, r: asked.append(r) or original(self, r))
    scores, _ = _rank(rated_run, tmp_path / "local", "--method", "alpagasus", "--rater", "tiny-llama", "--prompt-file",
                      str(template), codes=(0, 3))  # 3: a random model rates nothing (a degenerate ranking)
    assert len(asked) == len(RESPONSES) and asked[0].prompt.startswith("Rate 0-5: Question 0?")
    unscorable = scores[scores["score"].isna()]
    assert (unscorable["rating_error"] != "").all()  # a random model's answers: unscorable with a reason, not 0
    asked.clear()
    _rank(rated_run, tmp_path / "local2", "--method", "alpagasus", "--rater", "tiny-llama", "--prompt-file",
          str(template), codes=(0, 3))
    assert asked == []  # cached
    template.write_text("Rate: {instruction}")
    result = CliRunner().invoke(main, ["rank", "--run", rated_run, "--method", "alpagasus", "--rater", "tiny-llama",
                                       "--prompt-file", str(template), "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "{response}" in result.output


def test_reward_and_necessity_equal_the_reward_model_run_directly(rated_run, tiny_reward_model, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)

    def reward(instruction: str, response: str) -> float:
        with torch.no_grad():
            ids = tokenizer(f"{instruction}\n\n{response}", return_tensors="pt")
            return float(model(**ids).logits[0, 0])

    scores, _ = _rank(rated_run, tmp_path / "reward", "--method", "reward", "--reward-model", tiny_reward_model)
    for i, response in enumerate(RESPONSES):
        assert scores.loc[f"pool.jsonl#{i}", "score"] == pytest.approx(reward(f"Question {i}?", response), abs=1e-4)
    needed, _ = _rank(rated_run, tmp_path / "necessity", "--method", "necessity", "--reward-model", tiny_reward_model,
                      "--max-new-tokens", "8")
    for i in range(len(RESPONSES)):
        row = needed.loc[f"pool.jsonl#{i}"]
        assert row["score"] == pytest.approx(-reward(f"Question {i}?", row["own_answer"]), abs=1e-4)
    result = CliRunner().invoke(main, ["rank", "--run", rated_run, "--method", "reward", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "give --reward-model" in result.output
    assert re.search(r"needs a reward model", result.output)


def test_qurater_orders_by_the_judgments_and_bsdetector_combines_its_parts(rated_run, rater_server, tmp_path):
    from scipy.stats import spearmanr

    from influence.scoring.raters import token_f1

    url, _ = rater_server
    flags = ["--rater", url, "--rater-model", "stub"]
    scores, _ = _rank(rated_run, tmp_path / "qurater", "--method", "qurater", "--pairs", "5", *flags)
    words = {f"pool.jsonl#{i}": len(r.split()) for i, r in enumerate(RESPONSES)}
    judged = scores.dropna(subset=["score"])
    assert "pool.jsonl#2" not in judged.index  # the refused one: no comparison, unscorable
    assert len(judged) == len(RESPONSES) - 1
    assert spearmanr(judged["score"], [words[i] for i in judged.index])[0] > 0.95
    assert abs(judged["score"].mean()) < 0.2
    confidence, _ = _rank(rated_run, tmp_path / "bsdetector", "--method", "bsdetector", "--samples", "3", *flags)
    for i, response in enumerate(RESPONSES):
        row = confidence.loc[f"pool.jsonl#{i}"]
        if "REFUSE" in response:
            assert np.isnan(row["score"])
            continue
        observed = 0.8 * token_f1("one two three four", response) + 0.2 * (response == "one two three four")
        certainty = 1.0 if len(response.split()) % 2 == 0 else 0.0
        assert row["score"] == pytest.approx(0.7 * observed + 0.3 * certainty)
