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
from dataclasses import dataclass

import numpy as np

from ..config import setting
from ..gradients.geometry import centroid_distance, default_clusters, kmeans, knn_distance, semdedup
from ..gradients.spaces import Space, load_space
from ..train.run import Run
from . import options as shared
from .base import SPACE, Method, Scores, Target

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


class Lexical(Method):
    """A lexical indicator of the response text: ``indicator`` maps the response's words to a number."""

    family = "diversity"

    @staticmethod
    def indicator(tokens: list[str]) -> float:
        raise NotImplementedError

    def scores(self, run: Run, target: Target | None, options) -> Scores:
        pool = run.pool()
        responses = [" ".join(m["content"] for m in e.messages if m["role"] == "assistant") for e in pool]
        values = np.array([self.indicator(words(text)) for text in responses], dtype=np.float64)
        return Scores(self.name, [e.id for e in pool], values, self.meaning, finite=np.isfinite(values))


class Ttr(Lexical):
    name = "ttr"
    summary = "type-token ratio of the response"
    meaning = "type-token ratio of the response, in [0, 1]; higher = more varied"
    indicator = staticmethod(ttr)


class Mtld(Lexical):
    name = "mtld"
    summary = "MTLD (McCarthy & Jarvis, 2010) of the response"
    meaning = "MTLD of the response (mean length of word runs with TTR above 0.72); higher = more varied"
    indicator = staticmethod(mtld)


class Distinct1(Lexical):
    name = "distinct1"
    summary = "distinct unigrams over unigrams of the response"
    meaning = "distinct unigrams / unigrams of the response, in [0, 1]; higher = more varied"

    @staticmethod
    def indicator(tokens: list[str]) -> float:
        return distinct_n(tokens, 1)


class Distinct2(Lexical):
    name = "distinct2"
    summary = "distinct bigrams over bigrams of the response"
    meaning = "distinct bigrams / bigrams of the response, in [0, 1]; higher = more varied"

    @staticmethod
    def indicator(tokens: list[str]) -> float:
        return distinct_n(tokens, 2)


def _on_every_row(rows: int, keep: np.ndarray, values: np.ndarray, fill) -> np.ndarray:
    """``values`` computed on the rows ``keep`` (those with a finite vector), placed among all ``rows``; ``fill``
    elsewhere."""
    values = np.asarray(values)
    placed = np.full(rows, fill, dtype=np.result_type(values.dtype, np.asarray(fill).dtype))
    placed[keep] = values
    return placed


@dataclass(kw_only=True)
class KnnOptions(shared.Projected):
    space: str = shared.space()
    neighbours: int = setting(5, "Which nearest neighbour's distance.", min=1)


class KnnDistance(Method):
    name = "knn_distance"
    family = "diversity"
    summary = "cosine distance to the k-th nearest other example in a space"
    meaning = "cosine distance to the k-th nearest other example, in [0, 2]; higher = more isolated"
    needs = (SPACE,)
    Options = KnnOptions

    def scores(self, run: Run, target: Target | None, options: KnnOptions) -> Scores:
        loaded = load_space(run.path, options.space, options.proj_dim)
        keep = np.flatnonzero(loaded.finite)
        values = _on_every_row(len(loaded.ids), keep, knn_distance(loaded.vectors[keep], options.neighbours), np.nan)
        return Scores("knn_distance", loaded.ids, values,
                      f"cosine distance to the {options.neighbours}-th nearest other example in {options.space}, in "
                      "[0, 2]; higher = more isolated", finite=np.isfinite(values),
                      details={"space": loaded.description, "neighbours": options.neighbours})


@dataclass(kw_only=True)
class ClusterOptions(shared.Projected, shared.Seeded):
    space: str = shared.space()
    clusters: int | None = shared.clusters()


def _clustered(run: Run, options: ClusterOptions) -> tuple[Space, np.ndarray, np.ndarray, np.ndarray]:
    loaded = load_space(run.path, options.space, options.proj_dim)
    keep = np.flatnonzero(loaded.finite)
    labels, centroids = kmeans(loaded.vectors[keep], options.clusters or default_clusters(len(keep)), options.seed)
    return loaded, keep, labels, centroids


class Prototypicality(Method):
    name = "prototypicality"
    family = "diversity"
    summary = "cosine distance to the example's k-means centroid in a space"
    meaning = "cosine distance to the example's k-means centroid, in [0, 2]; higher = less typical"
    needs = (SPACE,)
    Options = ClusterOptions

    def scores(self, run: Run, target: Target | None, options: ClusterOptions) -> Scores:
        loaded, keep, labels, centroids = _clustered(run, options)
        values = _on_every_row(len(loaded.ids), keep, centroid_distance(loaded.vectors[keep], labels, centroids), np.nan)
        cluster = _on_every_row(len(loaded.ids), keep, labels, -1)
        return Scores("prototypicality", loaded.ids, values,
                      f"cosine distance to the example's k-means centroid in {options.space}, in [0, 2]; higher = less "
                      "typical", finite=np.isfinite(values),
                      details={"space": loaded.description, "clusters": len(centroids)}, columns={"cluster": cluster})


@dataclass(kw_only=True)
class SemDedupOptions(ClusterOptions):
    eps: float = setting(0.05, "Duplicates are more similar than 1 - eps.", min=0, max=1)


class SemDedup(Method):
    name = "semdedup"
    family = "diversity"
    summary = "SemDeDup (Abbas et al., 2023): the largest similarity to another member of the example's cluster"
    meaning = "largest cosine similarity to another member of the example's k-means cluster; higher = more redundant"
    needs = (SPACE,)
    Options = SemDedupOptions

    def scores(self, run: Run, target: Target | None, options: SemDedupOptions) -> Scores:
        loaded, keep, labels, centroids = _clustered(run, options)
        flags, nearest = semdedup(loaded.vectors[keep], labels, centroids, options.eps)
        values = _on_every_row(len(loaded.ids), keep, nearest, np.nan)
        duplicate = _on_every_row(len(loaded.ids), keep, flags, False)
        return Scores("semdedup", loaded.ids, values,
                      f"largest cosine similarity to another member of the example's k-means cluster in "
                      f"{options.space}; higher = more redundant; 'duplicate' flags similarity above "
                      f"{1 - options.eps:g} to an example farther from the centroid (SemDeDup removes those)",
                      finite=np.isfinite(values),
                      details={"space": loaded.description, "clusters": len(centroids), "eps": options.eps,
                               "duplicates": int(duplicate.sum())},
                      columns={"duplicate": duplicate})
