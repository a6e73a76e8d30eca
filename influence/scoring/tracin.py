"""TracIn (Pruthi et al., 2020), in its checkpoint form TracInCP with random projections (TracInRP):
the learning-rate-weighted dot products of plain loss gradients over the warm-up's checkpoints,

    tracin(x, t) = sum_c lr_c <P g_c(x), P g_c(t)>

with ``lr_c`` the checkpoint epoch's mean learning rate (the step size between checkpoints) and ``P``
the run's projector (dot products preserved in expectation). Needs the pool's plain gradients:
``influence project-grads --train-gradient sgd`` (the target's are always stored).

Sign and scale: positive = a proponent (a gradient step on ``x`` lowers ``t``'s loss, to first
order), negative = an opponent; unbounded, in loss units x learning rate. ``rank`` averages over the
target's examples: higher = more helpful.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.naming import TRAIN, gradient_dataset
from ..gradients.store import check_compatible, find_target_dataset, open_checkpoint_stores, resolve_dim
from ..train.run import Run
from .base import PLAIN_GRADIENTS, TARGET, Attribution, Method, Scores, Target, subtask_scores
from .options import Projected
from .products import folded_products, pairwise_products


class TracIn(Method):
    name = "tracin"
    family = "influence"
    summary = "TracInCP: learning-rate-weighted dot products of plain loss gradients over the checkpoints"
    meaning = __doc__.strip().split("\n\n", 1)[1]
    needs = (TARGET, PLAIN_GRADIENTS)
    Options = Projected

    def _inputs(self, run: Run, target: Target, options: Projected):
        dim = resolve_dim(run, options.proj_dim)
        train = open_checkpoint_stores(run, gradient_dataset(TRAIN, "sgd"), dim)
        targets = open_checkpoint_stores(run, find_target_dataset(run.store_path, dim, target.name, target.task_list),
                                         dim)
        check_compatible(train, targets, "sgd", "sgd")
        lrs = np.array([s.metadata["checkpoint_mean_lr"] for s in train], dtype=np.float64)
        grads = [torch.from_numpy(store.array("grads")).float() for store in targets]
        details = {"checkpoints": [s.metadata["checkpoint"] for s in train], "learning_rates": lrs.tolist(),
                   "projector": train[0].metadata["projector"]}
        return train, targets, lrs, grads, details

    def attribution(self, run: Run, target: Target, options: Projected,
                    rows_per_block: int | None = None) -> Attribution:
        """TracInCP of every pool example on every target example (see the module docstring)."""
        train, targets, lrs, grads, details = self._inputs(run, target, options)
        matrix, _ = pairwise_products(train, grads, lrs, rows_per_block=rows_per_block)
        return Attribution("tracin", train[0].ids.tolist(), targets[0].ids.tolist(), targets[0].tasks.tolist(), matrix,
                           self.meaning, details)

    def scores(self, run: Run, target: Target, options: Projected) -> Scores:
        """The mean over the target's examples, with each subtask's gradients folded into their mean first (the
        dot products are linear in the target's gradient): one product per subtask, not per target example."""
        train, targets, lrs, grads, details = self._inputs(run, target, options)
        per_task, names, counts = folded_products(train, grads, lrs, targets[0].tasks.tolist())
        return subtask_scores("tracin", train[0].ids.tolist(), per_task, names, counts, self.meaning, details)
