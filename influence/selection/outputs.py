"""What ``rank`` writes and how it is read back. Outputs in a ranking's folder:

* ``scores.csv``: ``id, source, score, rank, finite`` in rank order (rank 1 = highest score);
* ``scores.parquet``: the same plus one ``task:<name>`` column per target subtask where the method has
  a per-subtask breakdown, and the method's own columns (``weight``, ``duplicate``, ...);
* ``selected.jsonl``: the selected examples, in rank order, one schema whatever the pool's formats: ``id``,
  ``score``, ``rank``, ``messages`` (so it can be trained on directly, ids kept), ``source`` and the
  ``original`` record, and ``weight`` for methods that weigh their selection (``gradmatch``, ``craig``: the loss
  weight ``evaluate select`` trains the example with);
* ``summary.json``: method, target, what the score means, how many examples, what was combined, and
  the length bias: the Spearman correlation of the score with the response length and the selected
  subset's length distribution against the pool's (LESS is known to favour short examples).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.storage import publish_folder, staging_folder
from ..data.formats import Example
from ..data.targets import target_name
from ..errors import InfluenceError
from ..scoring import Scores
from ..train.run import Run

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
    for name, values in scores.columns.items():
        table[name] = values
    table["response_chars"] = [response_length(e) for e in pool]
    table["pool_index"] = np.arange(len(pool))
    # Stable sort on (-score) keeps pool order among ties; NaN goes last.
    order = np.lexsort((table["pool_index"].to_numpy(), -np.nan_to_num(table["score"].to_numpy(), nan=-np.inf)))
    table = table.iloc[order].reset_index(drop=True)
    table.insert(3, "rank", np.arange(1, len(table) + 1))
    return table


def response_length(example: Example) -> int:
    """Characters of the example's responses (every assistant turn): the length LESS's bias is about."""
    return sum(len(m["content"]) for m in example.messages if m["role"] == "assistant")


def spearman(a, b) -> float | None:
    """Spearman rank correlation over the rows where both are finite (None when undefined)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return None
    ra, rb = pd.Series(a[keep]).rank().to_numpy(), pd.Series(b[keep]).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def length_bias(table: pd.DataFrame, selected: pd.DataFrame) -> dict:
    """How the score and the selection relate to response length (characters)."""

    def describe(lengths: pd.Series) -> dict:
        if not len(lengths):
            return {"n": 0}
        q = lengths.quantile([0.1, 0.5, 0.9])
        return {"n": int(len(lengths)), "mean": round(float(lengths.mean()), 1), "p10": float(q[0.1]),
                "median": float(q[0.5]), "p90": float(q[0.9])}

    scored = table[table["finite"]]
    return {
        "unit": "response characters",
        "spearman_score_vs_length": spearman(scored["score"], scored["response_chars"]),
        "pool": describe(table["response_chars"]),
        "selected": describe(selected["response_chars"]),
    }


def write_outputs(
    out: Path, table: pd.DataFrame, selected: pd.DataFrame, pool: list[Example], scores: Scores, selection: dict,
    warnings: list[str] | None = None, notes: list[str] | None = None, hf_dataset: bool = False,
    target: str | None = None, write: bool = True, extra: dict | None = None,
) -> dict:
    """Write a ranking's files into ``out`` (nothing with ``write=False``), published whole: written into a
    staging folder beside it and renamed into place, so a reader sees the previous ranking or this one, never a
    mix. ``extra`` (the run's id, the pool's fingerprint, the ranking's settings) is recorded in the summary.
    Returns what ``summary.json`` holds."""
    summary = {
        "method": scores.method,
        "target_name": target_name(target) if target else None,
        **(extra or {}),
        "warnings": warnings or [],
        "notes": notes or [],
        "score_meaning": scores.description,
        "n_pool": len(pool),
        "n_selected": len(selected),
        "selection": selection,
        "n_unscorable": int((~table["finite"]).sum()),
        "length_bias": length_bias(table, selected),
        **scores.details,
        "selected_ids": selected["id"].tolist(),
    }
    if not write:
        return summary
    staging = staging_folder(out)
    staging.mkdir(parents=True)
    table[["id", "source", "score", "rank", "finite"]].to_csv(staging / "scores.csv", index=False)
    table.drop(columns=["pool_index"]).to_parquet(staging / "scores.parquet", index=False)
    records = [selected_record(pool[int(index)], score, rank)
               for index, score, rank in zip(selected["pool_index"], selected["score"], selected["rank"])]
    if "weight" in selected:  # a method that weighs its selection (gradmatch, craig): evaluate select trains with it
        for record, weight in zip(records, selected["weight"]):
            record["weight"] = float(weight)
    with open(staging / "selected.jsonl", "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    if hf_dataset:
        save_selection_dataset(records, staging / "selected_dataset")
    for name, frame in scores.tables.items():
        frame.to_parquet(staging / f"{name}.parquet", index=False)
    (staging / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    publish_folder(staging, out)
    return summary


def selected_record(example: Example, score: float, rank: int) -> dict:
    """One line of ``selected.jsonl``: the same schema whatever the pool's formats (``messages``, which
    ``warmup --train`` reads; the pool id, which it keeps), the score and rank, and the original record."""
    record = {"id": example.id, "score": float(score) if np.isfinite(score) else None, "rank": int(rank),
              "messages": example.messages, "source": example.source, "original": example.record}
    if example.task is not None:
        record["task"] = example.task
    return record


def save_selection_dataset(records: list[dict], folder: Path) -> None:
    """The selection as a Hugging Face dataset folder (``datasets.load_from_disk``; ``--train`` reads it
    too). Original records of a mixed pool differ in fields, so ``original`` is kept as JSON text."""
    import datasets

    rows = [{**{k: v for k, v in r.items() if k != "original"}, "original": json.dumps(r["original"], ensure_ascii=False)}
            for r in records]
    features = datasets.Features({
        "id": datasets.Value("string"), "score": datasets.Value("float64"), "rank": datasets.Value("int64"),
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "source": datasets.Value("string"), "original": datasets.Value("string"), "task": datasets.Value("string"),
    })
    rows = [{"task": None, **row} for row in rows]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder))


