"""Selection by metagradient descent (MGD; Engstrom et al. 2025, "Optimizing ML Training with Metagradient Descent").

A selection ``S`` of ``--budget`` of the pool is improved step by step. Each step trains a model on ``S`` with the
run's training settings (a new data-order seed per step, as the reference reshuffles), and takes the metagradient of
the target's mean loss (the examples of the target's fit split) with respect to adding each pool example once, at the
step ``--truncate`` steps before the end, with the backward pass truncated there: the reference's "plus-epsilon"
metagradient, which gives every candidate a signal, selected or not::

    g_x = d loss_fit(theta_T) / d eps_x = (adjoint of the summed gradient at step k) . grad loss_x(theta_k) / B

(``B``: examples per optimizer step, the weight an example of average length has in a step's loss; under
``loss_weighting = "token"`` a long candidate would weigh more, which this convention leaves out; ``grad loss_x . v``
by forward-mode differentiation). Then a sign step that keeps
the budget (the reference's ``greedy_flip`` flips the counts of the top-|g| coordinates by one; with a budget, the
flip is a swap): the ``m`` selected examples with the largest ``g`` (adding more of them would raise the loss) leave,
the ``m`` unselected ones with the smallest ``g`` join, where the joining one's ``g`` is below the leaving one's; ``m``
falls linearly from ``--flip-start`` to ``--flip-end`` of the budget. A last model is trained on the last selection;
the selection whose model has the lowest loss on the target's held-out split (``--holdout``, never differentiated)
is the result. Each trained model is a unit of work saved in ``RUN/mgd/``: an interrupted run resumes at the next one.

Sign and scale: higher = selected (1 + h for the chosen selection's examples, h for the others), with h in [0, 1)
the rank of minus the last metagradient (higher = adding the example lowers the target's loss more); ``rank
--fraction`` equal to ``--budget`` returns exactly the selection.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from .. import __version__
from ..config import setting
from ..data.formats import examples_sha256
from ..data.targets import load_target, target_name
from ..data.templates import encode_example
from ..errors import InfluenceError
from ..models.loading import add_lora, parse_device, place
from ..models.losses import forward_response
from ..progress import progress_bar
from ..train.loop import LoraTrainer
from ..train.replay import Replay, _Bound, batches_of, loss_directional_derivatives, measurement_gradient
from ..train.run import Run, atomic_write, save_npz
from ..train.subsets import train_settings
from .base import TARGET, Method, Scores, Target
from .options import Seeded
from .options import budget as shared_budget

MEANING = __doc__.strip().split("Sign and scale: ")[1]


@dataclass(kw_only=True)
class MgdOptions(Seeded):
    """Metagradient descent's budget, steps and step sizes (``seed``: of the first selection, the target's split and,
    added to the run's, each step's data order)."""

    budget: float = shared_budget()
    steps: int = setting(4, "Metagradient steps (each trains a model on the selection; one more model is trained "
                            "on the last selection).", min=1)
    flip_start: float = setting(0.2, "Fraction of the budget swapped at the first step.", min=0, max=1, min_open=True)
    flip_end: float = setting(0.05, "Fraction of the budget swapped at the last step.", min=0, max=1)
    truncate: int = setting(2, "Optimizer steps before the end where candidates enter and the backward pass stops.",
                            min=1)
    holdout: float = setting(0.5, "Fraction of the target's examples held out to choose the best selection.", min=0,
                             max=1, min_open=True, max_open=True)


class Mgd(Method):
    name = "mgd"
    family = "influence"
    summary = ("MGD: selection by metagradient descent on the target loss, retraining at every step (Engstrom et al. "
               "2025)")
    meaning = MEANING
    needs = (TARGET,)
    Options = MgdOptions

    def scores(self, run: Run, target: Target, options: MgdOptions) -> Scores:
        return MetagradientDescent(run, target, options).select()


class MetagradientDescent:
    """One MGD selection for a run and target (see the module docstring)."""

    def __init__(self, run: Run, target: Target, options: MgdOptions, progress: bool = True):
        run.check_data_unchanged()
        self.run, self.target, self.options, self.progress = run, target, options, progress
        self.pool = run.pool()
        examples = load_target(target.name, target.task_list)
        if len(examples) < 2:
            raise InfluenceError(f"--method mgd splits the target into fit and held-out examples: {target.name} has "
                                 f"{len(examples)}")
        order = np.random.default_rng([options.seed, 7]).permutation(len(examples))
        n_holdout = min(max(1, int(round(options.holdout * len(examples)))), len(examples) - 1)
        self.holdout = [examples[i] for i in sorted(order[:n_holdout])]
        self.fit = [examples[i] for i in sorted(order[n_holdout:])]
        self.size = max(1, int(options.budget * len(self.pool)))  # as rank counts --fraction
        if self.size >= len(self.pool):
            raise InfluenceError(f"--budget {options.budget:g} selects the whole pool of {len(self.pool)}")
        self.settings = train_settings(run)
        key = json.dumps({"run_id": run.run_id, "pool": run.pool_sha256, "target": examples_sha256(examples),
                          "options": asdict(options), "settings": asdict(self.settings),
                          "influence_version": __version__}, sort_keys=True, default=str)
        self.folder = run.path / "mgd" / f"{target_name(target.name)}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        self.key = key

    def cost(self) -> str:
        """The work, and its time at the warm-up's measured pace per example pass (a forward-mode pass over an
        example costs about what a training pass does: measured on SmolLM2, 150 s per model for 19 of 194)."""
        n_train = len(self.run.manifest["warmup_ids"])
        seconds, epochs = self.run.manifest.get("wall_seconds"), int(self.settings.epochs)
        pace = seconds / max(n_train * epochs, 1) if seconds else None
        per_model = pace * (self.size * epochs + len(self.pool)) if pace else None
        return (f"mgd: {self.options.steps} steps on a selection of {self.size} of {len(self.pool)} examples: "
                f"{self.options.steps + 1} models trained, each followed by a backward pass through its last "
                f"{self.options.truncate} steps and a forward-mode pass over the pool"
                + (f"; ~{per_model:.0f} s per model at the warm-up's pace, "
                   f"~{(self.options.steps + 1) * per_model / 60:.1f} min in all" if per_model else ""))

    def select(self) -> Scores:
        print(self.cost(), file=sys.stderr, flush=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "key.json").write_text(self.key)
        device = parse_device(None)
        base, tokenizer, _ = self.run.load_base_model(device)
        self.tokenizer, self.device, self.base = tokenizer, device, base
        encode = lambda examples: [encode_example(e, tokenizer, self.settings.max_length) for e in examples]  # noqa: E731
        self.pool_encoded, fit, holdout = encode(self.pool), encode(self.fit), encode(self.holdout)
        self.fit_batches = batches_of(fit, tokenizer.pad_token_id)
        self.holdout_batches = batches_of(holdout, tokenizer.pad_token_id)
        selected = np.zeros(len(self.pool), dtype=bool)
        selected[np.random.default_rng([self.options.seed, 11]).choice(len(self.pool), self.size, replace=False)] = True
        history = []
        bar = progress_bar(total=self.options.steps + 1, desc="mgd", unit="model", disable=not self.progress)
        for step in range(self.options.steps + 1):
            unit = self._unit(step, selected)
            history.append(unit)
            bar.update(1)
            bar.set_postfix(holdout=f"{unit['holdout_loss']:.4f}")
            if step < self.options.steps:
                selected = self._swap(selected, unit["metagradient"], step)
        bar.close()
        best = min(range(len(history)), key=lambda s: (history[s]["holdout_loss"], s))
        # the best step's metagradient orders the examples within and outside the selection (the last model has none)
        gradient = history[best]["metagradient"] if history[best]["metagradient"] is not None else \
            history[best - 1]["metagradient"]
        score = history[best]["selected"].astype(np.float64) + (rankdata(-gradient) - 1) / len(gradient)
        swapped = [int((a["selected"] != b["selected"]).sum() // 2) for a, b in zip(history, history[1:])] + [0]
        table = pd.DataFrame([{"step": s, "fit_loss": u["fit_loss"], "holdout_loss": u["holdout_loss"],
                               "swapped_after": swapped[s], "seconds": u["seconds"]} for s, u in enumerate(history)])
        return Scores("mgd", [e.id for e in self.pool], score, MEANING, tables={"iterations": table},
                      details={"best_step": best, "budget": self.size, "folder": str(self.folder),
                               "holdout_losses": table["holdout_loss"].tolist(), "n_fit": len(self.fit),
                               "n_holdout": len(self.holdout)})

    def _unit(self, step: int, selected: np.ndarray) -> dict:
        """Step ``step``'s model on ``selected``: trained (or read back), with its losses and metagradient."""
        path = self.folder / f"step-{step:03d}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as saved:
                if np.array_equal(saved["selected"], selected):
                    gradient = saved["metagradient"]
                    return {"selected": selected, "metagradient": gradient if gradient.size else None,
                            "fit_loss": float(saved["fit_loss"]), "holdout_loss": float(saved["holdout_loss"]),
                            "seconds": float(saved["seconds"])}
        started = time.time()
        members = np.flatnonzero(selected)
        settings = replace(self.settings, seed=self.settings.seed + step)
        model, device = place(add_lora(copy.deepcopy(self.base), settings.lora, settings.seed), self.device)
        trainer = LoraTrainer(model, [self.pool_encoded[i] for i in members], [self.pool[i].id for i in members],
                              settings, self.tokenizer.pad_token_id, device)
        replay = Replay(trainer, None)
        names = trainer.parameter_names
        fit_gradient = lambda final: measurement_gradient(model, names, final, self.fit_batches, len(self.fit))  # noqa: E731
        gradient = np.zeros(0)
        if step < self.options.steps:
            record, direction = replay.truncated(fit_gradient, self.options.truncate)
            batches = batches_of(self.pool_encoded, self.tokenizer.pad_token_id)
            gradient = loss_directional_derivatives(model, names, record.theta, direction, batches) / trainer.per_step
        else:
            replay.final_parameters()
        unit = {"selected": selected, "metagradient": gradient if gradient.size else None,
                "fit_loss": self._loss(model, names, replay.final, self.fit_batches),
                "holdout_loss": self._loss(model, names, replay.final, self.holdout_batches),
                "seconds": round(time.time() - started, 1)}
        atomic_write(path, lambda tmp: save_npz(tmp, selected=selected, metagradient=gradient,
                                                fit_loss=unit["fit_loss"], holdout_loss=unit["holdout_loss"],
                                                seconds=unit["seconds"]))
        return unit

    @staticmethod
    def _loss(model, names: dict, theta: dict, batches: list[dict]) -> float:
        model.eval()
        with torch.no_grad():
            bound = _Bound(model, {names[k]: v for k, v in theta.items()})
            losses = torch.cat([forward_response(bound, batch).losses for batch in batches])
        return float(losses.double().mean())

    def _swap(self, selected: np.ndarray, gradient: np.ndarray, step: int) -> np.ndarray:
        """The budget-keeping sign step: swap up to ``m`` of the most harmful selected for the most helpful others."""
        options = self.options
        share = options.flip_start + (options.flip_end - options.flip_start) * step / max(options.steps - 1, 1)
        m = max(1, int(round(share * self.size)))
        inside, outside = np.flatnonzero(selected), np.flatnonzero(~selected)
        leaving = inside[np.argsort(-gradient[inside], kind="stable")[:m]]
        joining = outside[np.argsort(gradient[outside], kind="stable")[:m]]
        pairs = [(out, into) for out, into in zip(leaving, joining) if gradient[into] < gradient[out]]
        new = selected.copy()
        for out, into in pairs:
            new[out], new[into] = False, True
        return new
