"""``rank``: score the pool, order it and write the ranking and the selected subset (LESS, step 3).

Outputs in ``out``:

* ``scores.csv``: ``id, source, score, rank, finite`` in rank order (rank 1 = highest score);
* ``scores.parquet``: the same plus one ``task:<name>`` column per target subtask where the method has
  a per-subtask breakdown;
* ``selected.jsonl``: the selected examples (by default the top ``fraction``; see :func:`select`),
  each line the example's original record (so it can be trained on directly), in rank order;
* ``summary.json``: method, target, what the score means, how many examples, what was combined.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .data import Example, load_pool
from .errors import InfluenceError
from .run import Run
from .scoring import METHODS, TARGET_METHODS, Scores

TASK_PREFIX = "task:"


def ranking_table(scores: Scores, pool: list[Example]) -> pd.DataFrame:
    """Scores joined with the pool, sorted: highest score first, unscorable examples last."""
    if [e.id for e in pool] != list(scores.ids):
        raise InfluenceError("scores do not match the pool's examples (ids differ); recompute the gradients")
    finite = scores.finite if scores.finite is not None else np.isfinite(scores.score)
    table = pd.DataFrame(
        {
            "id": scores.ids,
            "source": [e.source for e in pool],
            "score": scores.score,
            "finite": finite & np.isfinite(scores.score),
        }
    )
    if scores.per_task is not None:
        for j, name in enumerate(scores.task_names):
            table[TASK_PREFIX + name] = scores.per_task[:, j]
    table["pool_index"] = np.arange(len(pool))
    # Stable sort on (-score) keeps pool order among ties; NaN goes last.
    order = np.lexsort((table["pool_index"].to_numpy(), -np.nan_to_num(table["score"].to_numpy(), nan=-np.inf)))
    table = table.iloc[order].reset_index(drop=True)
    table.insert(3, "rank", np.arange(1, len(table) + 1))
    return table


SELECT_MODES = ("top", "bottom", "middle", "below", "above")


def select(
    table: pd.DataFrame,
    mode: str = "top",
    fraction: float = 0.05,
    band: tuple[float, float] = (0.25, 0.75),
    threshold: float | None = None,
) -> pd.DataFrame:
    """Rows of a ranking to keep, in rank order; unscorable examples are never selected.

    * ``top`` / ``bottom``: the highest / lowest ``fraction`` of scores;
    * ``middle``: scores between the ``band`` quantiles (perplexity-based pruning keeps the middle);
    * ``below`` / ``above``: scores strictly below / above ``threshold`` (e.g. IFD < 1).
    """
    scored = table[table["finite"]]
    if mode in ("top", "bottom"):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        count = max(1, math.ceil(fraction * len(scored)))
        return scored.head(count) if mode == "top" else scored.tail(count).iloc[::-1]
    if mode == "middle":
        low, high = band
        if not 0 <= low < high <= 1:
            raise ValueError(f"band must satisfy 0 <= low < high <= 1, got {band}")
        lo, hi = scored["score"].quantile([low, high])
        return scored[(scored["score"] >= lo) & (scored["score"] <= hi)]
    if mode in ("below", "above"):
        if threshold is None:
            raise ValueError(f"--select {mode} needs --threshold")
        keep = scored["score"] < threshold if mode == "below" else scored["score"] > threshold
        return scored[keep]
    raise ValueError(f"unknown selection mode {mode!r}; choose from {', '.join(SELECT_MODES)}")


def write_outputs(
    out: Path, table: pd.DataFrame, selected: pd.DataFrame, pool: list[Example], scores: Scores, selection: dict
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table[["id", "source", "score", "rank", "finite"]].to_csv(out / "scores.csv", index=False)
    table.drop(columns=["pool_index"]).to_parquet(out / "scores.parquet", index=False)
    with open(out / "selected.jsonl", "w", encoding="utf-8") as fh:
        for index in selected["pool_index"]:
            fh.write(json.dumps(pool[int(index)].record, ensure_ascii=False) + "\n")
    summary = {
        "method": scores.method,
        "score_meaning": scores.description,
        "n_pool": len(pool),
        "n_selected": len(selected),
        "selection": selection,
        "n_unscorable": int((~table["finite"]).sum()),
        "selected_ids": selected["id"].tolist(),
        **scores.details,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))


def default_out(run_dir: str | Path, method: str, target: str | None) -> Path:
    return Path(run_dir) / (f"rank-{method}-{Path(target).stem}" if target else f"rank-{method}")


def rank(
    run_dir: str | Path,
    target: str | None = None,
    method: str = "less",
    fraction: float = 0.05,
    out: str | Path | None = None,
    mode: str = "top",
    band: tuple[float, float] = (0.25, 0.75),
    threshold: float | None = None,
    **method_options,
) -> pd.DataFrame:
    """Score the run's pool with ``method`` (for ``target`` where the method needs one), write the
    outputs (see the module docstring) and return the full ranking. ``method_options`` go to the
    scoring function (e.g. ``learned_threshold`` for ``forgetting``)."""
    if method not in METHODS:
        raise InfluenceError(f"unknown method '{method}'; available: {', '.join(sorted(METHODS))}")
    if method in TARGET_METHODS and not target:
        raise InfluenceError(f"method '{method}' needs --target")
    run = Run(run_dir)
    run.check_data_unchanged()
    pool = load_pool(run.train_files)
    scores = METHODS[method](run_dir, target, **method_options)
    table = ranking_table(scores, pool)
    selected = select(table, mode, fraction, band, threshold)
    selection = {"mode": mode, "fraction": fraction, "band": list(band), "threshold": threshold}
    write_outputs(Path(out) if out else default_out(run_dir, method, target), table, selected, pool, scores, selection)
    return table


def load_rankings(out: str | Path) -> pd.DataFrame:
    """The full ranking written by :func:`rank` (with per-subtask columns)."""
    return pd.read_parquet(Path(out) / "scores.parquet")


def task_columns(table: pd.DataFrame) -> list[str]:
    return [c[len(TASK_PREFIX):] for c in table.columns if c.startswith(TASK_PREFIX)]


def top_for_task(table: pd.DataFrame, task: str, k: int = 3, bottom: bool = False) -> pd.DataFrame:
    """The ``k`` examples with the highest (or lowest) score for one target subtask."""
    column = TASK_PREFIX + task
    if column not in table:
        raise InfluenceError(f"no subtask '{task}' in this ranking; available: {', '.join(task_columns(table))}")
    ordered = table[table["finite"]].sort_values(column, ascending=bottom, kind="stable")
    return ordered.head(k)


def example_text(example: Example, width: int = 160) -> str:
    """One-line preview of an example: first user turn -> last assistant turn."""
    prompt = next((m["content"] for m in example.messages if m["role"] == "user"), "")
    response = [m["content"] for m in example.messages if m["role"] == "assistant"][-1]
    text = f"{prompt.strip()} => {response.strip()}".replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def pool_by_id(run_dir: str | Path) -> dict[str, Example]:
    return {e.id: e for e in load_pool(Run(run_dir).train_files)}
