"""The counterfactual engine: subset models, memorization, influence estimates, datamodels, DsDm, TRAK,
TracIn and the LDS, each checked against an independent computation (or a planted effect)."""

import itertools
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import spearmanr

from influence.cli import main
from influence.core.naming import POOL, gradient_dataset, grads_group
from influence.core.units import UnitSettings
from influence.data.targets import load_target
from influence.data.templates import collate, encode_example
from influence.errors import InfluenceError, StoreMismatchError
from influence.evaluate.lds import column_spearman, evaluate_lds, lds
from influence.gradients.collect import project_grads
from influence.gradients.per_example import LoraGradients, token_margins
from influence.gradients.store import GradientStore
from influence.models.loading import lora_parameters
from influence.models.losses import per_example_loss
from influence.models.measure import correct_choices, encode_choices, measure, single_token_choices
from influence.scoring import attribution, registry, score
from influence.scoring.counterfactual import datamodel_fit, fit_datamodels, in_out_difference, self_difference
from influence.selection.rank import rank
from influence.train.run import Run
from influence.train.subset_store import SubsetStore
from influence.train.subsets import train_subsets

from .conftest import write_jsonl
from .test_gradients import _examples

PACKAGE = Path(__file__).resolve().parents[1]


# -- hand computations --------------------------------------------------------------------------------------
def test_in_out_differences_match_a_hand_computation():
    rng = np.random.default_rng(0)
    masks = rng.random((9, 5)) < 0.5
    masks[0], masks[1] = True, False  # every example is in and out of some unit
    pool_values, target_values = rng.random((9, 5)), rng.random((9, 3))
    effect, n_in, n_out = in_out_difference(masks, target_values, higher_is_better=True)
    mem, _, _ = self_difference(masks, pool_values, higher_is_better=True)
    loss_effect, _, _ = in_out_difference(masks, target_values, higher_is_better=False)
    for i in range(5):
        ins = [k for k in range(9) if masks[k, i]]
        outs = [k for k in range(9) if not masks[k, i]]
        assert n_in[i] == len(ins) and n_out[i] == len(outs)
        assert mem[i] == pytest.approx(np.mean([pool_values[k, i] for k in ins]) - np.mean([pool_values[k, i] for k in outs]))
        for t in range(3):
            expected = np.mean([target_values[k, t] for k in ins]) - np.mean([target_values[k, t] for k in outs])
            assert effect[i, t] == pytest.approx(expected)
            assert loss_effect[i, t] == pytest.approx(-expected)  # loss: out minus in, positive = helpful
    masks[:, 2] = True  # never left out: no estimate
    assert np.isnan(self_difference(masks, pool_values, True)[0][2])


