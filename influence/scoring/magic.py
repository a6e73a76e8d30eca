"""MAGIC (Ilyas & Engstrom 2025): exact metagradients of the warm-up's training as attribution.

``influence metagrad`` differentiates a measurement of the target after training (``--measure``: its loss, its
margin over the choices or exp(-loss), an accuracy surrogate) with respect to the weight of every training example's
loss, through every AdamW step (:mod:`influence.train.replay`). The score is that derivative, signed so that higher is
better::

    magic(x, t) = - d loss_t(theta_T(w)) / d w_x   at w = 1   (+ d margin_t / d w_x, + d exp(-loss_t) / d w_x)

Sign and scale: higher = up-weighting x lowers the target's loss (raises its margin or probability) more (positive:
helpful, negative: harmful); in the measurement's unit per unit of weight, so that dropping a set S of examples makes
the target worse by about ``sum_{x in S} magic(x, t)``. In ``evaluate lds``, pair ``--measure margin`` with
``--outcome margin`` and ``--measure accuracy-surrogate`` with ``--outcome probability``. Exact for the model the
run trained (not an approximation of it), and local: it describes small changes of the weights, which is why its
single-model LDS (``evaluate lds --design drop``) is high at small drop fractions. Pool examples the warm-up did not
train on have no weight in that training: they are unscorable (NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import setting
from ..data.targets import load_target
from ..errors import InfluenceError
from ..models.measure import HIGHER_IS_BETTER
from ..train.metagrad import OUTCOME_OF_MEASURE, Measure, load_metagradients, metagrad_folder
from ..train.run import Run
from .base import TARGET, Attribution, Method, Need, Scores, Target

MEANING = __doc__.strip().split("Sign and scale: ")[1]


@dataclass(kw_only=True)
class MagicOptions:
    measure: Measure = setting("loss", "Which metagradients (influence metagrad --measure: loss, margin, "
                                       "accuracy-surrogate).")


def _tasks(target: Target) -> list[str] | None:
    return list(target.task_list) if target.task_list else None


def _command(run: Run, target: Target, options: MagicOptions, per_target: bool) -> str:
    tasks = f" --target-tasks {','.join(target.task_list)}" if target.task_list else ""
    return (f"influence metagrad --run {run.path} --target {target.name}{tasks}"
            + (f" --measure {options.measure}" if options.measure != "loss" else "")
            + (" --per-target-example" if per_target else ""))


@dataclass(frozen=True)
class NeedsMetagradients(Need):
    """The run's metagradients for the target (``influence metagrad``)."""

    def missing(self, run, target, options):
        if target is None:  # which target is not known yet: any metagradients of the run will do
            if any((run.path / "metagrad").glob("*/metagrad.npz")):
                return None
            return f"the metagradients: run `influence metagrad --run {run.path} --target TARGET` first"
        folder = metagrad_folder(run, target.name, _tasks(target), options.measure)
        if not (folder / "metagrad.npz").is_file():
            return f"the metagradients of the warm-up for this target: run `{_command(run, target, options, False)}` first"
        return None


class Magic(Method):
    name = "magic"
    family = "influence"
    summary = "MAGIC: exact metagradients of the target loss through every training step (Ilyas & Engstrom 2025)"
    meaning = MEANING
    needs = (TARGET, NeedsMetagradients("the metagradients", "influence metagrad"))
    Options = MagicOptions

    def _load(self, run: Run, target: Target, options: MagicOptions):
        found = load_metagradients(run, target.name, _tasks(target), options.measure)
        if found is None:
            raise InfluenceError(f"--method magic needs {NeedsMetagradients('', '').missing(run, target, options)}")
        return found

    def _on_pool(self, run: Run, training_ids: list[str], values: np.ndarray) -> np.ndarray:
        """Rows of ``values`` (training examples first) placed at the pool's examples; NaN for the others."""
        row = {i: n for n, i in enumerate(training_ids)}
        pool = [e.id for e in run.pool()]
        out = np.full((len(pool),) + values.shape[1:], np.nan)
        for n, i in enumerate(pool):
            if i in row:
                out[n] = values[row[i]]
        return out

    @staticmethod
    def _sign(options: MagicOptions) -> float:
        """+1 where a higher measurement is better (margin, accuracy-surrogate), -1 for the loss."""
        return 1.0 if HIGHER_IS_BETTER[OUTCOME_OF_MEASURE[options.measure]] else -1.0

    def scores(self, run: Run, target: Target, options: MagicOptions) -> Scores:
        found = self._load(run, target, options)
        score = self._on_pool(run, found.training_ids, self._sign(options) * found.mean)
        return Scores(self.name, [e.id for e in run.pool()], score, self.meaning, finite=np.isfinite(score),
                      details={"metagrad": found.meta.get("seconds"), "steps": found.meta.get("steps"), "measure": options.measure,
                               "replay_relative_difference": found.meta.get("replay_relative_difference")})

    def attribution_missing(self, run: Run, target: Target, options: MagicOptions) -> str | None:
        found = load_metagradients(run, target.name, _tasks(target), options.measure)
        if found is None or found.per_target is None:
            return ("the metagradients of every target example: run "
                    f"`{_command(run, target, options, True)}` first")
        return None

    def attribution(self, run: Run, target: Target, options: MagicOptions) -> Attribution:
        found = self._load(run, target, options)
        if found.per_target is None:
            raise InfluenceError(f"--method magic needs {self.attribution_missing(run, target, options)}")
        matrix = self._on_pool(run, found.training_ids, self._sign(options) * found.per_target.T)
        tasks = {e.id: e.task or "" for e in load_target(target.name, target.task_list)}
        return Attribution(self.name, [e.id for e in run.pool()], found.target_ids,
                           [tasks[i] for i in found.target_ids], matrix, self.meaning, found.meta)
