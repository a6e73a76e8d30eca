"""The linear datamodeling score (LDS; Park et al., 2023): does a method predict what retraining does?

On ``M`` held-out subsets ``S_m`` of the pool (models trained by the counterfactual engine with seeds
disjoint from those the datamodels were fit on), for every target example ``t``:

    predicted(m, t) = sum_{x in S_m} effect(x, t)
    LDS(t)          = Spearman over m of (predicted(m, t), measured(m, t))

where ``effect`` is the method's effect of ``x`` on ``t`` (its :class:`~influence.scoring.Attribution`;
for a method with one score per example, that score for every ``t``; for a ranking file, its
``score`` column; for a selection file such as a ``selected.jsonl``, diversified or not, 1 for its
members and 0 for the others; for an attribution matrix from another tool, its entry for ``(x, t)``)
and ``measured`` is the held-out model's outcome on ``t``, signed so that higher is
better (minus the loss by default). The LDS is the mean over the target's examples (those whose
outcome and prediction vary over the subsets), with a bootstrap interval over the held-out subsets
and the number of subsets used. 1 = the method orders subsets exactly as retraining does; 0 = no better
than chance; negative = backwards (for a target-free score, e.g. ``nll``, the low end may be the
helpful one).

An attribution matrix (:func:`read_attribution`) makes the held-out models a benchmark for any method: it
goes through the same :func:`lds` as a method's :class:`~influence.scoring.Attribution` and keeps our sign
convention, higher = including the pool example helps that target example more (its loss lower); a tool
whose scores mean the opposite (e.g. "harmful" or loss-increase scores) must be negated first. It covers
every pool example and every target example (those of ``--target-tasks`` when given), each once; NaN
entries are unscorable and count as 0, as for our methods.

Leave-some-out (``leave_out = f``): one model on the whole pool and, for every method, one on the pool
minus the method's top ``f`` for the target; the change of the mean target outcome against the
whole-pool model (positive = removing the method's most helpful examples hurt, as it should).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from ..config import setting, settings_from
from ..core.units import UnitSettings
from ..data.formats import Example, load_examples
from ..data.targets import load_target, target_name
from ..errors import InfluenceError
from ..models.measure import HIGHER_IS_BETTER, Outcome
from ..scoring.base import Target, get_method, registry
from ..scoring.counterfactual import open_subsets, target_columns
from ..train.run import Run
from ..train.subset_store import SubsetStore, stored_subsets
from ..train.subsets import train_drops, train_masks, train_subsets


LdsDesign = Literal["subsets", "drop"]
DEFAULT_METHODS = ("less", "trak", "tracin", "datamodel", "fz_influence", "grand", "random")


@dataclass(kw_only=True)
class LdsSettings:
    """What ``evaluate lds`` checks and on which held-out models."""

    methods: list[str] | None = setting(
        None, f"Comma-separated methods of `rank`, ranking files (scores.csv / .parquet with id and score), selections "
              "(a selected.jsonl: 1 for its examples, 0 for the others) or attribution files (as --attribution) "
              f"[default: {','.join(DEFAULT_METHODS)}; none when --attribution is given].", list=True)
    attributions: list[str] = setting(
        default_factory=list, flag="attribution", multiple=True,
        help="An attribution matrix of any tool, scored beside the methods (repeat for several): higher = the pool "
             "example helps the target example more (negate scores that mean harm); CSV/Parquet with id and one column "
             "per target id, or pool_id, target_id and score; .npz with matrix, pool_ids and target_ids.")
    target_tasks: list[str] | None = setting(None, "Comma-separated subtasks of the target to keep.", list=True)
    k: int = setting(16, "Held-out subset models.", min=3)
    heldout: str = setting("heldout", "Name of the held-out subset models.")
    subsets: str = setting("fit", "The subset models the datamodels are fit on (their design and training are reused).")
    alpha: float | None = setting(None, "Held-out subset fraction [default: the fit subsets', else 0.5].",
                                  min=0, max=1, min_open=True, max_open=True)
    seed: int | None = setting(None, "Held-out subsets' seed [default: the fit subsets' + 1].")
    outcome: Outcome = setting("loss", "The measured outcome on the target (loss: lower is better; the others: "
                                       "higher).")
    bootstrap: int = setting(1000, "Bootstrap resamples of the held-out subsets for the interval.", min=0)
    leave_out: float | None = setting(None, "Also retrain without each method's top fraction and report the change of "
                                            "the target outcome.", min=0, max=1, min_open=True, max_open=True)
    leave_out_repeats: int = setting(1, "Models per leave-out mask (different seeds), averaged.", min=1)
    design: LdsDesign = setting("subsets", "subsets: held-out models on random subsets of the pool (fresh seeds); drop: "
                                          "the run's own training replayed with a few examples' weights at 0 (same "
                                          "order and seed: the single-model LDS of MAGIC).")
    drop: list[float] = setting(default_factory=lambda: [0.01, 0.05, 0.1], list=True,
                                help="With --design drop: fractions of the training examples dropped, each with --k "
                                     "models.")

    def __post_init__(self):
        """What is scored: the methods given (the default ones when neither they nor attribution files are), then the
        attribution files."""
        chosen = list(self.methods) if self.methods else [] if self.attributions else list(DEFAULT_METHODS)
        self.methods = chosen + [a for a in self.attributions if a not in chosen]

    def extra_problems(self) -> list[str]:
        if self.design == "drop" and (self.alpha is not None or self.leave_out is not None):
            return ["--alpha and --leave-out apply to --design subsets; --design drop replays the run with --drop "
                    "fractions of its examples left out"]
        if any(not 0 < f < 1 for f in self.drop):
            return [f"--drop fractions must lie in (0, 1), got {','.join(f'{f:g}' for f in self.drop)}"]
        if self.heldout == self.subsets:
            return ["--heldout must name other subset models than --subsets (the LDS is measured on models the "
                    "datamodels were not fit on)"]
        return []


ATTRIBUTION_FILE = "attribution file"


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


ATTRIBUTION_FORMATS = ("an attribution matrix is a CSV/Parquet with an id column of pool ids and one column per "
                       "target id, or with the columns pool_id, target_id and score, or a .npz with matrix, pool_ids "
                       "and target_ids")


def _few(ids: list) -> str:
    return ", ".join(map(str, ids[:3])) + (", ..." if len(ids) > 3 else "")


def _header(path: Path) -> list[str]:
    """The column names of a CSV (any suffix but .parquet) or Parquet file as written, duplicates kept."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(path).names
        with path.open(newline="", encoding="utf-8") as handle:
            return next(csv.reader(handle), [])
    except Exception as err:  # pyarrow and the csv module raise many kinds for an unreadable file
        raise InfluenceError(f"{path}: not a readable CSV or Parquet file ({err})") from None


