"""LESS influence (Xia et al., 2024): cosine similarity of Adam-preconditioned training gradients to
target gradients, at every warm-up checkpoint.

For training example ``x``, checkpoint ``c`` with normalised mean learning rate ``w_c``
(``w_c = lr_c / sum lr``) and target subtask ``s``, in the order of LESS's ``matching.py`` (the
weighted sum of the train x target cosine matrices first, then the mean over each subtask's
examples, then the max over subtasks)::

    task_score(x, s) = mean_{t in s} sum_c w_c cos(g_c(x), g_c(t))
    score(x)         = max_s task_score(x, s)

Sign and scale: cosines lie in [-1, 1] and the weights sum to 1, so scores lie in [-1, 1]. Positive
means a gradient step on ``x`` points the same way as one on the target (a first-order estimate
that training on ``x`` lowers the target loss): higher = more helpful, rank 1 = most helpful.

The maths is in :mod:`.core`, which imports no backend; the one-process stream (:mod:`.stream`) and Dask
(:mod:`.dask`) sit on top of it, and this module chooses between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ...config import setting
from ...core.naming import TRAIN
from ...gradients.store import check_compatible, find_target_dataset, open_checkpoint_stores, resolve_dim
from ...kernels.scoring import unit_rows
from ...train.run import Run
from .. import options as shared
from ..base import GRADIENTS, TARGET, Attribution, Method, Scores, Target, get_method
from ..products import pairwise_products
from .core import LessInputs, load_less_inputs
from .stream import per_task_stream, top_k_stream


@dataclass(kw_only=True)
class LessOptions(shared.Projected):
    dask: str | None = shared.dask()
    device: str | None = setting(None, "torch device of the scoring [default: cuda when available]", cli=False)
    backend: str | None = setting(None, "triton or torch [default: triton on CUDA]", cli=False)
    rows_per_block: int | None = setting(None, "pool rows scored at a time [default: a stored chunk]", min=1, cli=False)


def _inputs(run: Run, targets: list[Target], options: LessOptions) -> LessInputs:
    device = options.device
    if options.dask is not None:
        from ..dask import dask_device

        device = dask_device(device)
    tasks = targets[0].task_list  # rank gives every target the same --target-tasks
    return load_less_inputs(run, [t.name for t in targets], device, options.backend, options.proj_dim, tasks)


class Less(Method):
    name = "less"
    family = "influence"
    summary = "LESS: checkpoint-weighted cosine of Adam training gradients with the target's gradients"
    meaning = __doc__.strip().split("\n\n", 1)[1].split("\n\nThe maths")[0]
    needs = (TARGET, GRADIENTS)
    Options = LessOptions

    def scores(self, run: Run, target: Target, options: LessOptions) -> Scores:
        return self.scores_many(run, [target], options)[0]

    def scores_many(self, run: Run, targets: list[Target], options: LessOptions) -> list[Scores]:
        """LESS scores for several targets in one pass over the pool's stores (on Dask with ``dask``, a
        LocalCluster (``"local"``) or a scheduler's address: the same computation as Dask tasks, one block each)."""
        inputs = _inputs(run, targets, options)
        train = inputs.train
        if options.dask is not None:
            from .dask import less_per_task_on_dask

            per_task = less_per_task_on_dask(inputs, options.dask, options.rows_per_block)
        else:
            per_task = per_task_stream(inputs, options.rows_per_block)
        stored_finite = np.logical_and.reduce([s.array("finite") for s in train])
        zero = int((stored_finite & ~np.isfinite(per_task).all(axis=1)).sum())  # unscorable for a zero feature
        results = []
        for target in inputs.targets:
            columns = per_task[:, target.columns]
            score = columns.max(axis=1).astype(np.float64)  # NaN rows stay NaN
            results.append(Scores(
                method="less",
                ids=train[0].ids.tolist(),
                score=score,
                description=self.meaning,
                per_task=columns,
                task_names=target.task_names,
                finite=np.isfinite(score),
                details={
                    "target": target.target,
                    "target_store": target.dataset,
                    "checkpoints": [s.metadata["checkpoint"] for s in train],
                    "checkpoint_weights": inputs.weights.tolist(),
                    "projector": train[0].metadata["projector"],
                    "feature": train[0].metadata["feature"],
                    "n_target_examples": target.n_examples,
                    "zero_gradient_examples": zero,
                },
            ))
        return results

    def attribution(self, run: Run, target: Target, options: LessOptions) -> Attribution:
        """LESS's effect of each pool example on each target example, before any aggregation:
        ``sum_c w_c cos(g_c(x), g_c(t))`` (what ``less`` averages per subtask and maximises over)."""
        dim = resolve_dim(run, options.proj_dim)
        train = open_checkpoint_stores(run, TRAIN, dim)
        stores = open_checkpoint_stores(run, find_target_dataset(run.store_path, dim, target.name, target.task_list),
                                        dim)
        check_compatible(train, stores)
        lrs = np.array([s.metadata["checkpoint_mean_lr"] for s in train], dtype=np.float64)
        units = [unit_rows(torch.from_numpy(store.array("grads"))) for store in stores]
        matrix, _ = pairwise_products(train, units, lrs / lrs.sum(), normalize=True,
                                      rows_per_block=options.rows_per_block)
        return Attribution("less", train[0].ids.tolist(), stores[0].ids.tolist(), stores[0].tasks.tolist(), matrix,
                           "LESS per target example: sum over checkpoints of w_c cos(g_c(x), g_c(t)), in [-1, 1]; "
                           "higher = more helpful",
                           {"checkpoints": [s.metadata["checkpoint"] for s in train],
                            "checkpoint_weights": (lrs / lrs.sum()).tolist()})


def less_top_k(run: Run | str | Path, target: str, k: int, target_tasks: list[str] | None = None,
               **options) -> pd.DataFrame:
    """The ``k`` most helpful pool examples for ``target`` (columns rank, pool_index, id, score), found with a
    running top-k over the stream (with ``dask=``: a tree reduction of the blocks' top k): memory independent
    of the pool size. ``options``: those of :class:`LessOptions`."""
    run = run if isinstance(run, Run) else Run(run)
    settings = get_method("less").options(options)
    inputs = _inputs(run, [Target(target, tuple(target_tasks) if target_tasks else None)], settings)
    if settings.dask is not None:
        from .dask import less_top_k_on_dask

        top = less_top_k_on_dask(inputs, k, settings.dask, settings.rows_per_block)
    else:
        top = top_k_stream(inputs, k, settings.rows_per_block)
    indices = top.indices.numpy()
    ids = inputs.train[0].group["ids"].get_orthogonal_selection(indices) if len(indices) else []
    return pd.DataFrame({
        "rank": np.arange(1, len(indices) + 1),
        "pool_index": indices,
        "id": [str(i) for i in ids],
        "score": top.values.double().numpy(),
    })
