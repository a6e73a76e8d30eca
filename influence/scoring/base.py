"""What every scoring method returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Scores:
    """Scores of the pool, one per example, in pool order.

    ``score``: higher = ranked first. ``per_task``: optional (n, n_tasks) breakdown by target subtask.
    ``finite``: false where an example could not be scored (non-finite gradient); such examples are
    ranked last. ``details``: what was combined (checkpoints, weights, ...), written to summary.json.
    """

    method: str
    ids: list[str]
    score: np.ndarray
    description: str
    per_task: np.ndarray | None = None
    task_names: list[str] = field(default_factory=list)
    finite: np.ndarray | None = None
    details: dict = field(default_factory=dict)
    columns: dict[str, np.ndarray] = field(default_factory=dict)