def test_datamodel_regression_recovers_a_planted_linear_effect():
    rng = np.random.default_rng(1)
    n, k = 30, 300
    masks = np.zeros((k, n), dtype=bool)
    for row in masks:
        row[rng.choice(n, n // 2, replace=False)] = True
    planted = np.zeros((2, n))
    planted[0, [3, 7, 11]] = [-0.5, 0.4, -0.3]  # three examples move target 0's loss
    planted[1, [3, 20]] = [0.6, -0.2]
    values = 2.0 + masks @ planted.T + rng.normal(0, 0.01, (k, 2))
    for regression in ("lasso", "ridge"):
        weights, intercepts, r2 = fit_datamodels(masks, values, regression)
        assert weights.shape == (2, n)
        assert np.corrcoef(weights.ravel(), planted.ravel())[0, 1] > 0.98
        np.testing.assert_allclose(weights[planted != 0], planted[planted != 0], atol=0.05)
        assert (r2 > 0.9).all()
    lasso = fit_datamodels(masks, values, "lasso")[0]
    assert np.abs(lasso[planted == 0]).max() < 0.02  # sparse where nothing was planted


def test_lds_from_known_predictions_and_outcomes():
    rng = np.random.default_rng(2)
    masks = rng.random((40, 12)) < 0.5
    effects = rng.normal(size=(12, 4))
    truth = masks @ effects
    mean, low, high, per_target = lds(masks, effects, truth, bootstrap=200)
    assert mean == pytest.approx(1.0) and per_target == pytest.approx(np.ones(4))
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)
    assert lds(masks, effects, -truth, bootstrap=0)[0] == pytest.approx(-1.0)
    noisy = truth + rng.normal(0, 3, truth.shape)
    values = column_spearman(masks @ effects, noisy)
    expected = [spearmanr((masks @ effects)[:, t], noisy[:, t]).statistic for t in range(4)]
    np.testing.assert_allclose(values, expected)
    mean, low, high, _ = lds(masks, effects, noisy, bootstrap=300)
    assert low <= mean <= high
    constant = np.ones_like(truth)
    assert np.isnan(lds(masks, effects, constant, bootstrap=0)[0])


# -- the margin feature and the multiple-choice margin ------------------------------------------------------------
def test_margin_gradients_equal_autograd_per_example(tiny_lora):
    model, tok = tiny_lora
    encoded = [encode_example(e, tok, 128) for e in _examples(4)]
    params = lora_parameters(model)
    reference, reference_q = [], []
    for enc in encoded:
        model.zero_grad(set_to_none=True)
        batch = collate([enc], tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, :-1].float()
        labels = batch["labels"][0, 1:]
        keep = labels != -100
        gold = logits[keep].gather(1, labels[keep][:, None])[:, 0]
        others = torch.stack([torch.cat([row[:j], row[j + 1:]]).logsumexp(0) for row, j in zip(logits[keep], labels[keep])])
        (gold - others).mean().backward()
        reference.append(torch.cat([params[n].grad.reshape(-1) for n in params]))
        reference_q.append((1 - torch.softmax(logits[keep], -1).gather(1, labels[keep][:, None])).mean().detach())
    model.zero_grad(set_to_none=True)
    hooks = LoraGradients(model)
    result = hooks.compute(collate(encoded, tok.pad_token_id), objective="margin")
    hooks.remove()
    torch.testing.assert_close(result.grads, torch.stack(reference), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.out_to_loss, torch.stack(reference_q), rtol=1e-5, atol=1e-6)
    logits = torch.tensor([[2.0, 0.5, -1.0]])
    p = torch.softmax(logits, -1)[0, 0]
    assert token_margins(logits, torch.tensor([0])).item() == pytest.approx(float(torch.log(p / (1 - p))))


@pytest.mark.parametrize("options", [["yes", "no", "maybe"], ["A", "B", "C"]])  # several passes / one pass
def test_multiple_choice_margin_against_full_sequence_likelihoods(tiny_lora, tmp_path, options):
    model, tok = tiny_lora
    path = write_jsonl(tmp_path / "mc.jsonl", [
        {"prompt": f"Is {i} even?", "completion": options[i % 2], "choices": options} for i in range(3)
    ])
    examples = load_target(str(path))
    assert [e.choices for e in examples] == [options] * 3
    encoded = [encode_example(e, tok, 64) for e in examples]
    single = single_token_choices(encode_choices(examples, tok, 64)[0])
    assert (single is not None) == (options[0] == "A")
    result = measure(model, encoded, tok.pad_token_id, 2, "cpu", encode_choices(examples, tok, 64), correct_choices(examples))
    for j, example in enumerate(examples):
        log_likelihoods = []
        for choice in example.choices:
            batch = collate([encode_example(example.with_response(choice), tok, 64)], tok.pad_token_id)
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, count = per_example_loss(logits, batch["labels"])
            log_likelihoods.append(-(loss * count).item())
        right = example.choices.index(example.response)
        others = [v for c, v in enumerate(log_likelihoods) if c != right]
        assert result["margin"][j] == pytest.approx(log_likelihoods[right] - np.logaddexp.reduce(others), rel=1e-4, abs=1e-4)
        assert result["choice_correct"][j] == float(np.argmax(log_likelihoods) == right)
    assert result["probability"] == pytest.approx(np.exp(-result["loss"]))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "x", "choices": ["a", "b"]}])
    with pytest.raises(InfluenceError, match=r"bad.jsonl:1: the response 'x' is not one of"):
        load_target(str(bad))


# -- TRAK and TracIn against independent computations -------------------------------------------------------------
def _stores(run_dir, dataset):
    run = Run(run_dir)
    return [GradientStore.open(run.store_path, grads_group(16, dataset, c.name)) for c in run.checkpoints()]


