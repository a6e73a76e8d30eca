import numpy as np
import pandas as pd
import pytest
import torch

from influence.config import check
from influence.core.chunks import ChunkedStore
from influence.errors import InfluenceError
from influence.gradients.collect import project_grads
from influence.gradients.store import GradientStore
from influence.models.loading import LoraSettings
from influence.scoring import registry, score
from influence.scoring.dynamics import count_forgetting, forgetting_table
from influence.scoring.forward import METRICS, compute_forward_scores
from influence.selection.modes import select
from influence.selection.settings import RankSettings
from influence.train.run import Run
from influence.train.warmup import WarmupConfig, warmup

from .conftest import group, write_jsonl


@pytest.mark.parametrize(
    "sequence,events",
    [
        ([1, 0, 1, 0], 2),
        ([1, 1, 1], 0),
        ([0, 1, 1, 0, 1], 1),
        ([0, 0, 0], 3),  # never learned: as many as there were presentations
        ([1, 0, 0, 1, 1, 0], 2),
        ([0, 1], 0),
    ],
)
def test_forgetting_counts_by_hand(sequence, events):
    assert count_forgetting(sequence) == events


def test_forgetting_table_prefers_whole_pool_evaluations():
    rows = [("train", 1, "a", 1.0)]  # a training presentation of a only, then whole-pool evaluations
    rows += [("eval", 1, "a", 1.0), ("eval", 2, "a", 0.6), ("eval", 3, "a", 1.0)]
    rows += [("eval", 1, "b", 0.2), ("eval", 2, "b", 1.0), ("eval", 3, "b", 0.9)]
    dynamics = pd.DataFrame([{"phase": p, "epoch": e, "step": e, "id": i, "token_accuracy": acc,
                              "exact_match": acc == 1.0} for p, e, i, acc in rows])
    table = forgetting_table(dynamics).set_index("id")
    assert table.loc["a", "forgetting_events"] == 1 and table.loc["a", "presentations"] == 3
    assert table.loc["b", "forgetting_events"] == 1 and not table.loc["b", "unforgettable"]
    # with "learned" = token accuracy >= 0.5, a is never forgotten and b is learned at epoch 2 and kept
    soft = forgetting_table(dynamics, learned_threshold=0.5).set_index("id")
    assert soft.loc["a", "forgetting_events"] == 0 and soft.loc["b", "forgetting_events"] == 0
    assert soft["unforgettable"].all()


DIM = 16

@pytest.fixture(scope="module")
def memorised_run(tmp_path_factory):
    """Known ordering by construction: half of the responses are 'aaaaaaaaaaaa', half random letters.
    After a warm-up on the whole pool the model predicts 'a' well, so the repeated responses must be
    easier (lower loss and EL2N, learned and never forgotten, smaller gradients)."""
    folder = tmp_path_factory.mktemp("memorised")
    rng = np.random.default_rng(0)
    letters = np.array(list("bcdefghijklmnopqrstuvwxyz"))
    records = [{"prompt": f"item {i}:", "completion": "a" * 12 if i % 2 == 0 else "".join(rng.choice(letters, 12))}
               for i in range(12)]
    pool = write_jsonl(folder / "pool.jsonl", records)
    config = WarmupConfig(model="tiny-llama", train_files=[str(pool)], out=str(folder / "run"),
                          lora=LoraSettings(16, 32, 0.0, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]),
                          fraction=1.0, epochs=6, learning_rate=3e-2, warmup_ratio=0.0, batch_size=4,
                          grad_accum=1, max_length=64, seed=0, track_all=True)
    run = warmup(config, progress=False)
    compute_forward_scores(run.path, batch_size=4, chunk_size=5, progress=False)
    project_grads(run.path, None, proj_dim=DIM, chunk_size=5, progress=False)
    easy = np.array([i % 2 == 0 for i in range(12)])
    return run.path, easy


def _scores(run_dir, method):
    return score(method, run_dir).score


