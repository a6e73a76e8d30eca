"""``rank``: score the pool, order it and write the ranking and the selected subset (LESS, step 3); the
outputs are described in :mod:`.outputs`.

Several targets in one call (``rank(run, ["mmlu_val", "bbh"])``) write one folder per target; for
``less`` the pool's gradient stores are read once for all of them.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pandas as pd

from ..core.locks import writer_active
from ..data.targets import check_target, target_name
from ..errors import InfluenceError
from ..scoring import METHODS, TARGET_METHODS, Scores, less_scores_many
from ..train.run import Run
from .diversify import Diversify, _diversity, _pool_clusters, diversify_selection, selection_space
from .modes import degenerate_warnings, select, selection_notes
from .outputs import ranking_table, write_outputs


def check_output_folder(folder: Path, method: str, target: str | None) -> None:
    """Refuse to write a ranking over another one (another method or target) in ``folder``."""
    summary = folder / "summary.json"
    if not summary.is_file():
        return
    try:
        previous = json.loads(summary.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        previous = {}
    same = previous.get("method") == method and previous.get("target_name") in (None, target_name(target) if target else None)
    if not same:
        raise InfluenceError(f"{folder} holds another ranking ({previous.get('method', 'unknown method')}"
                             f"{' for ' + str(previous['target_name']) if previous.get('target_name') else ''}); "
                             "choose another --out, or give --overwrite to replace it")


def default_out(run_dir: str | Path, method: str, target: str | None) -> Path:
    return Path(run_dir) / (f"rank-{method}-{target_name(target)}" if target else f"rank-{method}")


def output_folders(run_dir: str | Path, method: str, targets: list[str | None], out: str | Path | None) -> list[Path]:
    """One output folder per target: ``out`` itself for one target, ``out/<target name>`` for several."""
    if out is None:
        return [default_out(run_dir, method, t) for t in targets]
    if len(targets) == 1:
        return [Path(out)]
    return [Path(out) / target_name(t) for t in targets]


def method_options(method: str, options: dict) -> dict:
    """The options ``method`` takes, from those given (None = not given); refuses one it does not take."""
    accepted = inspect.signature(METHODS[method]).parameters
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        names = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise InfluenceError(f"{names} does not apply to --method {method}")
    return given


def score_targets(run_dir: str | Path, method: str, targets: list[str | None], **options) -> list[Scores]:
    """Scores of the pool for each target (one pass over the pool's stores for ``less``)."""
    options = method_options(method, options)
    if method == "less":
        return less_scores_many(run_dir, targets, **options)
    return [METHODS[method](run_dir, target, **options) for target in targets]


def rank_many(
    run_dir: str | Path,
    targets: list[str | None],
    method: str = "less",
    fraction: float = 0.05,
    out: str | Path | None = None,
    mode: str = "top",
    band: tuple[float, float] = (0.25, 0.75),
    threshold: float | None = None,
    top_k: int | None = None,
    diversify: Diversify | str | None = None,
    space: str | None = None,
    overwrite: bool = False,
    hf_dataset: bool = False,
    write: bool = True,
    **options,
) -> dict[str | None, pd.DataFrame]:
    """:func:`rank` for several targets at once: one output folder per target (see
    :func:`output_folders`); returns each target's full ranking (with a ``selected`` column). A folder
    holding another method's or target's ranking is refused unless ``overwrite``; ``write=False``
    writes nothing and only returns the tables."""
    diversify = Diversify(diversify) if isinstance(diversify, str) else diversify
    if diversify is not None:
        problems = diversify.problems() + ([] if mode == "top" else [f"--diversify picks from the top, not --select {mode}"])
        if problems:
            raise InfluenceError("; ".join(problems))
    if space is not None and "space" in inspect.signature(METHODS.get(method, rank_many)).parameters:
        options["space"] = space
    if method not in METHODS:
        raise InfluenceError(f"unknown method '{method}'; available: {', '.join(sorted(METHODS))}")
    if method in TARGET_METHODS and not all(targets):
        raise InfluenceError(f"method '{method}' needs --target")
    for target in targets:
        if target:
            check_target(target)
    named = [target_name(t) for t in targets if t]
    if len(set(named)) < len(named):
        raise InfluenceError("two of the targets have the same name; their output folders would collide")
    if mode in ("top", "bottom") and top_k is None and not 0 < fraction <= 1:
        raise InfluenceError(f"--fraction must be in (0, 1], got {fraction}")
    run = Run(run_dir)
    run.check_data_unchanged()
    pool = run.pool()
    folders = output_folders(run_dir, method, targets, out)
    if write and not overwrite:
        for target, folder in zip(targets, folders):
            check_output_folder(folder, method, target)
    writing = writer_active(run.path)  # stores read are complete and checked; say that a writer is at work
    measured_in = selection_space(run, space, options.get("proj_dim"))
    labels = _pool_clusters(measured_in)
    results = {}
    for target, folder, scores in zip(targets, folders, score_targets(run_dir, method, targets, **options)):
        table = ranking_table(scores, pool)
        selected = select(table, mode, fraction, band, threshold, top_k)
        selection = {"mode": mode, "fraction": fraction, "top_k": top_k, "band": list(band), "threshold": threshold}
        if diversify is not None:
            selected, selection["diversify"] = diversify_selection(table, scores, diversify, measured_in, len(selected))
        if measured_in is not None:
            selection["diversity"] = _diversity(measured_in, labels, selected)
        warnings = degenerate_warnings(table, scores)
        if writing:
            warnings.append("another influence process was writing to this run while it was ranked (only complete, "
                            "checked stores were read)")
        if write:
            write_outputs(folder, table, selected, pool, scores, selection, warnings,
                          selection_notes(table, selected, mode, fraction, top_k), hf_dataset, target)
        results[target] = table.assign(selected=table["id"].isin(selected["id"]))
    return results


def rank(
    run_dir: str | Path,
    target: str | None = None,
    method: str = "less",
    fraction: float = 0.05,
    out: str | Path | None = None,
    mode: str = "top",
    band: tuple[float, float] = (0.25, 0.75),
    threshold: float | None = None,
    top_k: int | None = None,
    **options,
) -> pd.DataFrame:
    """Score the run's pool with ``method`` (for ``target`` where the method needs one), write the
    outputs (see the module docstring) and return the full ranking. ``options`` go to the scoring
    function (e.g. ``learned_threshold`` for ``forgetting``, ``seed`` for ``random``, ``proj_dim``),
    except ``diversify`` (a :class:`Diversify` or an algorithm's name: diversity-aware selection of the
    top), ``space`` (where diversity is measured; default the run's gradients, ``"none"`` to skip) and
    ``write=False`` (return the ranking, its ``selected`` column marking the selection, and write nothing)."""
    return rank_many(run_dir, [target], method, fraction, out, mode, band, threshold, top_k, **options)[target]