def ranking_belongs(run: Run, summary: dict, table: pd.DataFrame | None = None) -> bool:
    """Whether a ranking (its ``summary.json``) is this run's: its run id; for a ranking made before ids, its pool's
    fingerprint; older still, that every id it ranks is in the run's pool (``table``, when given)."""
    if summary.get("run_id") is not None and run.run_id is not None:
        return summary["run_id"] == run.run_id
    if summary.get("pool_sha256") is not None:
        return summary["pool_sha256"] == run.pool_sha256
    return table is None or set(table["id"].astype(str)) <= {e.id for e in run.pool()}


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
    return {e.id: e for e in Run(run_dir).pool()}


def ranking_folders(run_dir: str | Path) -> list[Path]:
    """The run's rankings: ``rank-*`` folders and ``compare-<target>/<method>`` ones, each with its ``summary.json`` and
    ``scores.parquet``."""
    run = Path(run_dir)
    folders = [*sorted(run.glob("rank-*")), *sorted(run.glob("compare-*/*"))]
    return [f for f in folders if (f / "summary.json").is_file() and (f / "scores.parquet").is_file()]


def main_ranking(run_dir: str | Path, folders: list[Path] | None = None) -> Path | None:
    """The ranking a report or notebook leads with, among ``folders`` (default: :func:`ranking_folders`): the only
    one; else the latest LESS ranking (the method the toolkit is built around); else the latest written. None when
    there is none."""
    folders = ranking_folders(run_dir) if folders is None else folders

    def written(folder: Path) -> tuple[float, str]:  # ties (same mtime) go to the later name, rank-* before compare-*
        return (folder / "summary.json").stat().st_mtime, folder.name

    def method(folder: Path) -> str | None:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("method")

    less = [f for f in folders if method(f) == "less"]
    return max(less or folders, key=written) if folders else None


def open_ranking(run_dir: str | Path, ranking: str | Path | None = None) -> tuple[Path, pd.DataFrame, dict]:
    """(folder, table, summary) of ``ranking`` (default: :func:`main_ranking`), refused with what to do when the run
    has none, when it is not a ranking, or when it ranks another run's pool (its scores would sit beside other
    examples' texts)."""
    run = Run(run_dir)
    if ranking is None:
        ranking = main_ranking(run.path)
        if ranking is None:
            raise InfluenceError(f"{run.path} has no ranking yet: make one with `influence rank --run {run.path} "
                                 "--target mmlu_val` (LESS; `influence methods --run RUN` lists the other methods)")
    ranking = Path(ranking)
    if not (ranking / "summary.json").is_file():
        raise InfluenceError(f"{ranking}: not a folder written by `influence rank` (no summary.json)")
    summary = json.loads((ranking / "summary.json").read_text(encoding="utf-8"))
    table = load_rankings(ranking)
    if not ranking_belongs(run, summary, table):
        raise InfluenceError(f"{ranking}: a ranking of another run or pool (run id {summary.get('run_id')}), not of "
                             f"{run.path} (id {run.run_id}): its scores would sit beside other examples' texts")
    return ranking, table, summary
