"""``compare``: rank with several methods and compare the rankings (top overlap, score correlation, length bias)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import setting, settings_from
from ..data.targets import target_name
from ..scoring import options as shared
from ..scoring.base import MethodChoice, get_method
from ..train.run import Run
from .modes import select
from .outputs import load_rankings, spearman
from .rank import default_out, rank, rank_settings_record, recorded_summary
from .settings import RankSettings, fraction


@dataclass(kw_only=True)
class CompareSettings:
    """Which methods ``compare`` ranks with, and what it compares."""

    methods: list[str] = setting(default_factory=lambda: ["less", "random", "bm25", "dsir", "rds"],
                                 help="Comma-separated methods to rank with and compare.", list=True,
                                 type=MethodChoice(), nonempty=True)
    reference: str = setting("less", "The method the others are compared with.", type=MethodChoice())
    fraction: float = fraction(0.1, "Top fraction whose overlap is reported.")
    target_tasks: list[str] | None = setting(None, "Comma-separated subtasks of the target to keep.", list=True)
    proj_dim: int | None = shared.proj_dim()

    def extra_problems(self) -> list[str]:
        return [] if self.reference in self.methods else [f"--reference {self.reference} is not among --methods"]


def _same_ranking(run: Run, folder: Path, settings: RankSettings, target: str, options) -> pd.DataFrame | None:
    """The ranking in ``folder`` when it is this run's and was made with exactly these settings (None otherwise)."""
    recorded = recorded_summary(folder)
    if recorded is None or not (folder / "scores.parquet").is_file():
        return None
    if recorded.get("run_id") != run.run_id or recorded.get("rank_settings") != rank_settings_record(
            settings, settings.method, target, options):
        return None
    return load_rankings(folder)


def overlap(a: pd.DataFrame, b: pd.DataFrame, fraction: float) -> float:
    """Share of ``b``'s top ``fraction`` (of the pool, LESS's count) that is also in ``a``'s top."""
    count = max(1, int(fraction * len(a)))
    top_a = set(a[a["finite"]].head(count)["id"])
    top_b = set(b[b["finite"]].head(count)["id"])
    return len(top_a & top_b) / max(1, len(top_b))


def compare_methods(run_dir: str | Path, target: str, settings: CompareSettings | None = None,
                    **values: Any) -> pd.DataFrame:
    """Rank with each of the ``methods`` and compare each
    ranking with ``reference``'s: overlap of the top ``fraction``, Spearman correlation of the scores,
    and each score's Spearman correlation with the response length (the length bias). ``settings`` (a
    :class:`CompareSettings`) and ``values`` (its fields by keyword) say which. A method's ranking made by
    ``rank`` with the same settings is read, not redone; the others go in ``run_dir/compare-<target>/<method>``,
    so compare never replaces a ranking the user made."""
    settings = settings_from(CompareSettings, settings, where="compare", **values)
    run = Run(run_dir)
    tables = {}
    for name in settings.methods:
        method = get_method(name)
        options = method.options({"proj_dim": settings.proj_dim}, others_allowed=True)
        ranking = RankSettings(method=name, fraction=settings.fraction, target_tasks=settings.target_tasks)
        tables[name] = _same_ranking(run, default_out(run.path, name, target), ranking, target, options)
        if tables[name] is None:  # never replace a ranking the user made: compare's own go in compare-<target>/
            out = run.path / f"compare-{target_name(target)}" / name
            tables[name] = rank(run, target, replace(ranking, out=str(out), overwrite=True), **vars(options))
    reference, fraction_ = settings.reference, settings.fraction
    base = tables[reference].set_index("id")
    rows = []
    for method, table in tables.items():
        aligned = table.set_index("id").reindex(base.index)
        rows.append({
            "method": method,
            f"top_{fraction_:g}_overlap_with_{reference}": overlap(table, tables[reference], fraction_),
            f"spearman_with_{reference}": spearman(aligned["score"], base["score"]),
            "spearman_with_length": spearman(table["score"], table["response_chars"]),
            "selected_median_chars": float(select(table, fraction=fraction_)["response_chars"].median()),
            "pool_median_chars": float(table["response_chars"].median()),
        })
    return pd.DataFrame(rows)
