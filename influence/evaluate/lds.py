"""The linear datamodeling score (LDS; Park et al., 2023): does a method predict what retraining does?

On ``M`` held-out subsets ``S_m`` of the pool (models trained by the counterfactual engine with seeds
disjoint from those the datamodels were fit on), for every target example ``t``:

    predicted(m, t) = sum_{x in S_m} effect(x, t)
    LDS(t)          = Spearman over m of (predicted(m, t), measured(m, t))

where ``effect`` is the method's effect of ``x`` on ``t`` (its :class:`~influence.scoring.Attribution`;
for a method with one score per example, that score for every ``t``; for a ranking file, its
``score`` column; for a selection file such as a ``selected.jsonl``, diversified or not, 1 for its
members and 0 for the others) and ``measured`` is the held-out model's outcome on ``t``, signed so that higher is
better (minus the loss by default). The LDS is the mean over the target's examples (those whose
outcome and prediction vary over the subsets), with a bootstrap interval over the held-out subsets
and the number of subsets used. 1 = the method orders subsets exactly as retraining does; 0 = no better
than chance; negative = backwards (for a target-free score, e.g. ``nll``, the low end may be the
helpful one).

Leave-some-out (``leave_out = f``): one model on the whole pool and, for every method, one on the pool
minus the method's top ``f`` for the target; the change of the mean target outcome against the
whole-pool model (positive = removing the method's most helpful examples hurt, as it should).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from ..data.formats import Example, load_examples
from ..data.targets import target_name
from ..errors import InfluenceError
from ..scoring import ATTRIBUTIONS, METHODS, TARGET_METHODS
from ..scoring.counterfactual import HIGHER_IS_BETTER, open_subsets, target_columns
from ..train.run import Run
from ..train.subset_store import SubsetStore
from ..train.subsets import train_masks, train_subsets

OPTION_NAMES = ("proj_dim", "subsets", "regression", "lambda_reg", "learned_threshold", "seed")


@dataclass
class LdsReport:
    table: pd.DataFrame  # one row per method
    per_target: pd.DataFrame  # LDS of every method on every target example
    settings: dict
    folder: Path
    notes: list[str] = field(default_factory=list)


def column_spearman(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``predicted`` with the same column of ``measured``
    (subsets x targets); NaN where either column is constant."""
    a = rankdata(predicted, axis=0) - (len(predicted) + 1) / 2
    b = rankdata(measured, axis=0) - (len(measured) + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))


def lds(masks: np.ndarray, effects: np.ndarray, measured: np.ndarray, bootstrap: int = 1000,
        seed: int = 0) -> tuple[float, float, float, np.ndarray]:
    """(mean LDS, bootstrap 2.5% and 97.5% quantiles over subsets, LDS per target) for subsets
    ``masks`` (M x n_pool), effects (n_pool x targets) and measured outcomes (M x targets, higher =
    better). Unscorable effects (NaN) count as 0."""
    predicted = masks.astype(np.float64) @ np.nan_to_num(effects, nan=0.0)
    per_target = column_spearman(predicted, measured)
    mean = float(np.nanmean(per_target)) if np.isfinite(per_target).any() else float("nan")
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        rows = rng.integers(0, len(masks), len(masks))
        values = column_spearman(predicted[rows], measured[rows])
        if np.isfinite(values).any():
            draws.append(np.nanmean(values))
    low, high = (np.quantile(draws, [0.025, 0.975]) if draws else (np.nan, np.nan))
    return mean, float(low), float(high), per_target


def read_selection(path: Path, pool: list[Example]) -> np.ndarray:
    """A selection (a data file such as ``selected.jsonl``, diversified or not) as a score: 1 for the
    pool's examples it holds (matched by content), 0 for the others."""
    chosen = {json.dumps(e.messages, sort_keys=True) for e in load_examples(path)}
    score = np.array([float(json.dumps(e.messages, sort_keys=True) in chosen) for e in pool])
    if not score.any():
        raise InfluenceError(f"{path}: none of its examples is in this run's pool")
    return score


