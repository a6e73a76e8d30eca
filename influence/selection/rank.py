"""``rank``: score the pool, order it and write the ranking and the selected subset (LESS, step 3); the
outputs are described in :mod:`.outputs`.

Several targets in one call (``rank(run, ["mmlu_val", "bbh"])``) write one folder per target; for
``less`` the pool's gradient stores are read once for all of them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import settings_from
from ..core.locks import writer_active
from ..core.storage import check_writable
from ..data.targets import check_target, target_name
from ..errors import InfluenceError
from ..scoring.base import Method, Scores, Target, get_method
from ..train.run import Run
from .diversify import _diversity, _pool_clusters, diversify_selection, selection_space
from .modes import degenerate_warnings, select, selection_notes
from .outputs import ranking_table, write_outputs
from .settings import DEFAULT_BAND, DEFAULT_FRACTION, Diversify, RankSettings

CONCURRENT_WRITER = ("another influence process was writing to this run while it was ranked (only complete, "
                     "checked stores were read)")


def recorded_summary(folder: Path) -> dict | None:
    """The ``summary.json`` of the ranking in ``folder`` (None where there is none; {} where it cannot be read)."""
    summary = folder / "summary.json"
    if not summary.is_file():
        return None
    try:
        return json.loads(summary.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def check_output_folder(folder: Path, run: Run, settings: dict, overwrite: bool) -> None:
    """Refuse to write where a ranking must not be replaced: another run's ranking (whatever ``overwrite``), a
    ranking made with other settings (unless ``overwrite``), or a folder of files that are not a ranking."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise InfluenceError(f"--out {folder}: exists and is not a folder")
    previous = recorded_summary(folder)
    if previous is None:
        if any(folder.iterdir()):
            raise InfluenceError(f"--out {folder}: holds files that are not a ranking; choose another --out")
        return
    run.owns(previous.get("run_id"), f"the ranking in {folder}")
    before = previous.get("rank_settings") or {"method": previous.get("method"), "target": previous.get("target_name")}
    now = settings if "rank_settings" in previous else {"method": settings["method"], "target": settings["target"]}
    if before != now and not overwrite:
        differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise InfluenceError(f"{folder} holds a ranking made with other settings ({', '.join(differ)} differ: "
                             f"{', '.join(f'{k} {before.get(k)!r}' for k in differ)}); choose another --out, or give "
                             "--overwrite to replace it")


def default_out(run_dir: str | Path, method: str, target: str | None, settings: RankSettings | None = None) -> Path:
    """``RUN/rank-<method>[-<target>]``, with the selection mode and the diversification where they are not the
    plain top: rankings that select differently never share a folder."""
    name = f"rank-{method}-{target_name(target)}" if target else f"rank-{method}"
    if settings is not None and settings.mode != "top":
        name += f"-{settings.mode}"
    if settings is not None and settings.diversify.algorithm is not None:
        name += f"-{settings.diversify.algorithm}"
    return Path(run_dir) / name


def output_folders(run_dir: str | Path, method: str, targets: list[str | None], out: str | Path | None,
                   settings: RankSettings | None = None) -> list[Path]:
    """One output folder per target: ``out`` itself for one target, ``out/<target name>`` for several."""
    if out is None:
        return [default_out(run_dir, method, t, settings) for t in targets]
    if len(targets) == 1:
        return [Path(out)]
    return [Path(out) / target_name(t) for t in targets]


def rank_settings_record(settings: RankSettings, method: str, target: str | None, options: Any) -> dict:
    """What makes a ranking distinct, recorded in its summary: two rankings with the same record are the same."""
    return {"method": method, "target": target_name(target) if target else None, "mode": settings.mode,
            "fraction": settings.fraction, "top_k": settings.top_k, "band": list(settings.band or ()) or None,
            "threshold": settings.threshold, "diversify": dataclasses.asdict(settings.diversify),
            "target_tasks": settings.target_tasks, "options": dataclasses.asdict(options)}


def score_targets(run: Run, method: Method, targets: list[Target | None], options: Any) -> list[Scores]:
    """Scores of the pool for each target by ``method`` with its checked ``options``, after its prerequisites
    were checked (one pass over the pool's stores for several targets where the method shares it, as LESS)."""
    for target in targets:
        method.require(run, target, options)
    return method.scores_many(run, targets, options)


@dataclass
class Ranking:
    """One target's ranking: the full table (with a ``selected`` column), what ``summary.json`` holds, and the
    findings a caller acts on: ``degenerate`` (what makes the ranking meaningless) and ``concurrent_writer``
    (another process was writing to the run while it was ranked; only complete, checked stores were read)."""

    target: str | None
    folder: Path
    table: pd.DataFrame
    summary: dict
    degenerate: list[str] = field(default_factory=list)
    concurrent_writer: bool = False