def test_forward_scores_are_consistent(memorised_run):
    run_dir, _ = memorised_run
    run = Run(run_dir)
    for checkpoint in run.checkpoints():
        forward = ChunkedStore.open(run.store_path, f"forward-train/{checkpoint.name}")
        grads = GradientStore.open(run.store_path, group("train", checkpoint.name, DIM))
        assert forward.complete and forward.array("finite").all()
        # the scoring pass and the gradient pass compute the same response loss
        np.testing.assert_allclose(forward.array("nll"), grads.array("loss"), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(forward.array("ppl"), np.exp(forward.array("nll")), rtol=1e-5)
        assert (forward.array("el2n") >= 0).all() and (forward.array("el2n") <= np.sqrt(2) + 1e-6).all()
        for m in ("mean_margin", "min_margin", "least_confidence"):
            assert ((forward.array(m) >= 0) & (forward.array(m) <= 1)).all()
        assert (forward.array("min_margin") <= forward.array("mean_margin") + 1e-6).all()
        assert (forward.array("ifd") > 0).all()
    assert set(METRICS) <= set(registry())


def test_known_ordering_easy_vs_random(memorised_run):
    run_dir, easy = memorised_run
    for method in ("nll", "ppl", "el2n", "grand"):
        values = _scores(run_dir, method)
        assert values[easy].max() < values[~easy].min(), method
    # the random responses are never reproduced exactly: as many forgetting events as presentations
    # (6 whole-pool evaluations); the hand-computed sequences above test the counting itself
    forgetting = _scores(run_dir, "forgetting")
    assert np.isfinite(forgetting).all()  # --track-all: every example has presentations
    assert (forgetting[~easy] == 6).all()


def test_forward_store_resume_refuses_other_settings(memorised_run):
    from influence.errors import StoreMismatchError

    run_dir, _ = memorised_run
    with pytest.raises(StoreMismatchError) as info:
        compute_forward_scores(run_dir, chunk_size=7, progress=False)
    assert info.value.field == "chunk_size"


def test_selection_modes():
    table = pd.DataFrame({"id": list("abcdefghij"), "score": np.arange(10.0)[::-1], "finite": [True] * 9 + [False]})
    table["rank"] = range(1, 11)
    assert select(table, "top", 0.2)["id"].tolist() == ["a", "b"]
    assert select(table, "bottom", 0.2)["id"].tolist() == ["i", "h"]  # j is unscorable, never selected
    assert select(table, "middle", band=(0.25, 0.75))["score"].between(2, 7).all()
    assert select(table, "below", threshold=3)["id"].tolist() == ["h", "i"]
    assert select(table, "above", threshold=7)["id"].tolist() == ["a", "b"]
    with pytest.raises(InfluenceError, match="needs --threshold"):  # rank's settings refuse it before any work
        check(RankSettings(mode="below"))


class FixedDistribution(torch.nn.Module):
    """A 'model' whose next-token distribution is the same everywhere: softmax(log_probs)."""

    def __init__(self, probs):
        super().__init__()
        self.log_probs = torch.log(torch.tensor(probs))

    def forward(self, input_ids, attention_mask=None, logits_to_keep=None):
        """Slices as transformers does: a boolean (batch, seq) mask, or 1-D positions of every row."""
        logits = self.log_probs.expand(*input_ids.shape, -1)
        if logits_to_keep is not None:
            logits = logits[logits_to_keep] if logits_to_keep.dtype == torch.bool else logits[:, logits_to_keep]
        return type("Out", (), {"logits": logits})


def test_token_metrics_by_hand():
    from influence.scoring.forward import token_metrics

    probs = [0.7, 0.2, 0.1]
    model = FixedDistribution(probs)
    ids = torch.tensor([[2, 0, 0, 1], [2, 1, 2, 0]])
    labels = torch.tensor([[-100, 0, 0, -100], [-100, 1, 2, 0]])  # row 0: 'a','a'; row 1: 'b','c','a'
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    m = token_metrics(model, batch)
    p = np.array(probs)
    np.testing.assert_allclose(m["nll"].numpy(), [-np.log(0.7), -np.mean(np.log([0.2, 0.1, 0.7]))], rtol=1e-5)
    el2n = lambda y: np.sqrt(np.sum((p - np.eye(3)[y]) ** 2))  # noqa: E731
    np.testing.assert_allclose(m["el2n"].numpy(), [el2n(0), np.mean([el2n(1), el2n(2), el2n(0)])], rtol=1e-5)
    np.testing.assert_allclose(m["entropy"].numpy(), [-(p * np.log(p)).sum()] * 2, rtol=1e-5)
    np.testing.assert_allclose(m["mean_margin"].numpy(), [0.5, 0.5], rtol=1e-5)
    np.testing.assert_allclose(m["least_confidence"].numpy(), [0.3, 0.3], rtol=1e-5)
    # the whole text of row 0: tokens 0, 0, 1 after the first
    np.testing.assert_allclose(m["nll_full"][0].item(), -np.mean(np.log([0.7, 0.7, 0.2])), rtol=1e-5)
    assert m["nll"][0] < m["nll"][1] and m["el2n"][0] < m["el2n"][1]  # the likelier response is easier
