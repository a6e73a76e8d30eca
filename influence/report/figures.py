"""Figures of a run and its rankings, shared by the notebook and ``influence report`` (a self-contained
HTML page: figures embedded as PNG, no network needed to view it).

Each figure function takes what the run wrote (a ranking table and its ``summary.json``, the warm-up's
dynamics) and returns a matplotlib figure, titled with the method and target, whose axes say what a
higher score means for that method. Figures use matplotlib's constrained layout and wrap their long labels,
so no label is cut at the figure's edge.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InfluenceError


def _pyplot():
    try:  # the backend stays the caller's (inline in a notebook; Agg without a display)
        import matplotlib.pyplot as plt
    except ImportError:
        raise InfluenceError("figures need matplotlib: pip install 'influence[notebooks]'") from None
    return plt


def title_of(summary: dict) -> str:
    """``<method> for <target> (<mode>, n selected)``."""
    target = summary.get("target_name") or summary.get("target")
    return (f"{summary['method']}" + (f" for {target}" if target else "")
            + f" ({summary['selection']['mode']}, {summary['n_selected']} selected)")


def higher_means(summary: dict) -> str:
    """What a higher score means, from the method's own description (e.g. 'higher = harder')."""
    found = re.search(r"higher = [^.;)]*", plain_text(summary.get("score_meaning", "")))
    return " ".join(found.group(0).split()) if found else "higher = ranked first"


# reST inline markup: ``code``, :role:`name` (or :role:`~a.name`), `name`
INLINE_MARKUP = re.compile(r"``(.+?)``|:[\w:.-]+:`~?(.+?)`|`([^`]+)`", re.DOTALL)


def plain_text(text: str) -> str:
    """A docstring's reST as plain text, for figure labels: ``x``, :func:`x` and `x` as x, a literal block's
    ``::`` marker as ``:`` (or dropped after a space), as Sphinx shows them."""
    text = INLINE_MARKUP.sub(lambda m: next(g for g in m.groups() if g is not None), text)
    return re.sub(r"(\s*)::(?=\s|$)", lambda m: "" if m.group(1) else ":", text)


def wrapped(label: str, width: int) -> str:
    """``label`` broken into lines of at most ``width`` characters: an axis label longer than its axis would
    otherwise run past the figure's edge and be cut."""
    return "\n".join(textwrap.wrap(label, width)) or label


def main_ranking(run_dir: str | Path, rankings: dict[str, tuple[pd.DataFrame, dict]]) -> str | None:
    """The name (folder relative to the run) of the ranking a report leads with, among ``rankings``: the rule of
    :func:`~influence.selection.outputs.main_ranking`. None without rankings."""
    from ..selection.outputs import main_ranking as choose

    found = choose(run_dir, [Path(run_dir) / name for name in rankings])
    return None if found is None else found.relative_to(run_dir).as_posix()


def selection_edges(selected: pd.DataFrame, summary: dict) -> list[tuple[float, str | None]]:
    """Where the selection's bounds lie on the score axis, for every ``--select`` mode."""
    mode = summary["selection"]["mode"]
    if selected.empty:
        return []
    if mode == "top":
        return [(float(selected["score"].min()), "lowest selected")]
    if mode == "bottom":
        return [(float(selected["score"].max()), "highest selected")]
    if mode == "middle":
        return [(float(selected["score"].min()), "selected band"), (float(selected["score"].max()), None)]
    return [(float(summary["selection"]["threshold"]), f"threshold (keep {mode})")]


def selected_rows(table: pd.DataFrame, summary: dict) -> pd.DataFrame:
    return table[table["id"].isin(summary["selected_ids"])]


def score_distribution(table: pd.DataFrame, summary: dict):
    """Histogram of the scores with the selection's bounds."""
    plt = _pyplot()
    selected = selected_rows(table, summary)
    fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
    ax.hist(table.loc[table["finite"], "score"], bins=40, color="tab:blue", alpha=0.8)
    edges = selection_edges(selected, summary)
    for value, label in edges:
        ax.axvline(value, ls="--", color="k", label=label)
    ax.set_xlabel(wrapped(f"{summary['method']} score ({higher_means(summary)})", 90))
    ax.set_ylabel("examples")
    ax.set_title(wrapped(title_of(summary), 80))
    if edges:
        ax.legend()
    return fig


def score_vs_length(table: pd.DataFrame, summary: dict):
    """Score against response length, with the Spearman correlation ``rank`` reported."""
    plt = _pyplot()
    scored = table[table["finite"]]
    rho = summary["length_bias"]["spearman_score_vs_length"]
    fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
    ax.scatter(scored["response_chars"].clip(lower=1), scored["score"], s=8, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("response length (characters)")
    ax.set_ylabel(wrapped(f"score ({higher_means(summary)})", 30))
    ax.set_title(wrapped(f"{title_of(summary)}: Spearman {rho:+.2f}" if rho is not None else title_of(summary), 80))
    return fig


def subtask_coverage(table: pd.DataFrame, summary: dict) -> pd.DataFrame | None:
    """Per target subtask: how many selected examples have it as their best subtask, against the pool.
    A subtask with none is starved by the max over subtasks (``--diversify quota`` fixes that)."""
    columns = [c for c in table.columns if c.startswith("task:")]
    if not columns:
        return None
    scored = table[table["finite"]]
    best = scored[columns].to_numpy().argmax(axis=1)
    names = [c[5:] for c in columns]
    chosen = scored["id"].isin(summary["selected_ids"]).to_numpy()
    counts = pd.DataFrame({"subtask": names,
                           "selected": np.bincount(best[chosen], minlength=len(names)),
                           "pool": np.bincount(best, minlength=len(names))})
    return counts


def subtask_coverage_figure(table: pd.DataFrame, summary: dict):
    plt = _pyplot()
    counts = subtask_coverage(table, summary)
    if counts is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 2.5 + 0.18 * len(counts)), layout="constrained")
    starved = counts["selected"] == 0
    ax.barh(counts["subtask"], counts["selected"], color=np.where(starved, "tab:red", "tab:blue"))
    ax.set_xlabel("selected examples whose best subtask this is")
    ax.set_title(wrapped(f"{title_of(summary)}: {int(starved.sum())} of {len(counts)} subtasks get none", 90))
    ax.tick_params(axis="y", labelsize=7 if len(counts) > 20 else 9)
    return fig