def read_ranking(path: str | Path, pool: list[Example]) -> np.ndarray:
    """The ``score`` column of a ranking file (``scores.csv`` / ``scores.parquet`` from ``rank``, or any
    CSV/Parquet with ``id`` and ``score``) in pool order, or a selection's membership (a data file)."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json", ".tsv"):
        return read_selection(path, pool)
    pool_ids = [e.id for e in pool]
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as err:  # pandas raises many kinds for an unreadable file
        raise InfluenceError(f"{path}: not a readable CSV or Parquet ranking ({err})") from None
    missing = [c for c in ("id", "score") if c not in table]
    if missing:
        raise InfluenceError(f"{path}: a ranking needs the columns id and score; it lacks {', '.join(missing)}")
    scores = table.set_index(table["id"].astype(str))["score"]
    absent = [i for i in pool_ids if i not in scores.index]
    if absent:
        raise InfluenceError(f"{path}: {len(absent)} of the pool's examples have no score (e.g. {absent[0]}); is it a "
                             "ranking of this run's pool?")
    return scores.reindex(pool_ids).to_numpy(dtype=np.float64)


def _effects(run_dir, method: str, target: str, options: dict, target_tasks, pool_ids: list[str],
             n_targets: int) -> tuple[np.ndarray, str, list[str] | None]:
    """(n_pool x n_targets effects, kind, the target ids the effects are for when per target example)
    of a method name or a ranking file."""
    if method in ATTRIBUTIONS:
        function, kind = ATTRIBUTIONS[method], "per target example"
    elif method in METHODS:
        function, kind = METHODS[method], "one score per example"
    else:
        return np.repeat(read_ranking(method, Run(run_dir).pool())[:, None], n_targets, axis=1), \
            "ranking or selection file", None
    accepted = set(inspect.signature(function).parameters)
    given = {k: v for k, v in options.items() if k in accepted and v is not None}
    if "target_tasks" in accepted:
        given["target_tasks"] = target_tasks
    if method in ATTRIBUTIONS:
        attribution = function(run_dir, target, **given)
        if list(attribution.pool_ids) != list(pool_ids):
            raise InfluenceError(f"{method}: its scores cover other pool examples than the held-out models")
        return attribution.matrix, kind, list(attribution.target_ids)
    scores = function(run_dir, target if method in TARGET_METHODS else None, **given)
    return np.repeat(scores.score[:, None], n_targets, axis=1), kind, None


def method_label(method: str) -> str:
    """A method's name, or a ranking file's folder and name (``rank-less-mmlu_val/scores.csv``)."""
    return method if method in METHODS else f"{Path(method).parent.name}/{Path(method).name}"


def check_methods(methods: list[str]) -> None:
    """Every entry is a method of ``rank`` or an existing ranking file (checked before any work)."""
    unknown = [m for m in methods if m not in METHODS and not Path(m).is_file()]
    if unknown:
        raise InfluenceError(f"--methods: {', '.join(unknown)} is neither a method ({', '.join(sorted(METHODS))}) "
                             "nor a ranking or selection file")
    if not methods:
        raise InfluenceError("--methods names no method")


def evaluate_lds(run_dir: str | Path, target: str, methods: list[str], *, k: int = 16, heldout: str = "heldout",
                 subsets: str = "fit", alpha: float | None = None, seed: int | None = None, outcome: str = "loss",
                 target_tasks: list[str] | None = None, bootstrap: int = 1000, leave_out: float | None = None,
                 leave_out_repeats: int = 1, options: dict | None = None, settings: dict | None = None,
                 worker: tuple[int, int] | None = None, max_hours: float | None = None, dry_run: bool = False,
                 device: str | None = None, progress: bool = True,
                 say: Callable[[str], None] | None = None) -> LdsReport | None:
    """LDS of every method in ``methods`` for ``target`` on ``k`` held-out subset models (trained
    first where missing), and optionally the leave-some-out check; writes ``lds/<target>/``. With
    ``dry_run``, print the held-out models' cost estimate and return None."""
    say = say or (lambda message: None)
    check_methods(methods)
    if outcome not in HIGHER_IS_BETTER:
        raise InfluenceError(f"unknown --outcome '{outcome}'; choose from {', '.join(HIGHER_IS_BETTER)}")
    if leave_out is not None and not 0 < leave_out < 1:
        raise InfluenceError(f"--leave-out must be in (0, 1), got {leave_out}")
    if bootstrap < 0 or leave_out_repeats < 1:
        raise InfluenceError("--bootstrap must be >= 0 and --leave-out-repeats >= 1")
    options = dict(options or {})
    run = Run(run_dir)
    fit = open_subsets(run, subsets) if (run.subsets_path / subsets / "zarr.json").is_file() else None
    if fit is None and any(m in ("datamodel", "dsdm", "fz_influence", "memorization") for m in methods):
        raise InfluenceError(f"--methods includes a subset-model method but {run.subsets_path / subsets} does not "
                             "exist; run `influence subsets train` first")
    # The held-out models come from the same learning algorithm as the fit models, with other seeds.
    fit_design = fit.design if fit is not None else {}
    alpha = alpha if alpha is not None else fit_design.get("alpha", 0.5)
    seed = seed if seed is not None else fit_design.get("seed", 0) + 1
    if fit is not None and fit_design.get("kind") == "random" and seed == fit_design["seed"] and heldout != subsets:
        raise InfluenceError(f"the held-out subsets need a seed other than the fit subsets' ({seed}): their models "
                             "would be the same")
    if heldout == subsets:
        raise InfluenceError("--heldout must name other subset models than --subsets (the LDS is measured on "
                             "models the datamodels were not fit on)")
    training = settings if settings is not None else (fit.metadata["settings"] if fit is not None else None)
    options.setdefault("subsets", subsets)
    # The held-out models evaluate what the fit models evaluate (so any of those targets can be checked
    # later), plus this target; an existing held-out store keeps its own.
    if (run.subsets_path / heldout / "zarr.json").is_file():
        stored = SubsetStore.open(run.subsets_path, heldout).targets.values()
    else:
        stored = fit.targets.values() if fit is not None else []
    targets = [(t["target"], t.get("target_tasks")) for t in stored] + [(target, target_tasks)]
    trained = train_subsets(run.path, k, alpha, targets, name=heldout, seed=seed, settings=training, worker=worker,
                            max_hours=max_hours, dry_run=dry_run, device=device, progress=progress, say=say)
    if dry_run:
        return None
    if trained.run is not None and trained.run.busy:
        say(f"{len(trained.run.busy)} held-out model(s) are being trained by other workers; using the finished ones")
    held = open_subsets(run, heldout)
    dataset, keep = target_columns(held, target, target_tasks)
    units = [u for u in held.done_units() if u < k]
    if len(units) < 3:
        raise InfluenceError(f"{held.path}: {len(units)} held-out models finished; the LDS needs at least 3 "
                             "(rerun to finish them)")
    _, masks, values = held.outcomes(dataset, outcome, units)
    measured = values[:, keep] if HIGHER_IS_BETTER[outcome] else -values[:, keep]
    target_ids = held.target_labels(dataset)[0][keep]
    pool_ids = held.pool_ids.tolist()
    rows, per_target = [], {}
    for method in methods:
        effects, kind, ids = _effects(run.path, method, target, options, target_tasks, pool_ids, int(keep.sum()))
        if ids is not None and ids != target_ids.tolist():
            raise InfluenceError(f"{method}: its effects are for other target examples than the held-out models "
                                 "measured (another --target-tasks?)")
        mean, low, high, values_t = lds(masks, effects, measured, bootstrap)
        label = method_label(method)
        per_target[label] = values_t
        rows.append({"method": label, "lds": mean, "ci_low": low, "ci_high": high, "n_subsets": len(units),
                     "n_targets": int(np.isfinite(values_t).sum()), "effects": kind})
    table = pd.DataFrame(rows)
    report = LdsReport(table, pd.DataFrame(per_target, index=target_ids), {}, run.path / "lds" / target_name(target))
    if leave_out is not None:
        table["leave_out_delta"] = _leave_out(run, target, methods, options, target_tasks, leave_out, leave_out_repeats,
                                              pool_ids, int(keep.sum()), outcome, training, worker, max_hours, progress,
                                              say, report, device)
    report.settings = {"target": target, "target_tasks": target_tasks, "outcome": outcome, "heldout": heldout,
                       "heldout_units": units, "heldout_design": held.design, "fit_subsets": subsets if fit else None,
                       "bootstrap": bootstrap, "leave_out": leave_out, "training": held.metadata["settings"]}
    _write(report)
    return report