def test_trak_matches_trakers_own_score_computation(engine_run):
    from trak.score_computers import BasicScoreComputer

    target_key = gradient_dataset(engine_run["target_dataset"], "margin")
    train, targets = _stores(engine_run["run"], "train.margin"), _stores(engine_run["run"], target_key)
    for lambda_reg in (None, 0.0):
        ours = attribution("trak", engine_run["run"], engine_run["target"], lambda_reg=lambda_reg)
        accumulator = torch.zeros(ours.matrix.shape)
        out_to_loss = np.zeros((train[0].n_examples, 1), dtype=np.float32)
        for store, target, lam in zip(train, targets, ours.details["lambda"]):
            computer = BasicScoreComputer(dtype=torch.float32, device="cpu", lambda_reg=lam)
            g = torch.from_numpy(store.array("grads").astype(np.float32))
            features = computer.get_x_xtx_inv(g, computer.get_xtx(g))
            computer.get_scores(features, torch.from_numpy(target.array("grads").astype(np.float32)), accumulator)
            out_to_loss += store.array("out_to_loss")[:, None]
        models = len(train)
        reference = (accumulator.numpy() / models) * (out_to_loss / models)  # traker's finalize_scores
        assert np.corrcoef(ours.matrix.ravel(), reference.ravel())[0, 1] >= 0.999
        np.testing.assert_allclose(ours.matrix, reference, rtol=2e-2, atol=1e-3 * np.abs(reference).max())


