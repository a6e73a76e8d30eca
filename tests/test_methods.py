"""The method contract, checked on every registered method: what it declares, what it returns on a run that has
everything, what it refuses on a run that lacks its prerequisites; and the worked example of
docs/architecture.md (adding a method) run as written."""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from influence.cli import main
from influence.config import options_of
from influence.errors import InfluenceError
from influence.scoring import base, registry
from influence.scoring.base import FAMILIES, Target, get_method
from influence.train.run import Run

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(registry())


@pytest.fixture(scope="module")
def bare_run(tiny_run, tmp_path_factory):
    """The tiny run before anything but the warm-up's checkpoints: no stores, no subset models, no dynamics."""
    folder = tmp_path_factory.mktemp("bare") / "run"
    shutil.copytree(tiny_run["run"], folder, ignore=shutil.ignore_patterns("grads.zarr", "subsets.zarr",
                                                                            "dynamics.parquet"))
    return Run(folder)


def test_the_registry_holds_every_method_once():
    assert len(METHODS) == 51 and len(set(METHODS)) == len(METHODS)
    assert {"less", "trak", "tracin", "datamodel", "memorization", "random", "semdedup", "ifd", "ekfac", "kfac", "identity",
            "ekfac_self"} <= set(METHODS)


def test_a_method_that_scores_nothing_is_refused_when_defined():
    with pytest.raises(TypeError, match="define scores"):
        class Empty(base.Method, register=False):  # noqa: F841 - defining it is the test
            name = "empty"
            family = "baseline"
            summary = meaning = "nothing"
    assert "empty" not in registry()