def is_attribution(path: str | Path) -> bool:
    """Whether a file of ``--methods`` is an attribution matrix: a .npz (or a refused .npy), or a CSV/Parquet
    with a target_id column or without a score column (a ranking has id and score)."""
    path = Path(path)
    if path.suffix in (".npz", ".npy"):
        return True
    if path.suffix in (".jsonl", ".json", ".tsv"):
        return False
    columns = _header(path)
    return "target_id" in columns or "score" not in columns


def _numbers(path: Path, table: pd.DataFrame) -> np.ndarray:
    """``table``'s values as floats; a value that is no number is refused (an empty one is NaN)."""
    numbers = table.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(numbers) & table.notna().to_numpy()
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise InfluenceError(f"{path}: {int(bad.sum())} value(s) are not numbers, e.g. {table.iat[row, column]!r} in "
                             f"column {table.columns[column]}")
    return numbers


def _attribution_arrays(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(pool ids, target ids, matrix) as an attribution file holds them."""
    if path.suffix == ".npy":
        raise InfluenceError(f"{path}: a bare .npy matrix has no pool and target ids; save a .npz instead: "
                             "np.savez(path, matrix=matrix, pool_ids=pool_ids, target_ids=target_ids)")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as arrays:
                missing = [k for k in ("matrix", "pool_ids", "target_ids") if k not in arrays.files]
                if missing:
                    raise InfluenceError(f"{path}: no array {', '.join(missing)}; {ATTRIBUTION_FORMATS}")
                matrix, rows, columns = arrays["matrix"], arrays["pool_ids"], arrays["target_ids"]
        except InfluenceError:
            raise
        except Exception as err:  # numpy raises many kinds for an unreadable file (object arrays need pickle)
            raise InfluenceError(f"{path}: not a readable .npz of numbers and ids ({err})") from None
        if rows.ndim != 1 or columns.ndim != 1 or matrix.shape != (len(rows), len(columns)):
            raise InfluenceError(f"{path}: matrix is {matrix.shape}, pool_ids {rows.shape} and target_ids "
                                 f"{columns.shape}; it must be (len(pool_ids), len(target_ids))")
        if matrix.dtype.kind not in "biuf":
            raise InfluenceError(f"{path}: matrix holds {matrix.dtype} values, not numbers")
        return rows.astype(str).tolist(), columns.astype(str).tolist(), matrix.astype(np.float64)
    header = _header(path)
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        raise InfluenceError(f"{path}: duplicate column(s) {_few(duplicated)}")
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
            table = table.reset_index() if any(n is not None for n in table.index.names) else table  # ids as index
        else:
            table = pd.read_csv(path, dtype={"id": str, "pool_id": str, "target_id": str})
    except Exception as err:  # pandas raises many kinds for an unreadable file
        raise InfluenceError(f"{path}: not a readable CSV or Parquet file ({err})") from None
    pool = "pool_id" if "pool_id" in table else "id"
    if pool not in table or ("target_id" in table and "score" not in table):
        raise InfluenceError(f"{path}: columns {_few(list(table.columns))} are neither a ranking (id and score) "
                             f"nor an attribution matrix; {ATTRIBUTION_FORMATS}")
    if "target_id" not in table:  # wide: one column per target example
        columns = [c for c in table.columns if c != pool]
        return table[pool].astype(str).tolist(), [str(c) for c in columns], _numbers(path, table[columns])
    pairs = pd.MultiIndex.from_arrays([table[pool].astype(str), table["target_id"].astype(str)])
    if pairs.has_duplicates:
        twice = pairs[pairs.duplicated()].unique().tolist()
        raise InfluenceError(f"{path}: {len(twice)} (pool_id, target_id) pair(s) appear more than once: {_few(twice)}")
    scores = pd.Series(_numbers(path, table[["score"]])[:, 0], index=pairs)
    rows, columns = pairs.levels[0].tolist(), pairs.levels[1].tolist()
    absent = pd.MultiIndex.from_product([rows, columns]).difference(pairs).tolist()
    if absent:
        raise InfluenceError(f"{path}: {len(absent)} (pool_id, target_id) pair(s) of its ids have no row: {_few(absent)}; "
                             "give every pair (NaN for an unscorable one)")
    return rows, columns, scores.unstack().reindex(index=rows, columns=columns).to_numpy(dtype=np.float64)


def _check_ids(path: Path, given: list[str], wanted: list[str], what: str) -> None:
    """A file's ``what`` ("pool" or "target") ids ``given`` are those ``wanted``, each once, in any order."""
    twice = sorted(i for i, n in Counter(given).items() if n > 1)
    if twice:
        raise InfluenceError(f"{path}: {len(twice)} {what} id(s) appear more than once: {_few(twice)}")
    known, present = set(wanted), set(given)
    unknown = [i for i in given if i not in known]
    if unknown:
        scope = "this run's pool" if what == "pool" else "the target's examples (of --target-tasks when given)"
        raise InfluenceError(f"{path}: {len(unknown)} {what} id(s) are not in {scope}: {_few(unknown)}")
    absent = [i for i in wanted if i not in present]
    if absent:
        raise InfluenceError(f"{path}: {len(absent)} of the {len(wanted)} {what} examples are missing: {_few(absent)}; "
                             "the matrix must cover all of them")


def read_attribution(path: str | Path, pool_ids: list[str], target_ids: list[str]) -> np.ndarray:
    """An attribution matrix from any tool as (n_pool x n_target) effects in the order of ``pool_ids`` and
    ``target_ids`` (higher = the pool example helps the target example more; NaN = unscorable). Formats: CSV or
    Parquet with an ``id`` column of pool ids and one column per target id (wide), or with ``pool_id`` (or
    ``id``), ``target_id`` and ``score`` (long); a ``.npz`` with ``matrix``, ``pool_ids`` and ``target_ids``.
    Unknown, missing or repeated ids and values that are no finite numbers are refused."""
    path = Path(path)
    rows, columns, matrix = _attribution_arrays(path)
    _check_ids(path, rows, pool_ids, "pool")
    _check_ids(path, columns, target_ids, "target")
    if np.isinf(matrix).any():
        raise InfluenceError(f"{path}: {int(np.isinf(matrix).sum())} value(s) are infinite")
    row, column = {i: n for n, i in enumerate(rows)}, {i: n for n, i in enumerate(columns)}
    return matrix[np.ix_([row[i] for i in pool_ids], [column[i] for i in target_ids])]


def _effects(run: Run, name: str, target: Target, options: dict, pool_ids: list[str],
             target_ids: list[str]) -> tuple[np.ndarray, str, list[str] | None]:
    """(n_pool x n_targets effects, kind, the target ids the effects are for when per target example) of a
    method, a ranking or selection file or an attribution matrix; the method gets those of ``options`` it takes."""
    if name not in registry():
        if is_attribution(name):
            return read_attribution(name, pool_ids, target_ids), ATTRIBUTION_FILE, list(target_ids)
        return np.repeat(read_ranking(name, run.pool())[:, None], len(target_ids), axis=1), \
            "ranking or selection file", None
    method = get_method(name)
    settings = method.options(options, others_allowed=True)
    if method.has_attribution:
        attribution = method.attribution(run, target, settings)
        if list(attribution.pool_ids) != list(pool_ids):
            raise InfluenceError(f"{name}: its scores cover other pool examples than the held-out models")
        return attribution.matrix, "per target example", list(attribution.target_ids)
    scores = method.scores(run, target if method.needs_target else None, settings)
    return np.repeat(scores.score[:, None], len(target_ids), axis=1), "one score per example", None


def method_label(method: str) -> str:
    """A method's name, or a ranking file's folder and name (``rank-less-mmlu_val/scores.csv``)."""
    return method if method in registry() else f"{Path(method).parent.name}/{Path(method).name}"


def check_methods(run: Run, methods: list[str], target: Target, options: dict) -> None:
    """Every entry is a method of ``rank`` whose prerequisites the run has, an existing ranking or selection
    file, or an attribution matrix that covers the run's pool and the target (checked before any model is
    trained)."""
    unknown = [m for m in methods if m not in registry() and not Path(m).is_file()]
    if unknown:
        raise InfluenceError(f"--methods: {', '.join(unknown)} is neither a method ({', '.join(sorted(registry()))}) "
                             "nor a ranking, selection or attribution file")
    for name in methods:
        if name in registry():
            method = get_method(name)
            method.require(run, target if method.needs_target else None, method.options(options, others_allowed=True),
                           attribution=method.has_attribution)
        elif is_attribution(name):
            read_attribution(name, [e.id for e in run.pool()], [e.id for e in load_target(target.name, target.task_list)])


def evaluate_lds(run_dir: str | Path, target: str, methods: list[str] | None = None,
                 settings: LdsSettings | None = None, *, options: dict[str, Any] | None = None,
                 training: dict | None = None, units: UnitSettings | None = None, device: str | None = None,
                 progress: bool = True, say: Callable[[str], None] | None = None, **values: Any) -> LdsReport | None:
    """LDS of every method of ``methods`` for ``target`` on ``k`` held-out subset models (trained first
    where missing), and optionally the leave-some-out check; writes ``lds/<target>/``. ``settings`` (an
    :class:`LdsSettings`) and ``values`` (its fields by keyword) say what to check; ``options`` go to the
    methods that take them (e.g. ``proj_dim``, ``regression``); ``training`` overrides the held-out models'
    training settings; ``units`` (worker share, time cap, dry run: the held-out models' cost estimate, then
    None is returned)."""
    say = say or (lambda message: None)
    if methods is not None:
        values["methods"] = list(methods)
    settings = settings_from(LdsSettings, settings, where="evaluate lds", **values)
    units = units or UnitSettings()
    run = Run(run_dir)
    wanted = Target(target, tuple(settings.target_tasks) if settings.target_tasks else None)
    options = {"subsets": settings.subsets, **(options or {})}
    fit = open_subsets(run, settings.subsets) if settings.subsets in stored_subsets(run.subsets_path) else None
    check_methods(run, settings.methods, wanted, options)
    if settings.design == "drop":
        return _drop_lds(run, wanted, settings, options, units, device, progress, say)
    # The held-out models come from the same learning algorithm as the fit models, with other seeds.
    fit_design = fit.design if fit is not None else {}
    alpha = settings.alpha if settings.alpha is not None else fit_design.get("alpha", 0.5)
    seed = settings.seed if settings.seed is not None else fit_design.get("seed", 0) + 1
    if fit is not None and fit_design.get("kind") == "random" and seed == fit_design["seed"]:
        raise InfluenceError(f"the held-out subsets need a seed other than the fit subsets' ({seed}): their models "
                             "would be the same")
    training = training if training is not None else (fit.metadata["settings"] if fit is not None else None)
    # The held-out models evaluate what the fit models evaluate (so any of those targets can be checked
    # later), plus this target; an existing held-out store keeps its own.
    if settings.heldout in stored_subsets(run.subsets_path):
        stored = SubsetStore.open(run.subsets_path, settings.heldout).targets.values()
    else:
        stored = fit.targets.values() if fit is not None else []
    targets = [(t["target"], t.get("target_tasks")) for t in stored] + [(target, settings.target_tasks)]
    trained = train_subsets(run.path, k=settings.k, alpha=alpha, targets=targets, name=settings.heldout, seed=seed,
                            training=training, units=units, device=device, progress=progress, say=say)
    if units.dry_run:
        return None
    if trained.run is not None and trained.run.busy:
        say(f"{len(trained.run.busy)} held-out model(s) are being trained by other workers; using the finished ones")
    held = open_subsets(run, settings.heldout)
    rows, per_target, notes, target_ids, done = _score_on(run, held, wanted, settings, options, "held-out")
    pool_ids = held.pool_ids.tolist()
    table = pd.DataFrame(rows)
    report = LdsReport(table, pd.DataFrame(per_target, index=target_ids), {}, run.path / "lds" / target_name(target),
                       notes)
    if settings.leave_out is not None:
        table["leave_out_delta"] = _leave_out(run, wanted, settings, options, pool_ids, target_ids.tolist(), training,
                                              units, device, progress, say, report)
    report.settings = {"target": target, "target_tasks": settings.target_tasks, "outcome": settings.outcome,
                       "heldout": settings.heldout, "heldout_units": done, "heldout_design": held.design,
                       "fit_subsets": settings.subsets if fit else None, "bootstrap": settings.bootstrap,
                       "leave_out": settings.leave_out, "training": held.metadata["settings"]}
    _write(report)
    return report


def _score_on(run: Run, held: SubsetStore, target: Target, settings: LdsSettings, options: dict, what: str
              ) -> tuple[list[dict], dict, list[str], np.ndarray, list[int]]:
    """Every method's LDS on the finished models of ``held`` (``what``: how to call them in messages): one row per
    method, the LDS per target example by method, notes, the target ids and the models used."""
    dataset, keep = target_columns(held, target.name, settings.target_tasks)
    done = [u for u in held.done_units() if u < settings.k]
    if len(done) < 3:
        raise InfluenceError(f"{held.path}: {len(done)} {what} models finished; the LDS needs at least 3 "
                             "(rerun to finish them)")
    _, masks, outcomes = held.outcomes(dataset, settings.outcome, done)
    measured = outcomes[:, keep] if HIGHER_IS_BETTER[settings.outcome] else -outcomes[:, keep]
    target_ids = held.target_labels(dataset)[0][keep]
    pool_ids = held.pool_ids.tolist()
    rows, per_target, notes = [], {}, []
    for method in settings.methods:
        effects, kind, ids = _effects(run, method, target, options, pool_ids, target_ids.tolist())
        if ids is not None and ids != target_ids.tolist():
            raise InfluenceError(f"{method}: its effects are for other target examples than the {what} models "
                                 "measured (another --target-tasks?)")
        mean, low, high, values_t = lds(masks, effects, measured, settings.bootstrap)
        label = method_label(method)
        if kind == ATTRIBUTION_FILE and np.isnan(effects).any():
            notes.append(f"{label}: {int(np.isnan(effects).sum())} of its {effects.size} effects are NaN (unscorable; "
                         "counted as 0)")
        per_target[label] = values_t
        rows.append({"method": label, "lds": mean, "ci_low": low, "ci_high": high, "n_subsets": len(done),
                     "n_targets": int(np.isfinite(values_t).sum()), "effects": kind})
    return rows, per_target, notes, target_ids, done


def _drop_lds(run: Run, target: Target, settings: LdsSettings, options: dict, units: UnitSettings, device, progress,
              say) -> LdsReport | None:
    """The single-model LDS: per drop fraction, ``k`` replays of the run's training with that fraction of its examples'
    weights at 0 (``subsets.zarr/<heldout>-drop<fraction>-seed<seed>``), and every method's LDS on them. The
    prediction for a model is the sum of the effects of the examples it kept, so a method is scored by how it orders
    the drops."""
    rows, per_target, notes, stores = [], {}, [], {}
    seed = settings.seed if settings.seed is not None else 0
    for fraction in settings.drop:
        name = f"{settings.heldout}-drop{fraction:g}-seed{seed}"
        trained = train_drops(run.path, fraction, settings.k, [(target.name, settings.target_tasks)], name=name,
                              seed=seed, units=units, device=device, progress=progress, say=say)
        if units.dry_run:
            continue
        if trained.run is not None and trained.run.busy:
            say(f"{len(trained.run.busy)} drop model(s) are being trained by other workers; using the finished ones")
        held = open_subsets(run, name)
        scored, by_target, found, target_ids, done = _score_on(run, held, target, settings, options, "drop")
        stores[f"{fraction:g}"] = {"name": name, "units": done, "dropped": held.design["size"]}
        rows += [{**row, "drop": fraction} for row in scored]
        per_target.update({f"{label} @{fraction:g}": values for label, values in by_target.items()})
        notes += found
    if units.dry_run:
        return None
    report = LdsReport(pd.DataFrame(rows), pd.DataFrame(per_target, index=target_ids),
                       {"target": target.name, "target_tasks": settings.target_tasks, "outcome": settings.outcome,
                        "design": "drop", "drop": settings.drop, "stores": stores, "seed": seed,
                        "bootstrap": settings.bootstrap}, run.path / "lds" / f"{target_name(target.name)}-drop", notes)
    _write(report)
    return report


def _leave_out(run: Run, target: Target, settings: LdsSettings, options: dict, pool_ids: list[str], target_ids: list[str],
               training, units: UnitSettings, device, progress, say, report: LdsReport) -> list[float]:
    """Train the whole-pool model and, per method, the pool minus its top ``leave_out`` fraction; return each
    method's change of the mean target outcome (higher = better) against the whole pool."""
    n = len(pool_ids)
    count = max(1, int(settings.leave_out * n))
    names, masks = ["whole pool"], [np.ones(n, dtype=bool)]
    for method in settings.methods:
        effects, _, _ = _effects(run, method, target, options, pool_ids, target_ids)
        score = np.nan_to_num(effects.mean(axis=1), nan=-np.inf)
        mask = np.ones(n, dtype=bool)
        mask[np.argsort(-score, kind="stable")[:count]] = False
        names.append(method_label(method))
        masks.append(mask)
    repeats = settings.leave_out_repeats
    masks = np.repeat(np.array(masks), repeats, axis=0)
    names = [f"{name} #{r}" for name in names for r in range(repeats)]
    store_name = f"leave-out-{hashlib.sha256(np.packbits(masks).tobytes()).hexdigest()[:10]}"
    train_masks(run.path, masks, names, [(target.name, target.task_list)], name=store_name, training=training,
                units=units, progress=progress, say=say, device=device)
    store = open_subsets(run, store_name)
    report.settings["leave_out_store"] = store_name
    if len(store.done_units()) < len(masks):
        report.notes.append(f"leave-some-out: {len(masks) - len(store.done_units())} model(s) not trained yet; rerun")
        return [float("nan")] * len(settings.methods)
    dataset, keep = target_columns(store, target.name, target.task_list)
    _, _, values = store.outcomes(dataset, settings.outcome)
    better = values[:, keep] if HIGHER_IS_BETTER[settings.outcome] else -values[:, keep]
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
