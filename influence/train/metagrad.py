"""``influence metagrad``: exact metagradients of a run's warm-up (MAGIC; the algorithm is :mod:`.replay`).

For every training example ``i`` of the run, ``d measurement / d w_i`` at ``w = 1``: how the measurement of the final
model (the mean over the target's examples, and each target example's with ``--per-target-example``) changes per unit
of extra weight on example ``i``'s loss in every step it was trained in. ``--measure``, per target example, in
evaluation mode (each is an outcome of :mod:`influence.models.measure`, which ``evaluate lds --outcome`` measures on
retrained models):

* ``loss``: the mean response-token loss (outcome ``loss``; lower is better);
* ``margin``: for multiple-choice examples, the right choice's log-likelihood minus the log-sum-exp of the others'
  (TRAK's margin over the choices; outcome ``margin``; higher is better); refused for targets without choices;
* ``accuracy-surrogate``: ``exp(-loss)``, the geometric mean of the response tokens' probabilities, a smooth accuracy
  (for a one-token answer such as MMLU's letter, the probability of the right one; outcome ``probability``; higher
  is better).

Positive = up-weighting ``i`` raises the measurement; ``rank --method magic`` signs it so that higher is helpful.
Units: the measurement per unit weight; to first order, dropping a set ``S`` changes the measurement by
``-sum_{i in S} d measurement / d w_i``.

The replay starts from the run's LoRA initialisation (its seed) and must reproduce the stored checkpoint of every
epoch: a run that does not replay (another torch or transformers, changed data, a diverged resume) is refused with
the size of the difference. Results go to ``RUN/metagrad/<target>-<measure>-<examples sha>/``: ``metagrad.npz``
(``weights``: one row per measurement, the first being the target's mean) and ``meta.json``; an interrupted
computation resumes after the last reversed segment (``partial.pt``).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file

from .. import __version__
from ..config import from_dict, setting, settings_from
from ..core.locks import writer_lock
from ..core.naming import POOL
from ..data.formats import examples_sha256
from ..data.targets import load_target, target_name
from ..data.templates import collate, encode_example
from ..errors import InfluenceError
from ..models.loading import add_lora, device_setting, parse_device, place
from ..models.losses import forward_response
from ..models.measure import choice_margin, correct_choices, encode_choices
from ..models.measure import measure as measure_outcomes
from .loop import LoraTrainer, TrainSettings
from .replay import Adjoint, Replay, State, batches_of, measurement_gradient, response_losses
from .run import Run, atomic_write, save_npz
from .subset_store import SubsetStore, stored_subsets
from .subsets import train_settings, unit_training

Measure = Literal["loss", "margin", "accuracy-surrogate"]
OUTCOME_OF_MEASURE = {"loss": "loss", "margin": "margin", "accuracy-surrogate": "probability"}  # see the docstring


@dataclass(kw_only=True)
class MetagradSettings:
    """What ``influence metagrad`` differentiates (see :mod:`influence.train.metagrad`)."""

    target_tasks: list[str] | None = setting(None, "Comma-separated subtasks of the target to keep.", list=True)
    measure: Measure = setting("loss", "The measurement of the final model per target example: loss (mean response "
                                       "loss), margin (the right choice's log-likelihood minus the log-sum-exp of the "
                                       "others'; multiple-choice targets), accuracy-surrogate (exp(-loss), compared with "
                                       "evaluate lds --outcome probability).")
    subset: str | None = setting(None, "A subset model of the run instead of its warm-up: STORE:UNIT (a store of "
                                       "RUN/subsets.zarr, e.g. heldout:3), replayed from its design and seed and "
                                       "checked against the losses it recorded.")
    per_target_example: bool = setting(False, "Also one metagradient per target example (for evaluate lds): one more "
                                              "double-backward pass per example and step.")
    max_states_gb: float = setting(2.0, "Memory for the replay's training states: the whole run at once when it "
                                        "fits, else segments of about sqrt(steps) steps replayed twice.", min=0,
                                   min_open=True)
    tolerance: float = setting(1e-3, "Largest relative difference from a stored checkpoint the replay may show.",
                               min=0, min_open=True)
    overwrite: bool = setting(False, "Recompute a finished metagradient.")
    device: str | None = device_setting()
    dry_run: bool = setting(False, "Print the cost and stop.")


def metagrad_folder(run: Run, target: str, tasks: list[str] | None, measure: str, subset: str | None = None) -> Path:
    examples = load_target(target, tasks)
    unit = "" if subset is None else "-" + subset.replace(":", "-u")
    return run.path / "metagrad" / f"{target_name(target)}-{measure}-{examples_sha256(examples)[:12]}{unit}"


@dataclass
class Metagradients:
    """A finished ``influence metagrad``: ``weights`` (measurements x training examples; row 0 the target's mean)."""

    training_ids: list[str]
    target_ids: list[str]  # the measurements after the mean, when per target example
    weights: np.ndarray
    meta: dict

    @property
    def mean(self) -> np.ndarray:
        return self.weights[0]

    @property
    def per_target(self) -> np.ndarray | None:
        return self.weights[1:] if len(self.weights) > 1 else None


def load_metagradients(run: Run, target: str, tasks: list[str] | None = None, measure: str = "loss",
                       subset: str | None = None) -> Metagradients | None:
    """The run's (or its subset model's) finished metagradients for the target, or None; refused when they were
    computed for another run."""
    folder = metagrad_folder(run, target, tasks, measure, subset)
    if not (folder / "metagrad.npz").is_file():
        return None
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("run_id") != run.run_id or meta.get("pool_sha256") != run.pool_sha256:
        raise InfluenceError(f"{folder}: computed for another run or pool; rerun `influence metagrad --overwrite`")
    if meta.get("influence_version") != __version__:
        raise InfluenceError(f"{folder}: computed by influence {meta.get('influence_version')}, this is {__version__}; "
                             "rerun `influence metagrad --overwrite`")
    with np.load(folder / "metagrad.npz", allow_pickle=False) as arrays:
        return Metagradients(arrays["training_ids"].astype(str).tolist(), arrays["target_ids"].astype(str).tolist(),
                             arrays["weights"], meta)


def check_measure(measure: str, target: str, examples: list) -> None:
    """Refuse a measure the target's examples do not have (before any work)."""
    if measure == "margin":
        plain = [e.id for e in examples if not e.choices]
        if plain:
            raise InfluenceError(f"--measure margin needs multiple-choice target examples (with choices, as MMLU's "
                                 f"letters): {len(plain)} of {target}'s {len(examples)} have none (first: {plain[0]}); "
                                 "use --measure loss or accuracy-surrogate")


def measurement_batches(measure: str, examples: list, tokenizer, max_length: int, per_example: bool
                        ) -> tuple[list, Callable]:
    """The target's examples as batches for ``measure`` (one example each with ``per_example``) and the function
    giving a batch's values, one per example (see the module docstring)."""
    if measure == "margin":  # one batch per example: its choices, each scored by its summed log-likelihood
        def margin(model, item) -> torch.Tensor:
            batch, right = item
            forward = forward_response(model, batch)
            return choice_margin(-(forward.losses * forward.counts), right)[None]

        choices = encode_choices(examples, tokenizer, max_length)
        return [(collate(options, tokenizer.pad_token_id), right)
                for options, right in zip(choices, correct_choices(examples))], margin
    encoded = [encode_example(e, tokenizer, max_length) for e in examples]
    value = response_losses if measure == "loss" else (lambda model, batch: torch.exp(-response_losses(model, batch)))
    return batches_of(encoded, tokenizer.pad_token_id, 1 if per_example else 8), value


@dataclass
class Training:
    """The training a metagradient goes back through: the run's warm-up, or one of its subset models."""

    examples: list  # trained on, in the trainer's order
    weights: np.ndarray | None  # their loss weights (None: all 1)
    settings: TrainSettings
    subset: tuple[SubsetStore, int] | None = None  # (store, unit) of a subset model
    seconds: float | None = None  # what the training took

    @property
    def steps(self) -> int:
        per_step = self.settings.batch_size * self.settings.grad_accum
        return self.settings.epochs * math.ceil(len(self.examples) / per_step)


def training_of(run: Run, subset: str | None) -> Training:
    """The run's warm-up (finished), or the subset model ``STORE:UNIT`` (trained), checked before any model is loaded."""
    if subset is None:
        epochs = int(run.manifest["config"]["epochs"])
        if len(run.checkpoints()) < epochs:
            raise InfluenceError(f"{run.path}: the warm-up has {len(run.checkpoints())} of its {epochs} epochs; "
                                 "finish it first (`influence warmup --resume`)")
        pool = {e.id: e for e in run.pool()}
        return Training([pool[i] for i in run.manifest["warmup_ids"]], None, train_settings(run),
                        seconds=run.manifest.get("wall_seconds"))
    name, _, unit_text = subset.rpartition(":")
    stored = stored_subsets(run.subsets_path)
    if not name or not unit_text.isdigit():
        raise InfluenceError(f"--subset {subset}: give STORE:UNIT, e.g. {(stored or ['heldout'])[0]}:0")
    if name not in stored:
        raise InfluenceError(f"--subset {subset}: {run.subsets_path} has no store '{name}' (it has: "
                             f"{', '.join(stored) or 'none'}; `influence subsets train` makes them)")
    store, unit = SubsetStore.open(run.subsets_path, name), int(unit_text)
    if store.metadata.get("pool_sha256") != run.pool_sha256:
        raise InfluenceError(f"--subset {subset}: {store.path} was trained on another pool than the run's")
    if not store.is_done(unit):
        raise InfluenceError(f"--subset {subset}: unit {unit} of {store.path} is not trained (it has "
                             f"{len(store.done_units())} finished units)")
    settings = from_dict(TrainSettings, {}, base=store.metadata["settings"], where=f"{store.path} settings")
    members, weights, settings = unit_training(store.design, store.mask(unit), unit, settings, store.unit_weights(unit))
    pool = run.pool()
    return Training([pool[i] for i in members], weights, settings, (store, unit), store.unit_attrs(unit).get("seconds"))


def run_trainer(run: Run, training: Training, device) -> tuple[LoraTrainer, object]:
    """A fresh trainer of the training, and its tokenizer: the run's base model with the LoRA initialisation of the
    training's seed, its examples in their order, its weights and settings."""
    base, tokenizer, _ = run.load_base_model(device)
    settings = training.settings
    model, device = place(add_lora(base, settings.lora, settings.seed), device)
    encoded = [encode_example(e, tokenizer, settings.max_length) for e in training.examples]
    return LoraTrainer(model, encoded, [e.id for e in training.examples], settings, tokenizer.pad_token_id, device,
                       weights=training.weights), tokenizer


def recorded_loss_check(run: Run, training: Training, trainer: LoraTrainer, tokenizer, tolerance: float,
                        n_examples: int = 32):
    """A check of a subset model's replay: after its last epoch, the losses of the first ``n_examples`` examples it
    was measured on (the pool's, else its first target's) against those it recorded (it kept no checkpoint)."""
    store, unit = training.subset
    if store.pool_measured:
        dataset, examples = POOL, run.pool()
    else:
        dataset, info = next(iter(store.targets.items()))
        examples = load_target(info["target"], info.get("target_tasks"))
    encoded = [encode_example(e, tokenizer, training.settings.max_length) for e in examples[:n_examples]]
    recorded = store.outcomes(dataset, "loss", [unit])[2][0][: len(encoded)]
    worst = {"relative_difference": 0.0}

    def check(epoch: int, theta: State) -> None:
        if epoch != training.settings.epochs:
            return
        replayed = measure_outcomes(trainer.model, encoded, tokenizer.pad_token_id, 8, trainer.device)["loss"]
        difference = float(np.max(np.abs(replayed - recorded) / np.maximum(np.abs(recorded), 1e-12)))
        worst["relative_difference"] = difference
        if difference > tolerance:
            raise InfluenceError(
                f"{store.path} unit {unit}: the replay's losses on {len(encoded)} {dataset} examples differ from those "
                f"the model recorded by up to {difference:.2g} (relative; --tolerance {tolerance:g}): it cannot be "
                "replayed here (trained with other versions of torch/transformers or on another kind of device)")

    return check, worst


def checkpoint_check(run: Run, trainer: LoraTrainer, tolerance: float):
    """A check of the replay against the run's stored checkpoint of each epoch (refusing a run that does not replay)."""
    checkpoints = {c.epoch: c for c in run.checkpoints()}
    keys = trainer.adapter_keys()
    worst = {"relative_difference": 0.0}

    def check(epoch: int, theta: State) -> None:
        stored = load_file(str(checkpoints[epoch].adapter_file))
        difference = max(float((theta[k].cpu().float() - stored[key].float()).norm() /
                               stored[key].float().norm().clamp(min=1e-12)) for k, key in keys.items())
        worst["relative_difference"] = max(worst["relative_difference"], difference)
        if difference > tolerance:
            raise InfluenceError(
                f"{run.path}: the replay of the training differs from its checkpoint of epoch {epoch} by {difference:.2g} "
                f"(relative; --tolerance {tolerance:g}): the run cannot be replayed here (trained with other "
                "versions of torch/transformers, on another kind of device, or resumed differently), so its "
                "metagradients would not be those of the model it made")

    return check, worst


def metagrad(run_dir: str | Path, target: str, settings: MetagradSettings | None = None, *, progress: bool = True,
             **values) -> Path | None:
    """Compute (or resume) the metagradients of the run's training for ``target``; returns their folder (None for a
    dry run). Prints the cost first."""
    settings = settings_from(MetagradSettings, settings, where="metagrad", **values)
    run = Run(run_dir)
    run.check_data_unchanged()
    training = training_of(run, settings.subset)
    examples = load_target(target, settings.target_tasks)
    check_measure(settings.measure, target, examples)
    folder = metagrad_folder(run, target, settings.target_tasks, settings.measure, settings.subset)
    if (folder / "metagrad.npz").is_file() and not settings.overwrite:
        done = load_metagradients(run, target, settings.target_tasks, settings.measure, settings.subset)
        if done.per_target is not None or not settings.per_target_example:
            return folder
    device = parse_device(settings.device)
    n_measures = 1 + (len(examples) if settings.per_target_example else 0)
    seconds, what = training.seconds, "the warm-up" if training.subset is None else f"subset model {settings.subset}"
    factor = 2.5 + 1.2 * n_measures  # measured on the tiny model and SmolLM2: replay 1x, reverse ~1.5x + 1.2x each
    say = (f"metagrad ({what}): {training.steps} optimizer steps of {len(training.examples)} training examples, "
           f"{n_measures} measurement(s) on {len(examples)} target example(s): about {factor:.1f}x its training"
           + (f" (~{factor * seconds / 60:.1f} min; it took {seconds / 60:.1f} min)" if seconds else ""))
    if training.settings.lora.dropout > 0:
        say += ("\nnote: it trained with LoRA dropout {:g}: the metagradients are exact, but with dropout the effect "
                "of dropping whole examples is far from linear (training with --lora-dropout 0 predicts it far better; "
                "see the README)").format(training.settings.lora.dropout)
    if progress or settings.dry_run:
        print(say, file=sys.stderr, flush=True)
    if settings.dry_run:
        return None
    with writer_lock(run.path, "metagrad"):
        return _compute(run, training, target, examples, folder, settings, device, progress)


def _compute(run: Run, training: Training, target: str, examples, folder: Path, settings: MetagradSettings, device,
             progress: bool) -> Path:
    started = time.time()
    trainer, tokenizer = run_trainer(run, training, device)
    check, worst = checkpoint_check(run, trainer, settings.tolerance) if training.subset is None else \
        recorded_loss_check(run, training, trainer, tokenizer, settings.tolerance)
    replay = Replay(trainer, settings.max_states_gb, check)
    key = {"run_id": run.run_id, "pool_sha256": run.pool_sha256, "subset": settings.subset, "target": target,
           "target_tasks": settings.target_tasks, "target_sha256": examples_sha256(examples),
           "measure": settings.measure, "outcome": OUTCOME_OF_MEASURE[settings.measure],
           "per_target_example": settings.per_target_example,
           "segment_steps": replay.segment, "influence_version": __version__}
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "partial.pt"
    resume = None
    if partial.is_file() and not settings.overwrite:
        try:
            saved = torch.load(partial, weights_only=True, map_location=device)
        except Exception as err:  # torch raises many kinds for a damaged file: it is only a resume point
            print(f"note: {partial} is unreadable ({err}); starting over", file=sys.stderr)
            saved = {}
        if saved.get("key") == json.dumps(key, sort_keys=True):
            resume = (saved["segment"], [Adjoint(**a) for a in saved["adjoints"]])
    names = trainer.parameter_names

    def measurements(final: State) -> list[State]:
        """The gradients of the measurements with respect to the final parameters."""
        length = training.settings.max_length  # the model's own (a subset model's may differ from the warm-up's)
        batches, value = measurement_batches(settings.measure, examples, tokenizer, length, False)
        grads = measurement_gradient(trainer.model, names, final, batches, len(examples), value=value)
        if settings.per_target_example:
            batches, value = measurement_batches(settings.measure, examples, tokenizer, length, True)
            grads += measurement_gradient(trainer.model, names, final, batches, len(examples), True, value)
        return grads

    def save(segment: int, adjoints) -> None:
        atomic_write(partial, lambda path: torch.save({"key": json.dumps(key, sort_keys=True), "segment": segment,
                                                       "adjoints": [asdict(a) for a in adjoints]}, path))

    adjoints = replay.metagradients(measurements, progress, save, resume)
    weights = np.stack([a.weights.numpy() for a in adjoints])
    target_ids = [e.id for e in examples] if settings.per_target_example else []
    atomic_write(folder / "metagrad.npz", lambda path: save_npz(
        path, weights=weights, training_ids=np.array(trainer.ids), target_ids=np.array(target_ids, dtype=str)))
    meta = {**key, "settings": asdict(settings), "n_training": len(trainer.ids), "steps": len(replay.steps),
            "segments": replay.n_segments, "replay_relative_difference": worst["relative_difference"],
            "replay_checked_against": "checkpoints" if training.subset is None else "recorded losses",
            "seconds": round(time.time() - started, 1), "training_seconds": training.seconds,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "meaning": __doc__.split("\n\n")[1]}
    atomic_write(folder / "meta.json", lambda path: path.write_text(json.dumps(meta, indent=2, default=str)))
    partial.unlink(missing_ok=True)
    return folder
