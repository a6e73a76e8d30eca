"""Scores from the counterfactual engine: models trained on random subsets of the pool
(``influence subsets train``), compared with and without each example.

Notation: units ``k = 1..K`` trained on subsets ``S_k`` (fraction ``alpha`` of the pool); ``y_k(z)``
unit ``k``'s outcome on example ``z`` (see :mod:`influence.models.measure`): ``loss`` (lower is better),
``accuracy``, ``probability``, ``margin`` (higher is better). "in" averages over the units whose
subset holds ``x``, "out" over the others; ``n_in`` and ``n_out`` count them and are reported with
every estimate (columns ``n_in`` / ``n_out``): with few models an estimate is mostly noise.

* ``memorization`` (Feldman & Zhang, 2020), per pool example ``x``, on itself:
  ``mem(x) = mean_in y(x) - mean_out y(x)`` with ``y`` the response-token accuracy (their
  definition; ``--outcome probability`` for the smooth variant, ``loss`` is signed so that higher is
  still more memorised). Higher = the model gets ``x`` right mostly when it trained on it (atypical
  or mislabelled examples); around 0 = learnt from the rest of the pool anyway. In [-1, 1] for
  accuracy and probability.
* ``fz_influence`` (Feldman & Zhang's influence estimate), per pool example ``x`` and target example
  ``t``: ``infl(x, t) = mean_in y(t) - mean_out y(t)`` (for ``loss``: out minus in), so positive =
  including ``x`` helps ``t``. Default outcome ``loss``: a small model's target accuracy is often at
  chance, its loss still moves.
* ``datamodel`` (Ilyas et al., 2022): per target example ``t``, a sparse linear model
  ``y(t) ~ b_t + sum_x w_{t,x} 1[x in S]`` fit on the K units (scikit-learn's ``LassoCV``, or
  ``RidgeCV``; regularisation chosen by cross-validation). Effect of ``x`` on ``t``: ``-w_{t,x}`` for
  the loss (the predicted loss decrease from including ``x``), ``+w_{t,x}`` for the others.
* ``dsdm`` (Engstrom et al., 2024): selection that minimises the datamodel-predicted mean target loss
  ``L(S) = mean_t (b_t + sum_{x in S} w_{t,x})`` over subsets of the selection's size, i.e. the
  examples with the largest ``-mean_t w_{t,x}``. ``--estimator trak`` uses TRAK as the datamodel (the
  paper's choice at scale; no subset models needed). The predicted loss of any selection is
  ``intercept + sum of -score`` over it (``intercept`` in ``summary.json``); datamodels are fit at
  subset fraction ``alpha``, so predictions are most reliable for selections of about that size.

``rank`` averages pairwise effects over the target's examples (``task:`` columns per subtask):
higher = more helpful.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from ..config import setting
from ..core.naming import POOL, target_dataset
from ..data.formats import examples_sha256
from ..data.targets import load_target, target_name
from ..errors import InfluenceError, StoreMismatchError
from ..models.measure import HIGHER_IS_BETTER, Outcome
from ..train.run import Run
from ..train.subset_store import SubsetStore
from . import options as shared
from .base import MARGIN_GRADIENTS, SUBSETS, TARGET, Attribution, Method, Need, Scores, Target, get_method

Regression = Literal["lasso", "ridge"]
REGRESSIONS = get_args(Regression)


def open_subsets(run: Run, name: str = "fit") -> SubsetStore:
    """A run's subset-model store, checked against the run's model and current pool."""
    store = SubsetStore.open(run.subsets_path, name)
    if store.metadata.get("model") != run.manifest.get("model_fingerprint"):
        raise StoreMismatchError("model", run.manifest.get("model_fingerprint"), store.metadata.get("model"),
                                 f"{store.path} (trained from another base model than the run's)")
    expected = run.pool_sha256
    if store.metadata.get("pool_sha256") != expected:
        raise StoreMismatchError("pool_sha256", expected, store.metadata.get("pool_sha256"),
                                 f"{store.path} (the pool changed since these models were trained)")
    return store


def require_units(store: SubsetStore, units: list[int], at_least: int = 2) -> None:
    if len(units) < at_least:
        raise InfluenceError(f"{store.path}: {len(units)} finished subset model(s); at least {at_least} are needed "
                             "(run `influence subsets train` with a larger --k)")


def trained_outcomes(store: SubsetStore, dataset: str, outcome: str, at_least: int = 2
                     ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(finished units, their training masks, their ``outcome`` on ``dataset``), refused when fewer than ``at_least``
    are finished."""
    units, masks, values = store.outcomes(dataset, outcome)
    require_units(store, units, at_least)
    return units, masks, values


