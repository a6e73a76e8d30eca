"""RDS, representation-based data selection (LESS's RDS baseline; Zhang et al. 2018, Hanawa et al. 2021).

Each example is represented by the final layer's hidden state at its last token (as LESS's
``collect_reps`` takes it: ``hidden_states[-1]`` at the last non-padding position), computed with the
warm-up's last checkpoint (base model + adapter). Representations are stored like the gradients, in
the run's store (``reps/<dataset>/<checkpoint>``, resumable chunk by chunk, target stores keyed by
content), and compared like LESS compares gradients: cosine with every target example, mean over a
subtask's examples, max over subtasks.

Sign and scale: in [-1, 1]; higher = the example's representation is closer to the target's.
"""

from __future__ import annotations

import numpy as np
import torch

from ..gradients.representations import POOLING, representation_stores
from ..kernels.scoring import score_block, subtask_means
from ..train.run import Run
from .base import REPRESENTATIONS, TARGET, Method, Scores, Target


class Rds(Method):
    name = "rds"
    family = "baseline"
    summary = "RDS: cosine of last-token representations with the target's (LESS's representation baseline)"
    meaning = __doc__.split("\n\n", 1)[1].strip()
    needs = (TARGET, REPRESENTATIONS)

    def scores(self, run: Run, target: Target, options) -> Scores:
        checkpoint = run.checkpoints()[-1]
        pool, targets = representation_stores(run.path, target.name, target.task_list)
        names = sorted(set(targets.tasks.tolist()))
        task_index = torch.tensor([names.index(t) for t in targets.tasks.tolist()])
        means = subtask_means(torch.from_numpy(targets.array("reps")), task_index, len(names))[None]
        per_task, score = score_block(torch.from_numpy(pool.array("reps"))[None], means, torch.ones(1))
        finite = pool.array("finite")
        return Scores(
            method="rds",
            ids=pool.ids.tolist(),
            score=np.where(finite, score.double().numpy(), np.nan),
            description=self.meaning,
            per_task=per_task.numpy(),
            task_names=names,
            finite=finite,
            details={"target": target.name, "checkpoint": checkpoint.name, "pooling": POOLING,
                     "n_target_examples": targets.n_examples},
        )