def split_values(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword values of the API as (``RankSettings`` fields, the method's options)."""
    names = {f.name for f in dataclasses.fields(RankSettings)}
    if isinstance(values.get("diversify"), str):
        values = {**values, "diversify": Diversify(algorithm=values["diversify"])}
    return ({k: v for k, v in values.items() if k in names}, {k: v for k, v in values.items() if k not in names})


def rank_many(run_dir: str | Path | Run, targets: list[str | None], settings: RankSettings | None = None,
              method_options: dict[str, Any] | None = None, **values: Any) -> dict[str | None, Ranking]:
    """:func:`rank` for several targets at once: one output folder per target (see :func:`output_folders`).
    ``settings`` (a :class:`RankSettings`) and ``values`` (its fields by keyword, and the method's options)
    say what to do; returns each target's :class:`Ranking`. A folder holding another method's or target's
    ranking is refused unless ``overwrite``; ``write=False`` writes nothing and only returns the rankings."""
    given, options = split_values(values)
    settings = settings_from(RankSettings, settings, where="rank", **given)
    method = get_method(settings.method)
    options = method.options({**(method_options or {}), **options, **_shared_with_method(settings, method)})
    wanted = [Target.of(t, settings.target_tasks) for t in targets]
    if method.needs_target and not all(wanted):
        raise InfluenceError(f"method '{method.name}' needs --target")
    for target in targets:
        if target:
            check_target(target)
    named = [target_name(t) for t in targets if t]
    if len(set(named)) < len(named):
        raise InfluenceError("two of the targets have the same name; their output folders would collide")
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)  # compare passes its Run: the pool is read once
    run.check_data_unchanged()
    pool = run.pool()
    folders = output_folders(run.path, method.name, targets, settings.out, settings)
    records = [rank_settings_record(settings, method.name, target, options) for target in targets]
    if settings.write:
        for folder, record in zip(folders, records):
            check_output_folder(folder, run, record, settings.overwrite)
            check_writable(folder)
    writing = writer_active(run.path)  # stores read are complete and checked; say that a writer is at work
    measured_in = selection_space(run, settings.space, getattr(options, "proj_dim", None))
    labels = _pool_clusters(measured_in)
    fraction = settings.fraction if settings.fraction is not None or settings.top_k is not None else DEFAULT_FRACTION
    band = settings.band or DEFAULT_BAND
    owner = {"run_id": run.run_id, "pool_sha256": run.pool_sha256}
    results = {}
    for target, folder, record, scores in zip(targets, folders, records, score_targets(run, method, wanted, options)):
        table = ranking_table(scores, pool)
        selected = select(table, settings.mode, fraction, band, settings.threshold, settings.top_k)
        selection = {"mode": settings.mode, "fraction": fraction if settings.mode in ("top", "bottom") else None,
                     "top_k": settings.top_k, "band": list(band), "threshold": settings.threshold}
        if settings.diversify.algorithm is not None:
            selected, selection["diversify"] = diversify_selection(table, scores, settings.diversify, measured_in,
                                                                   len(selected))
        if measured_in is not None:
            selection["diversity"] = _diversity(measured_in, labels, selected)
        degenerate = degenerate_warnings(table, scores)
        warnings = degenerate + ([CONCURRENT_WRITER] if writing else [])
        notes = selection_notes(table, selected, settings.mode, fraction, settings.top_k)
        summary = write_outputs(folder, table, selected, pool, scores, selection, warnings, notes, settings.hf_dataset,
                                target, write=settings.write, extra={**owner, "rank_settings": record})
        results[target] = Ranking(target, folder, table.assign(selected=table["id"].isin(selected["id"])), summary,
                                  degenerate, writing)
    return results


def _shared_with_method(settings: RankSettings, method: Method) -> dict[str, Any]:
    """``rank``'s settings that are also options of the method (one flag for both: ``--space`` and ``--clusters``
    measure diversity and, for knn_distance, prototypicality and semdedup, define the score)."""
    names = {f.name for f in dataclasses.fields(method.Options)}
    shared = {"space": settings.space, "clusters": settings.diversify.clusters}
    return {k: v for k, v in shared.items() if k in names and v is not None}


def rank(run_dir: str | Path | Run, target: str | None = None, settings: RankSettings | None = None,
         **values: Any) -> pd.DataFrame:
    """Score the run's pool with a method (for ``target`` where the method needs one), write the outputs (see
    :mod:`.outputs`) and return the full ranking, its ``selected`` column marking the selection. ``settings``
    (a :class:`RankSettings`) and ``values`` (its fields by keyword: ``method``, ``fraction``, ``mode``, ``out``,
    ``diversify`` (a :class:`Diversify` or an algorithm's name), ``space``, ``write``...) say what to do; the
    other keywords are the method's options (e.g. ``learned_threshold`` for ``forgetting``, ``seed`` for
    ``random``, ``proj_dim``)."""
    return rank_many(run_dir, [target], settings, **values)[target].table
