"""Exact metagradients (MAGIC): the derivative through every AdamW step equals the finite difference of retraining
with perturbed weights (float64), predicts what dropping a few examples does (float32), resumes, refuses a run that
does not replay, and feeds ``rank --method magic`` and the single-model LDS."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import spearmanr

from influence.cli import main
from influence.data.formats import Example
from influence.data.templates import collate, encode_example
from influence.errors import InfluenceError
from influence.models.loading import LoraSettings, add_lora, build_tiny_llama
from influence.models.losses import forward_response
from influence.train.loop import LoraTrainer, TrainSettings
from influence.train.replay import Replay, _Bound, measurement_gradient, weighted_training

from .conftest import CHATML


def _examples(n: int, offset: int = 1) -> list[Example]:
    return [Example(id=f"x{i}", source="test", record=i, messages=[
        {"role": "user", "content": f"Add {i} and {i + offset}."},
        {"role": "assistant", "content": f"The sum is {2 * i + offset}."}]) for i in range(n)]


class Problem:
    """A small training in memory: the tiny Llama (float64 or float32) with LoRA dropout, warm-up, clipping,
    accumulation and two epochs, and a target of three examples."""

    def __init__(self, n: int, dtype: torch.dtype, monkeypatch=None, dropout: float = 0.1):
        if dtype == torch.float64 and monkeypatch is not None:
            # transformers' RMSNorm computes in float32 whatever the model's dtype; in float64 the finite
            # differences need every operation in float64.
            from transformers.models.llama import modeling_llama

            def rms_norm(self, hidden):
                return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

            monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
        base, self.tokenizer = build_tiny_llama()
        self.tokenizer.chat_template = CHATML
        self.base = base.to(dtype)
        self.encoded = [encode_example(e, self.tokenizer, 128) for e in _examples(n)]
        self.target = collate([encode_example(e, self.tokenizer, 128) for e in _examples(3, offset=2)],
                              self.tokenizer.pad_token_id)
        self.settings = TrainSettings(lora=LoraSettings(r=4, alpha=8, dropout=dropout, target_modules=["q_proj", "v_proj"]),
                                      epochs=2, learning_rate=1e-2, batch_size=2, grad_accum=2, warmup_ratio=0.1,
                                      max_grad_norm=1.0)

    def trainer(self, weights=None) -> LoraTrainer:
        model = add_lora(copy.deepcopy(self.base), self.settings.lora, 0)
        return LoraTrainer(model, self.encoded, [str(i) for i in range(len(self.encoded))], self.settings,
                           self.tokenizer.pad_token_id, torch.device("cpu"), weights=weights)

    def names(self, trainer) -> dict:
        return {name: trainer.model_names[param] for param, name in trainer.names.items()}

    def target_loss(self, trainer, theta) -> float:
        trainer.model.eval()
        with torch.no_grad():
            bound = _Bound(trainer.model, {self.names(trainer)[k]: v for k, v in theta.items()})
            return float(forward_response(bound, self.target).losses.mean())

    def metagradient(self, max_states_gb=None) -> tuple[np.ndarray, Replay]:
        trainer = self.trainer()
        replay = Replay(trainer, max_states_gb)
        adjoint = replay.metagradients(lambda final: measurement_gradient(
            trainer.model, self.names(trainer), final, [self.target], 3))[0]
        return adjoint.weights.numpy(), replay

    def retrained_loss(self, weights) -> float:
        trainer = self.trainer(weights)
        return self.target_loss(trainer, weighted_training(trainer))


def test_the_metagradient_is_the_finite_difference_of_retraining(monkeypatch):
    """Central differences of retraining with w_i = 1 +- 1e-5 (float64) against the reverse pass, one segment and
    segmented (REPLAY's two levels): relative error below 1e-3 (measured: 1e-8 to 2e-7). In float32 the same check
    (eps 1e-2) agrees to 5-8%, the finite difference's own rounding."""
    problem = Problem(12, torch.float64, monkeypatch)
    whole, replay = problem.metagradient()
    segmented, replay_in_parts = problem.metagradient(max_states_gb=1e-9)
    assert replay.n_segments == 1 and replay_in_parts.n_segments == 2  # 6 steps: segments of ceil(sqrt(6)) = 3
    np.testing.assert_allclose(segmented, whole, rtol=1e-10, atol=1e-15)
    plain = problem.trainer()
    assert all(torch.equal(weighted_training(plain)[k], replay.final[k]) for k in replay.final)  # the replay = training
    eps = 1e-5
    for i in (0, 3, 7):
        up, down = np.ones(12), np.ones(12)
        up[i], down[i] = 1 + eps, 1 - eps
        difference = (problem.retrained_loss(up) - problem.retrained_loss(down)) / (2 * eps)
        assert abs(difference - whole[i]) < 1e-3 * abs(difference), (i, difference, whole[i])


def test_margin_and_accuracy_surrogate_metagradients_are_finite_differences(monkeypatch):
    """``--measure margin`` and ``accuracy-surrogate`` against central differences of retraining, each retrained model
    measured by :func:`influence.models.measure.measure` (the outcomes ``evaluate lds`` compares with), float64."""
    from influence.models.measure import correct_choices, encode_choices, measure
    from influence.train.metagrad import OUTCOME_OF_MEASURE, check_measure, measurement_batches

    problem = Problem(12, torch.float64, monkeypatch)
    targets = [Example(id=f"q{i}", source="test", record=i, choices=[f"{2 * i + 2}", f"{2 * i + 5}", f"{i}"], messages=[
        {"role": "user", "content": f"Add {i} and {i + 2}."}, {"role": "assistant", "content": f"{2 * i + 2}"}])
        for i in range(3)]
    with pytest.raises(InfluenceError, match="--measure margin needs multiple-choice"):
        check_measure("margin", "t", _examples(2))
    trainer = problem.trainer()
    names, replay = problem.names(trainer), Replay(trainer)

    def measurements(final):
        grads = []
        for name in ("margin", "accuracy-surrogate"):
            batches, value = measurement_batches(name, targets, problem.tokenizer, 128, False)
            grads += measurement_gradient(trainer.model, names, final, batches, len(targets), value=value)
        return grads

    margin, surrogate = (a.weights.numpy() for a in replay.metagradients(measurements))
    encoded = [encode_example(e, problem.tokenizer, 128) for e in targets]
    choices, correct = encode_choices(targets, problem.tokenizer, 128), correct_choices(targets)

    def outcomes(weights) -> dict:
        retrained = problem.trainer(weights)
        weighted_training(retrained)
        measured = measure(retrained.model, encoded, problem.tokenizer.pad_token_id, 8, torch.device("cpu"), choices,
                           correct)
        return {name: measured[OUTCOME_OF_MEASURE[name]].mean() for name in ("margin", "accuracy-surrogate")}

    eps = 1e-5
    for i in (0, 5):
        up, down = np.ones(12), np.ones(12)
        up[i], down[i] = 1 + eps, 1 - eps
        high, low = outcomes(up), outcomes(down)
        for name, exact in (("margin", margin[i]), ("accuracy-surrogate", surrogate[i])):
            difference = (high[name] - low[name]) / (2 * eps)
            assert abs(difference - exact) < 1e-3 * abs(difference), (name, i, difference, exact)


def test_weights_of_one_train_as_before_bit_for_bit():
    problem = Problem(8, torch.float32)
    unweighted = weighted_training(problem.trainer())
    weighted = weighted_training(problem.trainer(np.ones(8)))
    assert all(torch.equal(unweighted[k], weighted[k]) for k in unweighted)


def test_the_metagradient_predicts_dropping_a_few_examples():
    """20 random drops of 1-2% of 100 examples (weights 0, same order and seeds): Spearman between the predicted
    change of the target loss (minus the dropped metagradients' sum) and the retrained one (measured: 0.995).
    Without LoRA dropout: with dropout 0.1 (the same masks in every retraining) the derivative is still exact (the
    finite-difference test trains with it) but dropping whole examples is far from linear: Spearman 0.52 here, as
    Bergson's MAGIC experiments found with dropout on."""
    problem = Problem(100, torch.float32, dropout=0.0)
    metagradient, replay = problem.metagradient()
    base = problem.target_loss(replay.trainer, replay.final)
    rng = np.random.default_rng(0)
    predicted, actual = [], []
    for _ in range(20):
        dropped = rng.choice(100, size=rng.integers(1, 3), replace=False)
        weights = np.ones(100)
        weights[dropped] = 0
        predicted.append(-metagradient[dropped].sum())
        actual.append(problem.retrained_loss(weights) - base)
    assert spearmanr(predicted, actual)[0] >= 0.95


@pytest.fixture(scope="module")
def magic_run(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("magic")
    shutil.copytree(tiny_run["run"], folder / "run", ignore=shutil.ignore_patterns("subsets.zarr"))
    return {**tiny_run, "run": str(folder / "run")}


def test_metagrad_command_and_rank(magic_run, tmp_path):
    runner = CliRunner()
    run, target = magic_run["run"], magic_run["target"]
    result = runner.invoke(main, ["rank", "--run", run, "--target", target, "--method", "magic"])
    assert result.exit_code != 0 and "influence metagrad --run" in result.output
    result = runner.invoke(main, ["metagrad", "--run", run, "--target", target, "--dry-run"])
    assert result.exit_code == 0 and "optimizer steps" in result.output
    result = runner.invoke(main, ["metagrad", "--run", run, "--target", target, "--per-target-example",
                                  "--max-states-gb", "1e-9"])
    assert result.exit_code == 0, result.output
    assert "metagradients of" in result.output
    from influence.train.metagrad import load_metagradients
    from influence.train.run import Run

    found = load_metagradients(Run(run), target)
    assert found.per_target is not None and found.weights.shape[1] == len(Run(run).manifest["warmup_ids"])
    np.testing.assert_allclose(found.per_target.mean(axis=0), found.mean, rtol=1e-4, atol=1e-9)  # linear in the target
    assert found.meta["segments"] > 1 and found.meta["replay_relative_difference"] < 1e-6
    out = tmp_path / "magic"
    result = runner.invoke(main, ["rank", "--run", run, "--target", target, "--method", "magic", "--out", str(out)])
    assert result.exit_code == 0, result.output
    import pandas as pd

    scores = pd.read_csv(out / "scores.csv")
    trained = set(Run(run).manifest["warmup_ids"])
    assert scores.dropna(subset=["score"])["id"].isin(trained).all()  # the others are unscorable
    assert scores["score"].notna().sum() == len(trained)


def test_metagrad_resumes_after_a_segment(magic_run, monkeypatch):
    """Killed after its first reversed segment, the computation resumes there and ends with the same numbers."""
    import influence.train.replay as replay_module
    from influence.train.metagrad import load_metagradients, metagrad
    from influence.train.run import Run

    run, target = magic_run["run"], magic_run["target"]
    whole = metagrad(run, target, max_states_gb=1e-9, overwrite=True, progress=False)
    expected = load_metagradients(Run(run), target).mean.copy()
    original = replay_module.Replay.reverse_step
    calls = {"n": 0}

    def dying(self, record, adjoints):
        calls["n"] += 1
        if calls["n"] > self.segment:  # after the last segment's steps, before the next one's
            raise KeyboardInterrupt("simulated crash")
        return original(self, record, adjoints)

    (whole / "metagrad.npz").unlink()
    monkeypatch.setattr(replay_module.Replay, "reverse_step", dying)
    with pytest.raises(KeyboardInterrupt):
        metagrad(run, target, max_states_gb=1e-9, progress=False)
    assert (whole / "partial.pt").is_file()
    resumed = {"n": 0}

    def counting(self, record, adjoints):
        resumed["n"] += 1
        return original(self, record, adjoints)

    monkeypatch.setattr(replay_module.Replay, "reverse_step", counting)
    metagrad(run, target, max_states_gb=1e-9, progress=False)
    np.testing.assert_array_equal(load_metagradients(Run(run), target).mean, expected)
    steps, segment = Run(run).manifest["steps"]["total"], calls["n"] - 1
    last = steps - (-(-steps // segment) - 1) * segment
    assert resumed["n"] == steps - last  # the reversed segment was not reversed again
    assert not (whole / "partial.pt").exists()


def test_a_run_that_does_not_replay_is_refused(magic_run, tmp_path):
    """A checkpoint that is not what the replay makes (here: changed on disk) stops the computation, saying why."""
    from safetensors.torch import load_file, save_file

    from influence.train.metagrad import metagrad
    from influence.train.run import Run

    shutil.copytree(magic_run["run"], tmp_path / "run", ignore=shutil.ignore_patterns("metagrad"))
    first = Run(tmp_path / "run").checkpoints()[0]
    tensors = load_file(str(first.adapter_file))
    save_file({k: v * 1.01 for k, v in tensors.items()}, str(first.adapter_file))
    with pytest.raises(InfluenceError, match="cannot be replayed here"):
        metagrad(tmp_path / "run", magic_run["target"], progress=False)


def test_single_model_lds_on_drops(magic_run):
    """``evaluate lds --design drop``: replays of the run with 1 or 2 of its 11 training examples' weights at 0 (9%
    and 18%: far larger steps than MAGIC's 1%), 8 models each. Measured: magic 0.79 / 0.86, less 0.42 / 0.45, random
    0.06 / 0.12."""
    run, target = magic_run["run"], magic_run["target"]
    runner = CliRunner()
    result = runner.invoke(main, ["metagrad", "--run", run, "--target", target, "--per-target-example"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["evaluate", "lds", "--run", run, "--target", target, "--design", "drop",
                                  "--drop", "0.1,0.2", "--k", "8", "--methods", "magic,less,random", "--json"])
    assert result.exit_code == 0, result.output
    table = {(row["method"], row["drop"]): row["lds"] for row in json.loads(result.stdout)}
    assert table[("magic", 0.1)] > 0.7 and table[("magic", 0.2)] > 0.7
    assert all(table[("magic", f)] > table[("less", f)] + 0.2 for f in (0.1, 0.2))
    assert all(abs(table[("random", f)]) < 0.5 for f in (0.1, 0.2))


def test_the_plus_eps_metagradient_is_the_finite_difference_of_adding_a_candidate(monkeypatch):
    """MGD's candidate signal: adding ``eps`` times candidate x's loss / B to the step ``back`` steps before the end
    (the reference's plus-epsilon copy) changes the final target loss by ``eps g_x``: central differences in float64
    against the truncated reverse pass and the forward-mode product, to 1e-6."""
    from influence.train.replay import loss_directional_derivatives, state_of

    problem = Problem(12, torch.float64, monkeypatch)
    candidates = [encode_example(e, problem.tokenizer, 128) for e in _examples(3, offset=5)]
    trainer = problem.trainer()
    names = problem.names(trainer)
    replay = Replay(trainer, None)
    back = 2
    record, direction = replay.truncated(lambda final: measurement_gradient(
        trainer.model, names, final, [problem.target], 3), back)
    batch = collate(candidates, problem.tokenizer.pad_token_id)
    signal = loss_directional_derivatives(trainer.model, names, record.theta, direction, [batch]) / trainer.per_step
    for x in range(3):
        values = []
        for eps in (1e-5, -1e-5):
            perturbed = problem.trainer()

            def add_candidate(t, eps=eps):
                if t.step != record.index:
                    return
                params = {name: param for param, name in t.names.items()}
                t.model.eval()  # the candidate's loss without dropout, as the forward-mode product takes it
                losses = forward_response(_Bound(t.model, {names[k]: p for k, p in params.items()}),
                                          collate([candidates[x]], problem.tokenizer.pad_token_id)).losses
                t.model.train()
                grads = torch.autograd.grad(losses.sum() * eps / t.per_step, list(params.values()), allow_unused=True)
                for param, g in zip(params.values(), grads):
                    if g is not None:
                        param.grad += g

            perturbed.before_step = add_candidate
            values.append(problem.target_loss(perturbed, weighted_training(perturbed)))
        difference = (values[0] - values[1]) / 2e-5
        assert abs(difference - signal[x]) < 1e-6 * max(abs(difference), 1e-12) + 1e-12, (x, difference, signal[x])


def test_mgd_keeps_its_budget_resumes_and_is_what_rank_selects(magic_run, tmp_path, monkeypatch):
    """``rank --method mgd``: every step's selection has the budget's size; the selected.jsonl of ``--fraction``
    equal to the budget is the best step's selection; a second run reads every step back without training."""
    import pandas as pd

    from influence.scoring import mgd as mgd_module

    run, target = magic_run["run"], magic_run["target"]
    runner = CliRunner()
    args = ["rank", "--run", run, "--target", target, "--method", "mgd", "--budget", "0.3", "--steps", "3",
            "--fraction", "0.3"]
    result = runner.invoke(main, args + ["--out", str(tmp_path / "first")])
    assert result.exit_code == 0, result.output
    steps = sorted((Path(run) / "mgd").glob("*/step-*.npz"))
    assert len(steps) == 4
    selections = [np.load(path)["selected"] for path in steps]
    assert {int(s.sum()) for s in selections} == {6}  # int(0.3 x 23), as rank counts --fraction
    assert any((a != b).any() for a, b in zip(selections, selections[1:]))  # it moved
    table = pd.read_parquet(tmp_path / "first" / "iterations.parquet")
    best = int(table["holdout_loss"].idxmin())
    scores = pd.read_csv(tmp_path / "first" / "scores.csv")
    chosen = set(scores.sort_values("score", ascending=False)["id"].head(6))
    from influence.train.run import Run

    ids = np.array([e.id for e in Run(run).pool()])
    assert chosen == set(ids[selections[best]])
    assert len((tmp_path / "first" / "selected.jsonl").read_text().splitlines()) == 6
    monkeypatch.setattr(mgd_module, "LoraTrainer", None)  # any training would fail now
    result = runner.invoke(main, args + ["--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(tmp_path / "again" / "scores.csv")["score"].tolist() == scores["score"].tolist()


def test_metagrad_of_a_subset_model(engine_run, tmp_path):
    """``--subset STORE:UNIT`` replays a subset model from its design and seed (it kept no checkpoint), checks the
    replay against the losses it recorded, and differentiates through it; a recorded loss that the replay does not
    reproduce is refused."""
    from influence.core.naming import POOL
    from influence.train.metagrad import load_metagradients
    from influence.train.run import Run
    from influence.train.subset_store import SubsetStore

    shutil.copytree(engine_run["run"], tmp_path / "run", ignore=shutil.ignore_patterns("grads.zarr", "metagrad"))
    run, target = str(tmp_path / "run"), engine_run["target"]
    runner = CliRunner()
    for wrong, message in (("fit", "give STORE:UNIT"), ("nope:1", "has no store 'nope'"), ("fit:99", "is not trained")):
        result = runner.invoke(main, ["metagrad", "--run", run, "--target", target, "--subset", wrong])
        assert result.exit_code != 0 and message in result.output, result.output
    result = runner.invoke(main, ["metagrad", "--run", run, "--target", target, "--subset", "fit:3"])
    assert result.exit_code == 0 and "recorded losses" in result.output, result.output
    store = SubsetStore.open(Run(run).subsets_path, "fit")
    found = load_metagradients(Run(run), target, subset="fit:3")
    members = [e.id for e, kept in zip(Run(run).pool(), store.mask(3)) if kept]
    assert sorted(found.training_ids) == sorted(members) and np.isfinite(found.mean).all() and found.mean.any()
    assert found.meta["replay_relative_difference"] < 1e-5
    assert load_metagradients(Run(run), target) is None  # the warm-up's are another computation
    import zarr

    losses = zarr.open_array(str(Path(store.root, store.unit_path(3), POOL)), mode="r+")
    losses[0, :] = losses[0, :] * 1.01  # the recorded loss row (UNIT_OUTCOMES[0])
    result = runner.invoke(main, ["metagrad", "--run", run, "--target", target, "--subset", "fit:3", "--overwrite"])
    assert result.exit_code != 0 and "cannot be replayed here" in result.output, result.output