def _external(name: str, rater_server, reward_model: str) -> dict:
    """The models a method calls: the test's OpenAI-compatible server, the tiny reward model."""
    if name in ("alpagasus", "autods", "qurater", "bsdetector"):
        return {"rater": rater_server[0], "rater_model": "stub"}
    return {"reward_model": reward_model} if name in ("reward", "necessity") else {}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_keeps_the_contract(name, engine_run, rater_server, tiny_reward_model):
    method = get_method(name)
    # what it declares: a family, a summary and the meaning of its score, with its sign
    assert method.family in FAMILIES and method.summary and method.meaning
    assert re.search(r"higher|no information", method.meaning, re.IGNORECASE), "the meaning states the sign"
    assert dataclasses.is_dataclass(method.Options)
    # what it returns on a run that has everything it needs
    run = Run(engine_run["run"])
    target = Target(engine_run["target"]) if method.needs_target else None
    options = method.options(_external(name, rater_server, tiny_reward_model))
    method.require(run, target, options)
    scores = method.scores(run, target, options)
    pool = [e.id for e in run.pool()]
    assert scores.method == name and list(scores.ids) == pool and scores.score.shape == (len(pool),)
    finite = scores.finite if scores.finite is not None else np.isfinite(scores.score)
    assert finite.dtype == bool and finite.shape == (len(pool),) and finite.any()
    assert np.isfinite(scores.score[finite]).all() and scores.description
    if scores.per_task is not None:
        assert scores.per_task.shape == (len(pool), len(scores.task_names))
    if method.has_attribution:
        effects = method.attribution(run, Target(engine_run["target"]), options)
        assert effects.matrix.shape == (len(pool), len(effects.target_ids)) and list(effects.pool_ids) == pool
        if name != "less":  # LESS ranks by its max over subtasks, its attribution is the per-example cosine
            scale = np.nanmax(np.abs(scores.score))  # folded scores (TracIn, TRAK) differ by float32 rounding
            np.testing.assert_allclose(effects.scores().score, scores.score, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_refuses_a_missing_prerequisite_by_name(name, bare_run, tiny_run):
    method = get_method(name)
    # the identity (no curvature) needs nothing fitted; reading the pool from the store, it needs the store
    options = method.options({"pool_gradients": "store"} if name == "identity" else {})
    if method.needs_target:
        with pytest.raises(InfluenceError, match="a target: give --target"):
            method.require(bare_run, None, options)
    missing = [need for need in method.needs if not need.made_on_demand and need is not base.TARGET]
    target = Target(tiny_run["target"]) if method.needs_target else None
    if not missing:  # what it reads is made when missing
        method.require(bare_run, target, options)
        return
    with pytest.raises(InfluenceError) as refused:
        method.require(bare_run, target, options)
    message = str(refused.value)
    assert message.startswith(f"--method {name} needs ")
    assert any(word in message for word in ("influence project-grads", "influence subsets train", "influence warmup",
                                            "influence curvature", "influence metagrad", "give --rater",
                                            "give --reward-model"))


def test_an_option_a_method_does_not_take_is_refused_by_its_flag():
    with pytest.raises(InfluenceError, match=r"--seed does not apply to --method less \(its options: --dask, "):
        get_method("less").options({"seed": 3})
    with pytest.raises(InfluenceError, match="--outcome must be one of"):
        get_method("memorization").options({"outcome": "nonsense"})
    with pytest.raises(InfluenceError, match="did you mean tracin or trak"):
        get_method("trac")


def test_a_shared_option_is_defined_once():
    """Every method that takes an option name takes the same option: type, range and help (defaults may differ)."""
    seen: dict[str, tuple] = {}
    for name in METHODS:
        for option in options_of(get_method(name).Options):
            key = option.path[-1]
            kind = option.type if isinstance(option.type, type) else getattr(option.type, "name", str(option.type))
            definition = (option.flag, str(kind), option.help, option.is_list)
            assert seen.setdefault(key, definition) == definition, (name, key)


# --- the worked example of docs/architecture.md ------------------------------------------------------------------


def _example_code() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = [block for block in blocks if "class " in block and "(Method)" in block]
    assert len(example) == 1, "docs/architecture.md shows one method"
    return example[0]


def test_the_documented_example_method_plugs_in(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # the example's registration ends with the test
    module = types.ModuleType("architecture_example")  # a module of its own, as the class would have in a file
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(_example_code(), "docs/architecture.md", "exec"), module.__dict__)
    method = get_method("response_length")
    assert method.family == "baseline" and not method.needs_target
    from influence.selection.rank import rank

    table = rank(tiny_run["run"], None, method="response_length", unit="words", fraction=0.2, out=tmp_path / "long")
    pool = {e.id: e for e in Run(tiny_run["run"]).pool()}
    words = {i: sum(len(m["content"].split()) for m in e.messages if m["role"] == "assistant") for i, e in pool.items()}
    assert table["score"].tolist() == sorted(table["score"].tolist(), reverse=True)
    assert table.iloc[0]["score"] == max(words.values()) and table.set_index("id")["score"].to_dict() == words
    with pytest.raises(InfluenceError, match="--unit must be one of chars, words"):
        rank(tiny_run["run"], None, method="response_length", unit="lines", write=False)
    listed = CliRunner().invoke(main, ["methods"]).output
    assert "response_length" in listed and "longest responses" in listed


def test_methods_says_what_a_run_has_and_the_command_for_the_rest(bare_run, tiny_run):
    import json

    from click.testing import CliRunner

    from influence.cli import main

    result = CliRunner().invoke(main, ["methods", "--run", str(bare_run.path), "--target", tiny_run["target"], "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(result.output)}
    assert rows["random"]["ready"] and rows["nll"]["ready"]  # nll's forward pass is made when missing
    assert not rows["less"]["ready"] and "influence project-grads --run" in rows["less"]["missing"][0]
    assert not rows["alpagasus"]["ready"] and "give --rater" in rows["alpagasus"]["missing"][0]
    text = CliRunner().invoke(main, ["methods", "--run", str(bare_run.path)]).output
    assert "-> ready" in text and "a target: give --target" in text