def target_columns(store: SubsetStore, target: str, target_tasks: list[str] | None) -> tuple[str, np.ndarray]:
    """The store's dataset for ``target`` and which of its columns belong to ``target_tasks``."""
    name = target_name(target)
    full = load_target(target)
    dataset = target_dataset(name, examples_sha256(full))
    if dataset not in store.targets and target_tasks:
        dataset = target_dataset(name, examples_sha256(load_target(target, target_tasks)))
    store.require_target(dataset)
    _, tasks = store.target_labels(dataset)
    keep = np.ones(len(tasks), dtype=bool) if not target_tasks else np.isin(tasks, target_tasks)
    if not keep.any():
        raise InfluenceError(f"target '{target}' has no subtask {', '.join(target_tasks)} among those the subset models "
                             "evaluated")
    return dataset, keep


def in_out_difference(masks: np.ndarray, values: np.ndarray, higher_is_better: bool) -> tuple[np.ndarray, ...]:
    """For every pool example x and evaluated example z: mean of ``values[:, z]`` over the units whose
    subset holds x minus over the others (signed so that positive = better with x), and n_in, n_out."""
    inside = masks.astype(np.float64)
    n_in = inside.sum(axis=0)
    n_out = len(masks) - n_in
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_in = inside.T @ values / n_in[:, None]
        mean_out = (1 - inside).T @ values / n_out[:, None]
    effect = mean_in - mean_out if higher_is_better else mean_out - mean_in
    effect[(n_in == 0) | (n_out == 0)] = np.nan
    return effect, n_in, n_out


def self_difference(masks: np.ndarray, values: np.ndarray, higher_is_better: bool) -> tuple[np.ndarray, ...]:
    """:func:`in_out_difference` of every pool example on itself (the diagonal, without forming the
    n x n matrix): ``values`` are the units' outcomes on the pool (units x n_pool)."""
    mean_in, mean_out, n_in, n_out = in_and_out_means(masks, values)
    difference = mean_in - mean_out
    score = difference if higher_is_better else -difference
    score[(n_in == 0) | (n_out == 0)] = np.nan
    return score, n_in, n_out


def in_and_out_means(masks: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each pool example's mean outcome over the units that trained on it and over those that did not (NaN where there
    is none), and how many units each is."""
    inside = masks.astype(np.float64)
    n_in = inside.sum(axis=0)
    n_out = len(masks) - n_in
    with np.errstate(invalid="ignore", divide="ignore"):
        return (inside * values).sum(axis=0) / n_in, ((1 - inside) * values).sum(axis=0) / n_out, n_in, n_out


def _counts(store: SubsetStore, units: list[int], n_in: np.ndarray, n_out: np.ndarray) -> dict:
    return {"subsets": store.name, "units": len(units), "design": store.design,
            "n_in": {"min": int(n_in.min()), "median": float(np.median(n_in))},
            "n_out": {"min": int(n_out.min()), "median": float(np.median(n_out))}}


_FITS: dict = {}  # in-process cache of datamodel fits: (store, dataset, units, outcome, regression) -> fit


def fit_datamodels(masks: np.ndarray, values: np.ndarray, regression: str = "lasso",
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column ``t`` of ``values`` (units x targets), a linear model of ``values[:, t]`` on the
    masks with regularisation chosen by cross-validation. Returns (weights (targets x pool),
    intercepts (targets,), cross-validated R^2 (targets,))."""
    from sklearn.linear_model import LassoCV, RidgeCV

    if regression not in REGRESSIONS:
        raise InfluenceError(f"unknown --regression '{regression}'; choose from {', '.join(REGRESSIONS)}")
    x = masks.astype(np.float64)
    k, n_targets = values.shape
    weights = np.zeros((n_targets, x.shape[1]))
    intercepts = np.zeros(n_targets)
    r2 = np.full(n_targets, np.nan)
    if regression == "ridge":
        model = RidgeCV(alphas=np.logspace(-3, 4, 15), alpha_per_target=True).fit(x, values)
        weights, intercepts = np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_)
        loo_mse = -np.atleast_1d(model.best_score_)  # efficient leave-one-out, negative MSE
        with np.errstate(invalid="ignore", divide="ignore"):
            r2 = 1 - loo_mse / values.var(axis=0)
        return weights, intercepts, r2
    folds = min(5, k)
    for t in range(n_targets):
        y = values[:, t]
        if np.ptp(y) == 0:
            intercepts[t] = y[0]
            continue
        model = LassoCV(alphas=30, cv=folds, max_iter=20000, random_state=seed).fit(x, y)
        weights[t], intercepts[t] = model.coef_, model.intercept_
        r2[t] = 1 - model.mse_path_.mean(axis=1).min() / y.var()
    return weights, intercepts, r2


