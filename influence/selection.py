"""``rank``: score the pool, order it and write the ranking and the selected subset (LESS, step 3).

Outputs in ``out``:

* ``scores.csv``: ``id, source, score, rank, finite`` in rank order (rank 1 = highest score);
* ``scores.parquet``: the same plus one ``task:<name>`` column per target subtask where the method has
  a per-subtask breakdown;
* ``selected.jsonl``: the selected examples (by default the top ``fraction``; see :func:`select`), in
  rank order, one schema whatever the pool's formats: ``id``, ``score``, ``rank``, ``messages`` (so it
  can be trained on directly, ids kept), ``source`` and the ``original`` record;
* ``summary.json``: method, target, what the score means, how many examples, what was combined, and
  the length bias: the Spearman correlation of the score with the response length and the selected
  subset's length distribution against the pool's (LESS is known to favour short examples).

Several targets in one call (``rank(run, ["mmlu_val", "bbh"])``) write one folder per target; for
``less`` the pool's gradient stores are read once for all of them.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .data import Example
from .diversity import (
    DIVERSIFY,
    cluster_balanced,
    default_clusters,
    facility_location,
    k_center_greedy,
    kmeans,
    redundancy_filter,
    subset_diversity,
    subtask_quota,
)
from .errors import InfluenceError
from .run import Run
from .scoring import METHODS, TARGET_METHODS, Scores, less_scores_many
from .spaces import Space, load_space
from .store import writer_active
from .targets import check_target, target_name

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


SELECT_MODES = ("top", "bottom", "middle", "below", "above")


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


def degenerate_warnings(table: pd.DataFrame, scores: Scores) -> list[str]:
    """What makes a ranking meaningless: no scorable example, every score equal (the "top" is pool
    order), or examples whose gradient was exactly zero (no direction to compare; ranked last)."""
    warnings = []
    finite = table.loc[table["finite"], "score"]
    if finite.empty:
        warnings.append("no example could be scored")
    elif finite.nunique() == 1:
        warnings.append(f"every score equals {finite.iloc[0]:g}: the ranking carries no information and a top "
                        "selection is simply pool order (degenerate training, or a score that cannot separate these examples)")
    zero = scores.details.get("zero_gradient_examples", 0)
    if zero:
        warnings.append(f"{zero} example(s) have an all-zero gradient feature at some checkpoint: they cannot "
                        "be compared and are ranked last as unscorable")
    return warnings


def selection_notes(table: pd.DataFrame, selected: pd.DataFrame, mode: str, fraction: float,
                    top_k: int | None) -> list[str]:
    """What a user should know about a selection that is not what was asked, or not a clean cut:
    an empty selection, fewer examples than asked (unscorable ones are never selected), ties at the cut."""
    notes = []
    scored = table[table["finite"]]
    if selected.empty:
        notes.append(f"the selection is empty (--select {mode}: no scorable example qualifies)")
        return notes
    if mode in ("top", "bottom"):
        asked = top_k if top_k is not None else max(1, int(fraction * len(table)))
        if len(selected) < asked:
            notes.append(f"{asked} examples asked, {len(selected)} selected: only {len(scored)} of {len(table)} "
                         "could be scored")
        left = scored[~scored["id"].isin(selected["id"])]
        cut = selected["score"].min() if mode == "top" else selected["score"].max()
        tied = int((left["score"] == cut).sum())
        if tied:
            notes.append(f"{tied} example(s) left out have the same score as the last one selected ({cut:.6g}): "
                         "the cut between them follows rank order, which is pool order among equal scores")
    return notes


def select(
    table: pd.DataFrame,
    mode: str = "top",
    fraction: float = 0.05,
    band: tuple[float, float] = (0.25, 0.75),
    threshold: float | None = None,
    top_k: int | None = None,
) -> pd.DataFrame:
    """Rows of a ranking to keep, in rank order; unscorable examples are never selected.

    * ``top`` / ``bottom``: the highest / lowest ``top_k`` scores, or else ``floor(fraction x pool
      size)`` of them (at least one), as LESS's ``write_selected_data.py`` counts its ``--percentage``
      (``top_k`` is its ``--max_samples``);
    * ``middle``: scores between the ``band`` quantiles (perplexity-based pruning keeps the middle);
    * ``below`` / ``above``: scores strictly below / above ``threshold`` (e.g. IFD < 1).
    """
    scored = table[table["finite"]]
    if mode in ("top", "bottom"):
        if top_k is not None:
            if top_k < 1:
                raise ValueError(f"top_k must be at least 1, got {top_k}")
            count = top_k
        elif not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        else:
            count = max(1, int(fraction * len(table)))
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
    out: Path, table: pd.DataFrame, selected: pd.DataFrame, pool: list[Example], scores: Scores, selection: dict,
    warnings: list[str] | None = None, notes: list[str] | None = None, hf_dataset: bool = False,
    target: str | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table[["id", "source", "score", "rank", "finite"]].to_csv(out / "scores.csv", index=False)
    table.drop(columns=["pool_index"]).to_parquet(out / "scores.parquet", index=False)
    records = [selected_record(pool[int(index)], score, rank)
               for index, score, rank in zip(selected["pool_index"], selected["score"], selected["rank"])]
    with open(out / "selected.jsonl", "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    if hf_dataset:
        save_selection_dataset(records, out / "selected_dataset")
    summary = {
        "method": scores.method,
        "target_name": target_name(target) if target else None,
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
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))


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


@dataclass
class Diversify:
    """Diversity-aware selection of the top (see :mod:`influence.diversity`): ``algorithm`` one of
    kcenter, fl (with ``weight``, the diversity weight), filter (with ``min_distance``), clusters (with
    ``clusters`` and ``balance``), quota."""

    algorithm: str
    weight: float = 0.3
    min_distance: float = 0.1
    clusters: int | None = None
    balance: str = "proportional"

    def problems(self) -> list[str]:
        problems = []
        if self.algorithm not in DIVERSIFY:
            problems.append(f"--diversify must be one of {', '.join(DIVERSIFY)}, got {self.algorithm!r}")
        if not 0 <= self.weight <= 1:
            problems.append(f"--diversity-weight must be in [0, 1], got {self.weight}")
        if not 0 <= self.min_distance <= 2:
            problems.append(f"--min-distance must be a cosine distance in [0, 2], got {self.min_distance}")
        if self.clusters is not None and self.clusters < 1:
            problems.append(f"--clusters must be at least 1, got {self.clusters}")
        if self.balance not in ("proportional", "equal"):
            problems.append(f"--balance must be proportional or equal, got {self.balance!r}")
        return problems


def selection_space(run: Run, space: str | None, proj_dim: int | None) -> Space | None:
    """The space diversity is measured in: ``space``, or by default the run's gradient features when
    it has some (None when there is nothing to measure in, or ``space = "none"``)."""
    if space == "none":
        return None
    if space is None:
        try:
            return load_space(run.path, "grads", proj_dim)
        except InfluenceError:
            return None
    return load_space(run.path, space, proj_dim)


def diversify_selection(table: pd.DataFrame, scores: Scores, diversify: Diversify, space: Space | None,
                        budget: int, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """The ``budget`` rows a diversity-aware algorithm picks from the scorable ones of a ranking, in
    the order it picked them, and what it reports (objective, radius...)."""
    candidates = table[table["finite"]]
    if diversify.algorithm == "quota":
        if scores.per_task is None or len(scores.task_names) < 2:
            raise InfluenceError("--diversify quota needs a method with per-subtask scores and a target with subtasks")
        per_task = candidates[[TASK_PREFIX + name for name in scores.task_names]].to_numpy(dtype=np.float64)
        return candidates.iloc[subtask_quota(per_task, budget)], {"algorithm": "quota", "subtasks": scores.task_names}
    if space is None:
        raise InfluenceError(f"--diversify {diversify.algorithm} needs a space: the run has no gradient stores; "
                             "give --space reps or --space embed:<model>")
    candidates = candidates[space.finite[candidates["pool_index"].to_numpy()]]
    vectors = space.vectors[candidates["pool_index"].to_numpy()]
    details: dict = {"algorithm": diversify.algorithm, "space": space.name, "candidates": len(candidates)}
    if diversify.algorithm == "kcenter":
        picks, details["covering_radius"] = k_center_greedy(vectors, budget, first=0)
    elif diversify.algorithm == "fl":
        picks, details["objective"] = facility_location(vectors, candidates["score"].to_numpy(), budget,
                                                        diversify.weight, seed=seed)
        details["diversity_weight"] = diversify.weight
    elif diversify.algorithm == "filter":
        picks = redundancy_filter(vectors, np.arange(len(vectors)), budget, diversify.min_distance)
        details["min_distance"] = diversify.min_distance
        if len(picks) < budget:
            details["note"] = (f"only {len(picks)} examples are farther than {diversify.min_distance} from every other "
                               "kept one")
    else:
        clusters = diversify.clusters or default_clusters(len(vectors))
        labels, _ = kmeans(vectors, clusters, seed)
        picks = cluster_balanced(labels, np.arange(len(vectors)), budget, diversify.balance)
        details.update(clusters=clusters, balance=diversify.balance)
    return candidates.iloc[picks], details


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


def _pool_clusters(space: Space | None) -> np.ndarray | None:
    """k-means clusters of the pool's usable rows in ``space`` (for cluster coverage)."""
    if space is None or space.finite.sum() < 2:
        return None
    rows = np.flatnonzero(space.finite)
    return kmeans(space.vectors[rows], default_clusters(len(rows)))[0]


def _diversity(space: Space, labels: np.ndarray | None, selected: pd.DataFrame) -> dict | None:
    """Subset-level diversity of a selection against a random subset of its size and the pool."""
    if labels is None:
        return None
    rows = np.flatnonzero(space.finite)
    position = np.full(len(space.finite), -1)
    position[rows] = np.arange(len(rows))
    chosen = position[selected["pool_index"].to_numpy()]
    report = subset_diversity(space.vectors[rows], chosen[chosen >= 0], labels)
    return {"space": space.name, **report}


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
