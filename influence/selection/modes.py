"""Selection modes: which rows of a ranking to keep (top, bottom, a middle band, a threshold), and what a user
should know about the result (degenerate rankings, short or tied selections)."""

from __future__ import annotations

import pandas as pd

from ..scoring import Scores


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

    The values are those of a checked :class:`~influence.selection.settings.RankSettings` (or the same fields of
    another command's settings): in range, with a threshold where the mode needs one.
    """
    scored = table[table["finite"]]
    if mode in ("top", "bottom"):
        count = top_k if top_k is not None else max(1, int(fraction * len(table)))
        return scored.head(count) if mode == "top" else scored.tail(count).iloc[::-1]
    if mode == "middle":
        lo, hi = scored["score"].quantile(list(band))
        return scored[(scored["score"] >= lo) & (scored["score"] <= hi)]
    keep = scored["score"] < threshold if mode == "below" else scored["score"] > threshold
    return scored[keep]