def test_trak_refuses_a_singular_kernel_without_ridge(engine_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(engine_run["run"], run_dir, ignore=shutil.ignore_patterns("subsets.zarr"))
    project_grads(run_dir, engine_run["target"], proj_dim=64, train_gradients=["margin"], chunk_size=5, progress=False)
    with pytest.raises(InfluenceError, match="singular"):
        attribution("trak", run_dir, engine_run["target"], proj_dim=64, lambda_reg=0.0)
    assert np.isfinite(attribution("trak", run_dir, engine_run["target"], proj_dim=64).matrix).all()


def test_tracin_is_the_learning_rate_weighted_dot_product(engine_run):
    run = Run(engine_run["run"])
    train, targets = _stores(engine_run["run"], "train.sgd"), _stores(engine_run["run"], engine_run["target_dataset"])
    expected = sum(c.mean_lr * s.array("grads").astype(np.float64) @ t.array("grads").astype(np.float64).T
                   for c, s, t in zip(run.checkpoints(), train, targets))
    np.testing.assert_allclose(attribution("tracin", engine_run["run"], engine_run["target"]).matrix, expected,
                               rtol=1e-4, atol=1e-9)


def test_methods_say_which_features_they_need(tiny_run):
    with pytest.raises(InfluenceError, match="sgd gradients.*--train-gradient sgd"):
        attribution("tracin", tiny_run["run"], tiny_run["target"])
    with pytest.raises(InfluenceError, match="train-gradient margin|no store at .*train.margin"):
        attribution("trak", tiny_run["run"], tiny_run["target"])
    with pytest.raises(InfluenceError, match="subset models named 'fit'.*influence subsets train"):
        rank(tiny_run["run"], tiny_run["target"], method="datamodel", out=tiny_run["folder"] / "never")


# -- the engine on the tiny model ------------------------------------------------------------------------------------------
def test_subset_store_records_masks_and_outcomes(engine_run):
    run = Run(engine_run["run"])
    store = SubsetStore.open(run.subsets_path, "fit")
    assert store.done_units() == list(range(12))
    units, masks, values = store.outcomes(POOL, "loss")
    assert masks.shape == (12, 23) and (masks.sum(axis=1) == 12).all()  # round(0.5 x 23) = 12 each
    assert np.isfinite(values).all() and (values > 0).all()
    assert len({m.tobytes() for m in masks}) == 12  # distinct subsets
    _, _, margins = store.outcomes(engine_run["target_dataset"], "margin")
    assert np.isnan(margins).all()  # the tiny target is not multiple choice


def test_memorization_through_rank_matches_the_store(engine_run):
    run = Run(engine_run["run"])
    store = SubsetStore.open(run.subsets_path, "fit")
    _, masks, accuracy = store.outcomes(POOL, "accuracy")
    expected, n_in, _ = self_difference(masks, accuracy, True)
    scores = score("memorization", engine_run["run"])
    np.testing.assert_allclose(scores.score, expected)
    table = rank(engine_run["run"], None, method="memorization", out=engine_run["folder"] / "rank-mem")
    assert {"n_in", "n_out"} <= set(table.columns)
    summary = json.loads((engine_run["folder"] / "rank-mem" / "summary.json").read_text())
    assert summary["units"] == 12 and summary["n_in"]["min"] >= 1


def test_predictability_is_the_held_out_models_mean(engine_run):
    """AFLite's predictability, against a loop over the units written here."""
    run = Run(engine_run["run"])
    store = SubsetStore.open(run.subsets_path, "fit")
    _, masks, accuracy = store.outcomes(POOL, "accuracy")
    expected = np.array([np.mean([accuracy[u, x] for u in range(len(masks)) if not masks[u, x]]) if (~masks[:, x]).any()
                         else np.nan for x in range(masks.shape[1])])
    np.testing.assert_allclose(score("predictability", engine_run["run"]).score, expected)
    _, _, loss = store.outcomes(POOL, "loss")
    by_loss = score("predictability", engine_run["run"], outcome="loss").score
    np.testing.assert_allclose(by_loss, [-np.mean(loss[~masks[:, x], x]) for x in range(masks.shape[1])])


def test_instruction_mining_is_least_squares_on_the_subsets(engine_run):
    """The linear model from the subsets' mean standardised indicators to their log mean target loss, by numpy's
    least squares, applied to each example."""
    run = Run(engine_run["run"])
    store = SubsetStore.open(run.subsets_path, "fit")
    found = score("instruction_mining", engine_run["run"], engine_run["target"], indicators=["nll", "ifd"])
    columns = []
    for name in ("nll", "ifd"):
        column = score(name, engine_run["run"]).score.astype(np.float64)
        column = np.where(np.isfinite(column), column, np.nanmean(column))
        assert column.std() > 0
        columns.append((column - column.mean()) / column.std())
    x = np.stack(columns, axis=1)
    dataset = next(iter(store.targets))
    _, masks, loss = store.outcomes(dataset, "loss")
    features = masks @ x / masks.sum(axis=1, keepdims=True)
    design = np.column_stack([np.ones(len(features)), features])
    coef = np.linalg.lstsq(design, np.log(loss.mean(axis=1)), rcond=None)[0]
    np.testing.assert_allclose(found.score, -(coef[0] + x @ coef[1:]), rtol=1e-6, atol=1e-9)
    with pytest.raises(InfluenceError, match="target-free"):
        score("instruction_mining", engine_run["run"], engine_run["target"], indicators=["less"])


def test_dsdm_selection_minimises_the_predicted_target_loss(engine_run):
    table = rank(engine_run["run"], engine_run["target"], method="dsdm", top_k=3, out=engine_run["folder"] / "rank-dsdm")
    _, _, _, _, weights, intercepts, _ = datamodel_fit(Run(engine_run["run"]), engine_run["target"])
    mean_weight = weights.mean(axis=0)  # the predicted mean target loss of S is mean(b) + sum_{x in S} mean_weight[x]
    selected = table.head(3)["pool_index"].to_numpy()
    best = min(mean_weight[list(s)].sum() for s in itertools.combinations(range(len(mean_weight)), 3))
    assert mean_weight[selected].sum() == pytest.approx(best)
    summary = json.loads((engine_run["folder"] / "rank-dsdm" / "summary.json").read_text())
    assert summary["intercept"] == pytest.approx(intercepts.mean())


def test_lds_end_to_end_with_leave_some_out(engine_run):
    ranking = engine_run["folder"] / "rank-mem" / "scores.csv"
    if not ranking.exists():
        rank(engine_run["run"], None, method="memorization", out=ranking.parent)
    methods = ["less", "trak", "tracin", "datamodel", "fz_influence", "grand", "random", str(ranking)]
    report = evaluate_lds(engine_run["run"], engine_run["target"], methods, k=5, leave_out=0.2, bootstrap=50,
                          progress=False)
    table = report.table
    assert list(table["method"]) == methods[:-1] + ["rank-mem/scores.csv"]
    assert (table["n_subsets"] == 5).all() and table["lds"].between(-1, 1).all()
    assert (table["ci_low"] <= table["ci_high"]).all() and table["leave_out_delta"].notna().all()
    assert (report.folder / "lds.csv").is_file() and (report.folder / "lds_per_target.csv").is_file()
    held = SubsetStore.open(Run(engine_run["run"]).subsets_path, "heldout")
    assert held.design["seed"] != SubsetStore.open(Run(engine_run["run"]).subsets_path, "fit").design["seed"]
    again = evaluate_lds(engine_run["run"], engine_run["target"], ["less"], k=5, bootstrap=0, progress=False)
    assert again.table["lds"][0] == pytest.approx(table["lds"][0])  # nothing retrained, same models


# -- units: resume, never twice, several workers, crashes --------------------------------------------------------------------------
def test_units_resume_and_grow(engine_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(engine_run["run"], run_dir, ignore=shutil.ignore_patterns("subsets.zarr", "grads.zarr", "lds"))
    first = train_subsets(run_dir, k=3, alpha=0.5, name="grow", progress=False)
    assert first.run.done_now == 3
    store = SubsetStore.open(Run(run_dir).subsets_path, "grow")
    finished = {u: store.unit_attrs(u)["finished"] for u in store.done_units()}
    again = train_subsets(run_dir, k=5, alpha=0.5, name="grow", progress=False)
    assert (again.run.done_before, again.run.done_now) == (3, 2)
    assert {u: store.unit_attrs(u)["finished"] for u in range(3)} == finished  # never redone


def test_a_crashed_unit_loses_only_itself(engine_run, tmp_path, monkeypatch):
    import influence.train.subsets as subsets

    run_dir = tmp_path / "run"
    shutil.copytree(engine_run["run"], run_dir, ignore=shutil.ignore_patterns("subsets.zarr", "grads.zarr", "lds"))
    original, calls = subsets.measure, {"n": 0}

    def crash_on_third_unit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third unit's pool evaluation
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(subsets, "measure", crash_on_third_unit)
    with pytest.raises(KeyboardInterrupt):
        train_subsets(run_dir, k=4, alpha=0.5, name="crash", progress=False)
    store = SubsetStore.open(Run(run_dir).subsets_path, "crash")
    assert store.done_units() == [0, 1]
    monkeypatch.setattr(subsets, "measure", original)
    report = train_subsets(run_dir, k=4, alpha=0.5, name="crash", progress=False)
    assert (report.run.done_before, report.run.done_now) == (2, 2)
    reference = train_subsets(run_dir, k=4, alpha=0.5, name="reference", progress=False)
    assert reference.run.done_now == 4
    other = SubsetStore.open(Run(run_dir).subsets_path, "reference")
    for unit in range(4):  # a unit's result does not depend on which process or attempt trained it
        np.testing.assert_array_equal(store.outcomes(POOL, "loss", [unit])[2], other.outcomes(POOL, "loss", [unit])[2])


WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from influence.train.subsets import train_subsets
    ready = Path(sys.argv[2])
    (ready / sys.argv[3]).touch()
    while len(list(ready.iterdir())) < 2:  # start together
        time.sleep(0.01)
    report = train_subsets(sys.argv[1], k=8, alpha=0.5, name="shared", training={"epochs": 25}, progress=False)
    print(json.dumps({"done_now": report.run.done_now, "done_before": report.run.done_before, "busy": report.run.busy}))
""")


def test_two_workers_on_one_store_never_train_a_unit_twice(engine_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(engine_run["run"], run_dir, ignore=shutil.ignore_patterns("subsets.zarr", "grads.zarr", "lds"))
    script, ready = tmp_path / "worker.py", tmp_path / "ready"
    script.write_text(WORKER)
    ready.mkdir()
    workers = [subprocess.Popen([sys.executable, str(script), str(run_dir), str(ready), name], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=PACKAGE) for name in "ab"]
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    store = SubsetStore.open(Run(run_dir).subsets_path, "shared")
    assert store.done_units() == list(range(8))
    assert sum(r["done_now"] for r in results) == 8  # every unit trained exactly once between the two
    assert all(r["done_now"] >= 1 for r in results), results  # and both worked
    assert len({store.unit_attrs(u)["worker"] for u in range(8)}) == 2


def test_static_worker_split(engine_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(engine_run["run"], run_dir, ignore=shutil.ignore_patterns("subsets.zarr", "grads.zarr", "lds"))
    a = train_subsets(run_dir, k=5, alpha=0.5, name="split", units=UnitSettings(worker=(0, 2)), progress=False)
    store = SubsetStore.open(Run(run_dir).subsets_path, "split")
    assert a.run.done_now == 3 and store.done_units() == [0, 2, 4]
    b = train_subsets(run_dir, k=5, alpha=0.5, name="split", units=UnitSettings(worker=(1, 2)), progress=False)
    assert b.run.done_now == 2 and store.done_units() == list(range(5))


# -- bad input -----------------------------------------------------------------------------------------------------------------------
def test_bad_subset_settings_are_refused_before_any_work(engine_run, tmp_path):
    run_dir = engine_run["run"]
    with pytest.raises(InfluenceError, match="--k must be at least 2"):
        train_subsets(run_dir, k=1, alpha=0.5)
    for alpha in (0.0, 1.0, 1.5):
        with pytest.raises(InfluenceError, match=r"--alpha must be in \(0, 1\)"):
            train_subsets(run_dir, k=4, alpha=alpha)
    with pytest.raises(InfluenceError, match="each subset must hold at least one example"):
        train_subsets(run_dir, k=4, alpha=0.01)
    with pytest.raises(StoreMismatchError, match="'settings'"):  # the fit store was trained with the warm-up's lr
        train_subsets(run_dir, k=12, alpha=0.5, targets=[engine_run["target"]], training={"learning_rate": 0.1},
                      progress=False)
    with pytest.raises(StoreMismatchError, match="'design'"):
        train_subsets(run_dir, k=12, alpha=0.3, targets=[engine_run["target"]], progress=False)
    with pytest.raises(StoreMismatchError, match="targets"):
        train_subsets(run_dir, k=12, alpha=0.5, targets=[], progress=False)
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(InfluenceError, match="did not evaluate this target"):
        rank(run_dir, str(other), method="fz_influence", out=tmp_path / "never")
    with pytest.raises(InfluenceError, match="neither a method"):
        evaluate_lds(run_dir, engine_run["target"], ["less", "nosuch"])
    assert not (tmp_path / "never").exists()


def test_cli_lists_the_engine(engine_run):
    runner = CliRunner()
    help_text = runner.invoke(main, ["rank", "--help"]).output
    for method in ("memorization", "datamodel", "dsdm", "trak", "tracin"):
        assert method in help_text and method in registry()
    assert runner.invoke(main, ["subsets", "--help"]).exit_code == 0
    assert runner.invoke(main, ["evaluate", "lds", "--help"]).exit_code == 0
    result = runner.invoke(main, ["subsets", "train", "--run", engine_run["run"], "--k", "1"])
    assert result.exit_code == 2 and "1 is not in the range x>=2" in result.output
    result = runner.invoke(main, ["subsets", "status", "--run", engine_run["run"]])
    assert result.exit_code == 0 and "fit: 12 finished" in result.output
    listed = json.loads(runner.invoke(main, ["subsets", "status", "--run", engine_run["run"], "--json"]).stdout)
    assert listed[0]["name"] == "fit" and listed[0]["finished"] == 12
    result = runner.invoke(main, ["subsets", "train", "--run", engine_run["run"], "--k", "13", "--dry-run"])
    assert result.exit_code == 0 and "1 to train here" in result.output  # the set's own targets, alpha, settings
    result = runner.invoke(main, ["subsets", "train", "--run", engine_run["run"], "--k", "14", "--dry-run",
                                  "--target", engine_run["target"]])
    assert result.exit_code == 0 and "2 to train here" in result.output
    for method in ("trak", "tracin", "datamodel", "dsdm", "fz_influence"):
        dim = ["--proj-dim", "16"] if method in ("trak", "tracin") else []
        result = runner.invoke(main, ["rank", "--run", engine_run["run"], "--target", engine_run["target"], "--method", method,
                                      *dim, "--out", str(engine_run["folder"] / f"cli-{method}")])
        assert result.exit_code in (0, 3), result.output  # 3: a degenerate ranking is written and flagged
    result = runner.invoke(main, ["evaluate", "lds", "--run", engine_run["run"], "--target", engine_run["target"],
                                  "--methods", "tracin,random", "--k", "5", "--bootstrap", "20", "--proj-dim", "16"])
    assert result.exit_code == 0, result.output
    assert "tracin" in result.output and "lds" in result.output