def datamodel_fit(run: Run, target: str, subsets: str = "fit", outcome: str = "loss",
                  regression: str = "lasso", target_tasks: list[str] | None = None):
    """(store, units, target ids, target tasks, weights, intercepts, cv R^2) for the target's examples."""
    store = open_subsets(run, subsets)
    dataset, keep = target_columns(store, target, target_tasks)
    units = store.done_units()
    require_units(store, units, at_least=4)
    key = (str(store.path), dataset, tuple(units), outcome, regression)
    if key not in _FITS:
        _, masks, values = store.outcomes(dataset, outcome, units)
        _FITS[key] = fit_datamodels(masks, values, regression)
    weights, intercepts, r2 = _FITS[key]
    ids, tasks = store.target_labels(dataset)
    return store, units, ids[keep], tasks[keep], weights[keep], intercepts[keep], r2[keep]


def _nanmean(values: np.ndarray) -> float | None:
    return float(np.nanmean(values)) if np.isfinite(values).any() else None



@dataclass(kw_only=True)
class MemorizationOptions:
    subsets: str = shared.subsets()
    outcome: Outcome = shared.outcome("accuracy")


class Memorization(Method):
    name = "memorization"
    family = "counterfactual"
    summary = "Feldman & Zhang memorization: outcome on the example with it in training minus without it"
    meaning = ("Feldman & Zhang memorization: mean over models trained with the example minus without it (signed so "
               "that higher = more memorised); in [-1, 1] for accuracy/probability")
    needs = (SUBSETS,)
    Options = MemorizationOptions

    def scores(self, run: Run, target: Target | None, options: MemorizationOptions) -> Scores:
        store = open_subsets(run, options.subsets)
        units, masks, values = trained_outcomes(store, POOL, options.outcome)
        score, n_in, n_out = self_difference(masks, values, HIGHER_IS_BETTER[options.outcome])
        return Scores("memorization", store.pool_ids.tolist(), score,
                      f"Feldman & Zhang memorization on {options.outcome}: mean over models trained with the example "
                      "minus without it (signed so that higher = more memorised); in [-1, 1] for accuracy/probability",
                      finite=np.isfinite(score),
                      details={**_counts(store, units, n_in, n_out), "outcome": options.outcome},
                      columns={"n_in": n_in, "n_out": n_out})