def _leave_out(run: Run, target, methods, options, target_tasks, fraction, repeats, pool_ids, n_targets, outcome,
               training, worker, max_hours, progress, say, report: LdsReport, device) -> list[float]:
    """Train the whole-pool model and, per method, the pool minus its top ``fraction``; return each
    method's change of the mean target outcome (higher = better) against the whole pool."""
    n = len(pool_ids)
    count = max(1, int(fraction * n))
    names, masks = ["whole pool"], [np.ones(n, dtype=bool)]
    for method in methods:
        effects, _, _ = _effects(run.path, method, target, options, target_tasks, pool_ids, n_targets)
        score = np.nan_to_num(effects.mean(axis=1), nan=-np.inf)
        mask = np.ones(n, dtype=bool)
        mask[np.argsort(-score, kind="stable")[:count]] = False
        names.append(method_label(method))
        masks.append(mask)
    masks = np.repeat(np.array(masks), repeats, axis=0)
    names = [f"{name} #{r}" for name in names for r in range(repeats)]
    store_name = f"leave-out-{hashlib.sha256(np.packbits(masks).tobytes()).hexdigest()[:10]}"
    train_masks(run.path, masks, names, [(target, target_tasks)], name=store_name, settings=training, worker=worker,
                max_hours=max_hours, progress=progress, say=say, device=device)
    store = open_subsets(run, store_name)
    report.settings["leave_out_store"] = store_name
    if len(store.done_units()) < len(masks):
        report.notes.append(f"leave-some-out: {len(masks) - len(store.done_units())} model(s) not trained yet; rerun")
        return [float("nan")] * len(methods)
    dataset, keep = target_columns(store, target, target_tasks)
    _, _, values = store.outcomes(dataset, outcome)
    better = values[:, keep] if HIGHER_IS_BETTER[outcome] else -values[:, keep]
    mean = better.mean(axis=1).reshape(-1, repeats).mean(axis=1)
    return [float(m - mean[0]) for m in mean[1:]]


def _write(report: LdsReport) -> None:
    report.folder.mkdir(parents=True, exist_ok=True)
    report.table.to_csv(report.folder / "lds.csv", index=False)
    report.per_target.to_csv(report.folder / "lds_per_target.csv", index_label="target_id")
    summary = {"settings": report.settings, "notes": report.notes,
               "methods": json.loads(report.table.to_json(orient="records")),
               "meaning": __doc__.strip().split("\n\n")[2]}
    (report.folder / "lds.json").write_text(json.dumps(summary, indent=2, default=str))
