"""Scoring methods. Each returns a :class:`Scores` for the run's pool; ``rank`` sorts by ``score``.

Convention for every method: ``rank`` orders by score, highest first (rank 1); selection modes pick
the top, the bottom, a middle band or a threshold of that order. Each method documents what its
score means, its sign and its scale (``Scores.description``, written to ``summary.json``).

* ``less`` (needs a target): gradient cosine influence, higher = more helpful for the target;
* LESS's baselines: ``random``; ``bm25``, ``dsir`` (lexical, need a target); ``rds`` (last-token
  representation cosine, needs a target);
* ``grand``, ``forgetting``: training dynamics, higher = harder / more important;
* ``nll``, ``ppl``, ``nll_full``, ``el2n``, ``entropy``, ``least_confidence``, ``mean_margin``,
  ``min_margin``, ``ifd``: one forward pass per example per checkpoint (see ``forward``);
* ``trak``, ``tracin`` (need a target): gradient attribution on the stored projected gradients;
* ``memorization`` (target-free), ``fz_influence``, ``datamodel``, ``dsdm`` (need a target): the
  counterfactual engine's models trained on random subsets (see ``counterfactual``);
* ``ttr``, ``mtld``, ``distinct1``, ``distinct2``, ``knn_distance``, ``prototypicality``, ``semdedup``:
  diversity indicators (see ``diversity``).

Methods that estimate the effect of each pool example on each target example also provide it whole
(:data:`ATTRIBUTIONS`, an :class:`Attribution`), which the LDS check uses.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Attribution, Scores
from .baselines import bm25_scores, dsir_scores, random_scores
from .counterfactual import (
    datamodel_attribution,
    datamodel_scores,
    dsdm_scores,
    fz_influence_attribution,
    fz_influence_scores,
    memorization_scores,
)
from .diversity import LEXICAL, knn_distance_scores, lexical_score, prototypicality_scores, semdedup_scores
from .dynamics import forgetting_scores, grand_scores
from .forward import METRICS, forward_score
from .less.stream import less_attribution, less_scores, less_scores_many, less_top_k
from .rds import rds_scores
from .tracin import tracin_attribution, tracin_scores
from .trak import trak_attribution, trak_scores

METHODS: dict[str, Callable[..., Scores]] = {
    "less": less_scores,
    "random": random_scores,
    "bm25": bm25_scores,
    "dsir": dsir_scores,
    "rds": rds_scores,
    "grand": grand_scores,
    "forgetting": forgetting_scores,
    **{metric: forward_score(metric) for metric in METRICS},
    "trak": trak_scores,
    "tracin": tracin_scores,
    "memorization": memorization_scores,
    "fz_influence": fz_influence_scores,
    "datamodel": datamodel_scores,
    "dsdm": dsdm_scores,
    **{name: lexical_score(name) for name in LEXICAL},
    "knn_distance": knn_distance_scores,
    "prototypicality": prototypicality_scores,
    "semdedup": semdedup_scores,
}
SUBSET_METHODS = {"memorization", "fz_influence", "datamodel", "dsdm"}  # need `influence subsets train`
TARGET_METHODS = {"less", "bm25", "dsir", "rds", "trak", "tracin", "fz_influence", "datamodel", "dsdm"}
# Methods whose effect of every pool example on every target example is available whole.
ATTRIBUTIONS: dict[str, Callable[..., Attribution]] = {
    "less": less_attribution,
    "trak": trak_attribution,
    "tracin": tracin_attribution,
    "fz_influence": fz_influence_attribution,
    "datamodel": datamodel_attribution,
}

__all__ = ["METHODS", "TARGET_METHODS", "SUBSET_METHODS", "ATTRIBUTIONS", "Attribution", "Scores", "less_scores", "less_top_k",
           "less_scores_many", "grand_scores", "forgetting_scores"]