def held_out_mean(masks: np.ndarray, values: np.ndarray, higher_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each pool example's mean outcome over the units that did not train on it (signed so that higher = better
    predicted; NaN where every unit trained on it), and how many units that is."""
    _, mean, _, n_out = in_and_out_means(masks, values)
    mean = mean if higher_is_better else -mean
    mean[n_out == 0] = np.nan
    return mean, n_out


class Predictability(Method):
    name = "predictability"
    family = "counterfactual"
    summary = ("AFLite's predictability (Le Bras et al. 2020): how well the subset models that never saw the example "
               "do on it")
    meaning = ("AFLite's predictability: the mean outcome on the example of the subset models that did not train on it "
               "(signed so that higher = better predicted without it: an easy or artefact-laden example, which AFLite "
               "removes); in [0, 1] for accuracy/probability")
    needs = (SUBSETS,)
    Options = MemorizationOptions

    def scores(self, run: Run, target: Target | None, options: MemorizationOptions) -> Scores:
        store = open_subsets(run, options.subsets)
        units, masks, values = trained_outcomes(store, POOL, options.outcome)
        score, n_out = held_out_mean(masks, values, HIGHER_IS_BETTER[options.outcome])
        return Scores(self.name, store.pool_ids.tolist(), score,
                      f"AFLite predictability on {options.outcome}: mean over the subset models that did not train on "
                      "the example (higher = better predicted without it)", finite=np.isfinite(score),
                      details={"subsets": store.name, "units": len(units), "outcome": options.outcome,
                               "n_out": {"min": int(n_out.min()), "median": float(np.median(n_out))}},
                      columns={"n_out": n_out})


@dataclass(kw_only=True)
class InfluenceOptions:
    subsets: str = shared.subsets()
    outcome: Outcome = shared.outcome("loss")


class FzInfluence(Method):
    name = "fz_influence"
    family = "counterfactual"
    summary = "Feldman & Zhang influence estimate: the target's outcome with the example in training minus without"
    meaning = ("Feldman & Zhang influence estimate on the target's outcome: mean over models trained with the example "
               "minus without it, signed so that positive = helpful; higher = more helpful")
    needs = (TARGET, SUBSETS)
    Options = InfluenceOptions

    def attribution(self, run: Run, target: Target, options: InfluenceOptions) -> Attribution:
        """Feldman & Zhang influence estimates of every pool example on every target example."""
        store = open_subsets(run, options.subsets)
        dataset, keep = target_columns(store, target.name, target.task_list)
        units, masks, values = trained_outcomes(store, dataset, options.outcome)
        effect, n_in, n_out = in_out_difference(masks, values[:, keep], HIGHER_IS_BETTER[options.outcome])
        ids, tasks = store.target_labels(dataset)
        return Attribution("fz_influence", store.pool_ids.tolist(), ids[keep].tolist(), tasks[keep].tolist(), effect,
                           f"Feldman & Zhang influence estimate on the target's {options.outcome}: mean over models "
                           "trained with the example minus without it, signed so that positive = helpful",
                           {**_counts(store, units, n_in, n_out), "outcome": options.outcome},
                           {"n_in": n_in, "n_out": n_out})


@dataclass(kw_only=True)
class DatamodelOptions(InfluenceOptions):
    regression: Regression = shared.regression()


def datamodel_attribution(run: Run, target: Target, subsets: str = "fit", outcome: str = "loss",
                          regression: str = "lasso") -> Attribution:
    """Datamodel weights as effects: positive = including the pool example helps the target example."""
    store, units, ids, tasks, weights, intercepts, r2 = datamodel_fit(run, target.name, subsets, outcome, regression,
                                                                     target.task_list)
    sign = 1.0 if HIGHER_IS_BETTER[outcome] else -1.0
    return Attribution("datamodel", store.pool_ids.tolist(), ids.tolist(), tasks.tolist(), sign * weights.T,
                       f"datamodel ({regression}) weight on the target's {outcome}, signed so that positive = "
                       "including the example helps; in outcome units",
                       {"subsets": store.name, "units": len(units), "design": store.design, "outcome": outcome,
                        "regression": regression, "cv_r2_mean": _nanmean(r2),
                        "nonzero_weights_mean": float((weights != 0).sum(axis=1).mean()),
                        "intercept_mean": float(intercepts.mean())})


class Datamodel(Method):
    name = "datamodel"
    family = "counterfactual"
    summary = "datamodels (Ilyas et al. 2022): a sparse linear model of each target outcome on the subsets"
    meaning = ("datamodel weight on the target's outcome, signed so that positive = including the example helps; "
               "in outcome units; higher = more helpful")
    needs = (TARGET, SUBSETS)
    Options = DatamodelOptions

    def attribution(self, run: Run, target: Target, options: DatamodelOptions) -> Attribution:
        return datamodel_attribution(run, target, options.subsets, options.outcome, options.regression)


@dataclass(kw_only=True)
class DsdmOptions(shared.Projected):
    estimator: Literal["datamodel", "trak"] = setting(
        "datamodel", "The datamodel estimate: regression on the subset models, or TRAK (no subset models needed).")
    subsets: str = shared.subsets()
    regression: Regression = shared.regression()
    lambda_reg: float | None = shared.lambda_reg()


@dataclass(frozen=True)
class NeedsEstimate(Need):
    """What DsDm's datamodel estimate reads: the subset models (``--estimator datamodel``) or TRAK's margin
    gradients (``--estimator trak``)."""

    def missing(self, run: Run, target: Target | None, options: DsdmOptions) -> str | None:
        need = MARGIN_GRADIENTS if options.estimator == "trak" else SUBSETS
        return need.missing(run, target, options)


class Dsdm(Method):
    name = "dsdm"
    family = "counterfactual"
    summary = "DsDm (Engstrom et al. 2024): the selection with the lowest datamodel-predicted target loss"
    meaning = ("DsDm: predicted decrease of the mean target loss when the example is included; the top k minimise the "
               "predicted mean target loss over selections of k; higher = more helpful")
    needs = (TARGET, NeedsEstimate("the subset models, or TRAK's gradients with --estimator trak",
                                   "influence subsets train, or project-grads --train-gradient margin"))
    Options = DsdmOptions

    def scores(self, run: Run, target: Target, options: DsdmOptions) -> Scores:
        """Each example's predicted decrease of the mean target loss; the top ``k`` of this score is the size-``k``
        selection with the lowest predicted mean target loss (see the module docstring)."""
        if options.estimator == "trak":
            trak = get_method("trak")
            scores = trak.scores(run, target, trak.options({"proj_dim": options.proj_dim,
                                                             "lambda_reg": options.lambda_reg}))
            intercept = None
        else:
            attribution = datamodel_attribution(run, target, options.subsets, "loss", options.regression)
            scores, intercept = attribution.scores(), attribution.details["intercept_mean"]
        scores.method = "dsdm"
        scores.description = (f"DsDm with {options.estimator} datamodels: predicted decrease of the mean target loss "
                              "when the example is included; the top k minimise the predicted mean target loss over "
                              "selections of k (predicted loss = intercept - sum of the selection's scores)")
        scores.details = {**scores.details, "estimator": options.estimator, "intercept": intercept}
        return scores


INDICATORS = ["nll", "ifd", "mtld", "ttr"]


@dataclass(kw_only=True)
class MiningOptions:
    subsets: str = shared.subsets()
    indicators: list[str] = setting(default_factory=lambda: list(INDICATORS), list=True,
                                    help="Comma-separated target-free methods whose scores are the linear model's "
                                         "inputs.")


class InstructionMining(Method):
    name = "instruction_mining"
    family = "quality"
    summary = ("InstructionMining (Cao et al. 2023): a linear model from indicators to the target loss the subset "
               "models measured, applied to each example")
    meaning = ("InstructionMining: minus the log target loss a linear model of the example's indicators predicts "
               "(fitted on the subset models: log of their mean target loss against the mean standardised indicators "
               "of their training subsets, by least squares); higher = predicted to lower the target loss more")
    needs = (TARGET, SUBSETS)
    Options = MiningOptions

    def scores(self, run: Run, target: Target, options: MiningOptions) -> Scores:
        """Cao et al. fit ``log L_eval = b0 + sum_j b_j I_j`` over datasets, ``I_j`` an indicator's mean over a dataset;
        here the datasets are the subset models' training subsets and ``L_eval`` their mean loss on the target's
        examples. Indicators are standardised over the pool (a missing value: the pool's mean)."""
        from sklearn.linear_model import LinearRegression

        bad = [m for m in options.indicators if m == self.name or get_method(m).needs_target]
        if bad:
            raise InfluenceError(f"--indicators {', '.join(bad)}: indicators must be target-free methods other than "
                                 "instruction_mining")
        store = open_subsets(run, options.subsets)
        dataset, keep = target_columns(store, target.name, target.task_list)
        units, masks, values = trained_outcomes(store, dataset, "loss", at_least=len(options.indicators) + 2)
        columns = []
        for name in options.indicators:
            method = get_method(name)
            settings = method.options()
            method.require(run, None, settings)
            column = np.asarray(method.scores(run, None, settings).score, dtype=np.float64)
            finite = np.isfinite(column)
            column = np.where(finite, column, column[finite].mean() if finite.any() else 0.0)
            columns.append((column - column.mean()) / (column.std() or 1.0))
        indicators = np.stack(columns, axis=1)  # pool x indicators
        inside = masks.astype(np.float64)
        features = inside @ indicators / inside.sum(axis=1, keepdims=True)  # each subset's mean indicators
        log_loss = np.log(values[:, keep].mean(axis=1))
        model = LinearRegression().fit(features, log_loss)
        predicted = model.predict(indicators)
        return Scores(self.name, store.pool_ids.tolist(), -predicted, self.meaning,
                      details={"subsets": store.name, "units": len(units), "indicators": options.indicators,
                               "coefficients": dict(zip(options.indicators, model.coef_.round(6).tolist())),
                               "intercept": float(model.intercept_),
                               "r2_on_subsets": float(model.score(features, log_loss))},
                      columns={"predicted_log_loss": predicted})
