"""Per-example diversity indicators (target-free): lexical ones on the response text, geometric ones in a
space of the run (``space``: ``grads``, ``grads:<checkpoint>``, ``reps``, ``embed:<model>``; see
:mod:`influence.gradients.spaces`).

=====================  ===========================================================  ==========================
method                 definition                                                    direction, scale
=====================  ===========================================================  ==========================
``ttr``                type-token ratio of the response (distinct words / words)     [0, 1]; higher = more varied
``mtld``               MTLD (McCarthy & Jarvis, 2010): mean length of word runs      > 0; higher = more varied
                       whose TTR stays above 0.72, forward and backward averaged
``distinct1``          distinct unigrams / unigrams of the response                  [0, 1]; higher = more varied
``distinct2``          distinct bigrams / bigrams of the response                    [0, 1]; higher = more varied
``knn_distance``       cosine distance to the k-th nearest other example             [0, 2]; higher = more isolated
                       (``neighbours``, default 5)                                   (rarer in the pool)
``prototypicality``    cosine distance to the example's k-means centroid             [0, 2]; higher = less typical
                       (``clusters``, default about sqrt(n / 2))                     of its cluster
``semdedup``           SemDeDup (Abbas et al., 2023): the largest cosine similarity  [-1, 1]; higher = more
                       to another member of its k-means cluster; column              redundant
                       ``duplicate`` flags those above ``1 - eps`` to an example
                       farther from the centroid (``--select below --threshold``
                       keeps the rest)
=====================  ===========================================================  ==========================

Words for the lexical indicators: lower-cased runs of letters and digits. Written by hand rather than
with ``lexicalrichness``: that package imports matplotlib and needs textblob (nltk) to install, for
four short formulas.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..gradients.geometry import centroid_distance, default_clusters, kmeans, knn_distance, semdedup
from ..gradients.spaces import load_space
from ..train.run import Run
from .base import Scores

WORD = re.compile(r"[^\W_]+", re.UNICODE)
MTLD_THRESHOLD = 0.72


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ttr(tokens: list[str]) -> float:
    return len(set(tokens)) / len(tokens) if tokens else float("nan")


def distinct_n(tokens: list[str], n: int) -> float:
    grams = list(zip(*(tokens[i:] for i in range(n))))
    return len(set(grams)) / len(grams) if grams else float("nan")


def _mtld_pass(tokens: list[str], threshold: float) -> float:
    factors, types, count = 0.0, set(), 0
    for token in tokens:
        types.add(token)
        count += 1
        if len(types) / count <= threshold:  # the run's TTR fell to the threshold: one full factor
            factors += 1
            types, count = set(), 0
    if count:  # the remainder counts as the part of a factor it covers
        factors += (1 - len(types) / count) / (1 - threshold)
    return len(tokens) / factors if factors else float(len(tokens))


def mtld(tokens: list[str], threshold: float = MTLD_THRESHOLD) -> float:
    """MTLD: the mean of the forward and backward passes' mean factor length."""
    if not tokens:
        return float("nan")
    return (_mtld_pass(tokens, threshold) + _mtld_pass(tokens[::-1], threshold)) / 2


LEXICAL = {
    "ttr": ("type-token ratio of the response, in [0, 1]; higher = more varied", ttr),
    "mtld": ("MTLD of the response (mean length of word runs with TTR above 0.72); higher = more varied", mtld),
    "distinct1": ("distinct unigrams / unigrams of the response, in [0, 1]; higher = more varied",
                  lambda tokens: distinct_n(tokens, 1)),
    "distinct2": ("distinct bigrams / bigrams of the response, in [0, 1]; higher = more varied",
                  lambda tokens: distinct_n(tokens, 2)),
}


def lexical_score(name: str):
    """A scoring method (run_dir, target) -> Scores for one lexical indicator."""
    meaning, function = LEXICAL[name]

    def score(run_dir: str | Path, target: str | None = None) -> Scores:
        pool = Run(run_dir).pool()
        responses = [" ".join(m["content"] for m in e.messages if m["role"] == "assistant") for e in pool]
        values = np.array([function(words(text)) for text in responses], dtype=np.float64)
        return Scores(name, [e.id for e in pool], values, meaning, finite=np.isfinite(values))

    score.__name__ = f"{name}_scores"
    return score


def knn_distance_scores(run_dir: str | Path, target: str | None = None, space: str = "grads",
                        neighbours: int = 5, proj_dim: int | None = None) -> Scores:
    loaded = load_space(run_dir, space, proj_dim)
    keep = np.flatnonzero(loaded.finite)
    values = np.full(len(loaded.ids), np.nan)
    values[keep] = knn_distance(loaded.vectors[keep], neighbours)
    return Scores("knn_distance", loaded.ids, values,
                  f"cosine distance to the {neighbours}-th nearest other example in {space}, in [0, 2]; "
                  "higher = more isolated", finite=np.isfinite(values),
                  details={"space": loaded.description, "neighbours": neighbours})


def _clustered(run_dir, space, clusters, proj_dim, seed):
    loaded = load_space(run_dir, space, proj_dim)
    keep = np.flatnonzero(loaded.finite)
    clusters = clusters or default_clusters(len(keep))
    labels, centroids = kmeans(loaded.vectors[keep], clusters, seed)
    return loaded, keep, labels, centroids


def prototypicality_scores(run_dir: str | Path, target: str | None = None, space: str = "grads",
                           clusters: int | None = None, proj_dim: int | None = None, seed: int = 0) -> Scores:
    loaded, keep, labels, centroids = _clustered(run_dir, space, clusters, proj_dim, seed)
    values = np.full(len(loaded.ids), np.nan)
    values[keep] = centroid_distance(loaded.vectors[keep], labels, centroids)
    cluster = np.full(len(loaded.ids), -1)
    cluster[keep] = labels
    return Scores("prototypicality", loaded.ids, values,
                  f"cosine distance to the example's k-means centroid in {space}, in [0, 2]; higher = less typical",
                  finite=np.isfinite(values), details={"space": loaded.description, "clusters": len(centroids)},
                  columns={"cluster": cluster})


def semdedup_scores(run_dir: str | Path, target: str | None = None, space: str = "grads",
                    clusters: int | None = None, eps: float = 0.05, proj_dim: int | None = None,
                    seed: int = 0) -> Scores:
    loaded, keep, labels, centroids = _clustered(run_dir, space, clusters, proj_dim, seed)
    flags, nearest = semdedup(loaded.vectors[keep], labels, centroids, eps)
    values = np.full(len(loaded.ids), np.nan)
    values[keep] = nearest
    duplicate = np.zeros(len(loaded.ids), dtype=bool)
    duplicate[keep] = flags
    return Scores("semdedup", loaded.ids, values,
                  f"largest cosine similarity to another member of the example's k-means cluster in {space}; "
                  f"higher = more redundant; 'duplicate' flags similarity above {1 - eps:g} to an example farther "
                  "from the centroid (SemDeDup removes those)",
                  finite=np.isfinite(values),
                  details={"space": loaded.description, "clusters": len(centroids), "eps": eps,
                           "duplicates": int(duplicate.sum())},
                  columns={"duplicate": duplicate})
