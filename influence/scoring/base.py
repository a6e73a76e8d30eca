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


@dataclass
class Attribution:
    """Effects of each pool example on each target example, ``matrix`` (n_pool, n_target): higher =
    including the pool example helps that target example more (its loss lower, its margin higher).

    The methods that estimate such pairwise effects (LESS's cosines, TRAK, TracIn, datamodels, the
    Feldman & Zhang influence estimate) return one; ``rank`` uses :meth:`scores` (the mean effect over
    the target's examples: a linear estimate of the change of the target's mean outcome), and the LDS
    check predicts a subset's effect on each target example as the sum of its members' rows.
    """

    method: str
    pool_ids: list[str]
    target_ids: list[str]
    target_tasks: list[str]
    matrix: np.ndarray
    description: str
    details: dict = field(default_factory=dict)
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def scores(self) -> Scores:
        """Mean over the target's examples (and per subtask, the ``task:`` columns); an example with
        any non-finite effect is unscorable."""
        tasks = np.asarray(self.target_tasks)
        names = sorted(set(self.target_tasks))
        per_task = np.stack([self.matrix[:, tasks == name].mean(axis=1) for name in names], axis=1)
        score = self.matrix.mean(axis=1)
        return Scores(self.method, list(self.pool_ids), score, self.description, per_task.astype(np.float32), names,
                      np.isfinite(score), {**self.details, "aggregation": "mean over the target's examples"},
                      dict(self.columns))
