"""Evaluations that say whether a score can be trusted.

``evaluate_noisy``: corrupt a known fraction of a pool (swap responses between examples, optionally
truncate some), run the warm-up (evaluating the whole pool every epoch) and every target-free score,
and report how well each score finds the corrupted examples: ROC-AUC (score as detector, higher =
flagged; 0.5 = chance, below 0.5 = the low end flags noise) and the fraction of corrupted examples
found in the top and in the bottom 10% of scores.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import check, setting, settings_from
from ..core.storage import check_writable
from ..data.formats import Example, demo_pool_files, load_pool
from ..errors import InfluenceError
from ..gradients.collect import project_grads
from ..gradients.curvature import fit_curvature
from ..scoring.base import registry
from ..scoring.forward import compute_forward_scores
from ..train.run import Run
from ..train.subsets import train_subsets
from ..train.warmup import WarmupConfig, warmup


def corrupt_pool(
    pool: list[Example], fraction: float, seed: int, truncate: bool = False
) -> tuple[list[dict], pd.DataFrame]:
    """Records (``messages`` format) of a pool with ``fraction`` of its examples corrupted.

    Chosen examples get the last response of another chosen example (a cyclic shift, so every one
    changes); with ``truncate``, every second chosen example instead keeps only the first quarter of
    its own response. Returns the records and a table ``id, corrupted, kind``.
    """
    rng = np.random.default_rng(seed)
    n = len(pool)
    chosen = np.sort(rng.choice(n, size=max(2, round(fraction * n)), replace=False))
    responses = [[m for m in e.messages if m["role"] == "assistant"][-1]["content"] for e in pool]
    kinds = ["none"] * n
    new_response = list(responses)
    swap = chosen[1::2] if truncate else chosen
    for k, i in enumerate(swap):
        new_response[i] = responses[swap[(k + 1) % len(swap)]]
        kinds[i] = "swap"
    if truncate:
        for i in chosen[::2]:
            text = responses[i]
            new_response[i] = text[: max(1, len(text) // 4)]
            kinds[i] = "truncate"
    records = []
    for example, response in zip(pool, new_response):
        messages = [dict(m) for m in example.messages]
        last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
        messages[last]["content"] = response
        records.append({"messages": messages, "origin": example.id})
    labels = pd.DataFrame({"index": range(n), "origin": [e.id for e in pool],
                           "corrupted": [k != "none" for k in kinds], "kind": kinds})
    return records, labels


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection_table(scores: dict[str, np.ndarray], corrupted: np.ndarray, top: float = 0.1) -> pd.DataFrame:
    rows = []
    for method, values in scores.items():
        finite = np.isfinite(values)
        v, c = values[finite], corrupted[finite]
        k = max(1, int(round(top * len(v))))
        order = np.argsort(-v, kind="stable")
        rows.append({
            "method": method,
            "roc_auc": roc_auc(v, c),
            f"found_in_top_{int(top * 100)}%": float(c[order[:k]].sum() / max(1, c.sum())),
            f"found_in_bottom_{int(top * 100)}%": float(c[order[-k:]].sum() / max(1, c.sum())),
            "scored": int(finite.sum()),
        })
    return pd.DataFrame(rows).sort_values("roc_auc", ascending=False, key=lambda s: (s - 0.5).abs()).reset_index(drop=True)


@dataclass(kw_only=True)
class NoisySettings:
    """How ``evaluate noisy`` corrupts the pool and scores it (the warm-up's own settings are a WarmupConfig)."""

    noise: float = setting(0.2, "Fraction of the pool to corrupt.", min=0, max=1, min_open=True, max_open=True)
    truncate: bool = setting(False, "Corrupt half of the chosen examples by truncating responses.")
    proj_dim: int = setting(1024, "Projection dimension for the GraNd pass.", min=1)
    grad_batch_size: int = setting(8, "Batch size of the scoring passes.", min=1)
    subsets_k: int = setting(0, "Also train this many models on random halves of the noisy pool and score "
                                "memorization (0 = no; else at least 2).", min=0)

    def extra_problems(self) -> list[str]:
        if self.subsets_k == 1:
            return ["--subsets-k must be 0 (no memorization) or at least 2, got 1"]
        return []


def evaluate_noisy(config: WarmupConfig, settings: NoisySettings | None = None, progress: bool = True,
                   **values) -> pd.DataFrame:
    """Corrupt ``noise`` of the pool in ``config.train_files``, warm up on it, score it with every
    target-free method and write ``detection.csv`` and ``labels.csv`` into ``config.out``. With
    ``subsets_k``, also train that many models on random halves of the noisy pool (the warm-up's
    settings) and score Feldman & Zhang memorization. ``settings`` (a :class:`NoisySettings`) and ``values``
    (its fields by keyword) say how."""
    settings = settings_from(NoisySettings, settings, where="evaluate noisy", **values)
    check(config)
    out = Path(config.out)
    check_writable(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InfluenceError(f"{out}: exists and is not empty; evaluate noisy writes into a new or empty folder "
                             "(it never overwrites your files)")
    pool = load_pool(config.train_files or demo_pool_files(), config.columns)
    records, labels = corrupt_pool(pool, settings.noise, config.seed, settings.truncate)
    out.mkdir(parents=True, exist_ok=True)
    noisy_file = out / "noisy_pool.jsonl"
    noisy_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    labels.to_csv(out / "labels.csv", index=False)
    run_dir = out / "run"
    warmup(replace(config, train_files=[str(noisy_file)], out=str(run_dir), track_all=True), progress=progress)
    project_grads(run_dir, None, proj_dim=[settings.proj_dim], seed=config.seed, batch_size=settings.grad_batch_size,
                  progress=progress)
    compute_forward_scores(run_dir, batch_size=settings.grad_batch_size, progress=progress)
    fit_curvature(run_dir, batch_size=settings.grad_batch_size, progress=progress)  # EK-FAC self-influence
    if settings.subsets_k:
        train_subsets(run_dir, k=settings.subsets_k, alpha=0.5, progress=progress)
    run = Run(run_dir)
    scores, skipped = {}, []
    for name, method in registry().items():
        if method.needs_target:
            continue
        options = method.options()
        if any(need.missing(run, None, options) for need in method.needs if not need.made_on_demand):
            skipped.append(name)  # e.g. the plain gradients (gradmatch), a rating or reward model, subset models
            continue
        scores[name] = method.scores(run, None, options).score
    if skipped:
        print(f"evaluate noisy: not scored, a prerequisite it does not make is missing: {', '.join(skipped)}",
              file=sys.stderr)
    table = detection_table(scores, labels["corrupted"].to_numpy())
    table.to_csv(out / "detection.csv", index=False)
    return table