def subtask_similarity_figure(table: pd.DataFrame, summary: dict):
    """Correlation of the per-subtask scores across the pool, subtasks ordered by hierarchical
    clustering (so 57 MMLU subjects show their groups), with a labelled colour bar."""
    columns = [c for c in table.columns if c.startswith("task:")]
    if len(columns) < 2:
        return None
    from scipy.cluster.hierarchy import leaves_list, linkage

    plt = _pyplot()
    values = table.loc[table["finite"], columns].to_numpy(dtype=np.float64)
    corr = np.nan_to_num(np.corrcoef(values.T), nan=0.0)
    order = leaves_list(linkage(values.T, method="average", metric="correlation")) \
        if np.isfinite(values).all() and values.std(axis=0).min() > 0 else np.arange(len(columns))
    names = [columns[i][5:] for i in order]
    size = min(12, 4.5 + 0.18 * len(columns))
    fig, ax = plt.subplots(figsize=(size + 1.5, size), layout="constrained")
    image = ax.imshow(corr[np.ix_(order, order)], vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6 if len(names) > 20 else 8)
    ax.set_yticks(range(len(names)), names, fontsize=6 if len(names) > 20 else 8)
    fig.colorbar(image, ax=ax, label="correlation over the pool")
    ax.set_title(f"{summary['method']}: subtasks, clustered")
    return fig


def warmup_curves(run_dir: str | Path):
    """Mean training loss and response-token accuracy per optimizer step of the warm-up."""
    plt = _pyplot()
    path = Path(run_dir) / "dynamics.parquet"
    if not path.is_file():
        return None
    dynamics = pd.read_parquet(path)
    train = dynamics[dynamics["phase"] == "train"].groupby("step")[["loss", "token_accuracy"]].mean()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2), layout="constrained")
    left.plot(train.index, train["loss"], marker=".")
    left.set_xlabel("optimizer step")
    left.set_ylabel("mean training loss (nats/token)")
    right.plot(train.index, train["token_accuracy"], marker=".", color="tab:green")
    right.set_xlabel("optimizer step")
    right.set_ylabel("response-token accuracy")
    fig.suptitle("warm-up")
    return fig


def run_rankings(run_dir: str | Path) -> dict[str, tuple[pd.DataFrame, dict]]:
    """Every ranking written in the run (``rank-*`` folders, and ``compare-<target>/<method>``): its folder relative to
    the run -> (table, summary)."""
    from ..selection.outputs import load_rankings, ranking_folders

    return {folder.relative_to(run_dir).as_posix(): (load_rankings(folder),
                                                    json.loads((folder / "summary.json").read_text(encoding="utf-8")))
            for folder in ranking_folders(run_dir)}


def method_agreement(rankings: dict[str, tuple[pd.DataFrame, dict]],
                     fraction: float | None = None) -> pd.DataFrame | None:
    """Top overlap between every pair of ``rankings`` (rows: whose top is looked for; columns: in whose
    top), at ``fraction`` (default: the first ranking's selected share)."""
    from ..selection.compare import overlap

    if len(rankings) < 2:
        return None
    names = list(rankings)
    first = rankings[names[0]][1]
    share = fraction or first["n_selected"] / max(1, first["n_pool"])
    return pd.DataFrame([[overlap(rankings[a][0], rankings[b][0], share) for b in names] for a in names],
                        index=names, columns=names)


def agreement_figure(run_dir: str | Path, rankings: dict[str, tuple[pd.DataFrame, dict]] | None = None):
    """Heat map of :func:`method_agreement` over the run's rankings."""
    plt = _pyplot()
    table = method_agreement(rankings if rankings is not None else run_rankings(run_dir))
    if table is None:
        return None
    fig, ax = plt.subplots(figsize=(3 + 0.7 * len(table), 2 + 0.6 * len(table)), layout="constrained")
    image = ax.imshow(table.to_numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(table)), table.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(table)), table.index, fontsize=8)
    for i in range(len(table)):
        for j in range(len(table)):
            ax.text(j, i, f"{table.iat[i, j]:.2f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax, label=wrapped("share of the column's top also in the row's top", 12 + 6 * len(table)))
    ax.set_title("agreement between the run's rankings")
    return fig


def checkpoint_agreement(run_dir: str | Path, target: str, proj_dim: int | None = None) -> pd.DataFrame | None:
    """Spearman correlation between the LESS scores each warm-up checkpoint alone gives the pool (LESS
    sums them weighted by learning rate: checkpoints that disagree make the sum depend on the weights)."""
    from ..scoring.less.core import iter_scored_blocks, load_less_inputs

    inputs = load_less_inputs(run_dir, target, "cpu", "torch", proj_dim)
    if len(inputs.train) < 2:
        return None
    columns = {}
    for c, store in enumerate(inputs.train):
        score = np.full(store.n_examples, np.nan)
        for start, _, block in iter_scored_blocks([store], inputs.means[c : c + 1], [1.0]):
            score[start : start + len(block)] = block.numpy()
        columns[store.metadata["checkpoint"]] = score
    return pd.DataFrame(columns).corr(method="spearman")
