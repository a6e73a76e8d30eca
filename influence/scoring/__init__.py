"""Scoring methods. Each returns a :class:`Scores` for the run's pool; ``rank`` sorts by ``score``.

Convention for every method: higher score = ranked first (rank 1). Each method documents what its
score means, its sign and its scale in ``Scores.description``.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Scores
from .less import less_scores

METHODS: dict[str, Callable[..., Scores]] = {"less": less_scores}

__all__ = ["METHODS", "Scores", "less_scores"]
