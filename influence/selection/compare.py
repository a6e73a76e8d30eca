"""``compare``: rank with several methods and compare the rankings (top overlap, score correlation, length bias)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pandas as pd

from ..errors import InfluenceError
from ..scoring import METHODS
from .modes import select
from .outputs import spearman
from .rank import rank


def overlap(a: pd.DataFrame, b: pd.DataFrame, fraction: float) -> float:
    """Share of ``b``'s top ``fraction`` (of the pool, LESS's count) that is also in ``a``'s top."""
    count = max(1, int(fraction * len(a)))
    top_a = set(a[a["finite"]].head(count)["id"])
    top_b = set(b[b["finite"]].head(count)["id"])
    return len(top_a & top_b) / max(1, len(top_b))


def compare_methods(
    run_dir: str | Path,
    target: str,
    methods: list[str] = ("less", "random", "bm25", "dsir", "rds"),
    fraction: float = 0.1,
    reference: str = "less",
    **options,
) -> pd.DataFrame:
    """Rank with each of ``methods`` (outputs in ``run_dir/rank-<method>-<target>``) and compare each
    ranking with ``reference``'s: overlap of the top ``fraction``, Spearman correlation of the scores,
    and each score's Spearman correlation with the response length (the length bias)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or reference not in methods:
        raise InfluenceError(f"unknown method(s) {', '.join(unknown) or reference}; available: {', '.join(sorted(METHODS))}")
    tables = {}
    for method in methods:
        accepted = inspect.signature(METHODS[method]).parameters
        tables[method] = rank(run_dir, target, method, fraction,
                              **{k: v for k, v in options.items() if k in accepted})
    base = tables[reference].set_index("id")
    rows = []
    for method, table in tables.items():
        aligned = table.set_index("id").reindex(base.index)
        rows.append({
            "method": method,
            f"top_{fraction:g}_overlap_with_{reference}": overlap(table, tables[reference], fraction),
            f"spearman_with_{reference}": spearman(aligned["score"], base["score"]),
            "spearman_with_length": spearman(table["score"], table["response_chars"]),
            "selected_median_chars": float(select(table, fraction=fraction)["response_chars"].median()),
            "pool_median_chars": float(table["response_chars"].median()),
        })
    return pd.DataFrame(rows)
