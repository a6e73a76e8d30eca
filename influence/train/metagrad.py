"""``influence metagrad``: exact metagradients of a run's warm-up (MAGIC; the algorithm is :mod:`.replay`).

For every training example ``i`` of the run, ``d measurement / d w_i`` at ``w = 1``: how the measurement of the final
model (the target's mean loss, or each target example's loss with ``--per-target-example``) changes per unit of extra
weight on example ``i``'s loss in every step it was trained in. Positive = up-weighting ``i`` raises the target's loss
(harmful); ``rank --method magic`` reports minus it. Units: loss per unit weight; to first order, dropping a set ``S``
changes the measurement by ``-sum_{i in S} d measurement / d w_i``.

The replay starts from the run's LoRA initialisation (its seed) and must reproduce the stored checkpoint of every
epoch: a run that does not replay (another torch or transformers, changed data, a diverged resume) is refused with
the size of the difference. Results go to ``RUN/metagrad/<target>-<measure>-<examples sha>/``: ``metagrad.npz``
(``weights``: one row per measurement, the first being the target's mean) and ``meta.json``; an interrupted
computation resumes after the last reversed segment (``partial.pt``).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file

from .. import __version__
from ..config import setting, settings_from
from ..core.locks import writer_lock
from ..data.formats import examples_sha256
from ..data.targets import load_target, target_name
from ..data.templates import encode_example
from ..errors import InfluenceError
from ..models.loading import add_lora, device_setting, parse_device, place
from .loop import LoraTrainer
from .replay import Adjoint, Replay, State, batches_of, measurement_gradient
from .run import Run, atomic_write
from .subsets import train_settings

Measure = Literal["loss"]


@dataclass(kw_only=True)
class MetagradSettings:
    """What ``influence metagrad`` differentiates (see :mod:`influence.train.metagrad`)."""

    target_tasks: list[str] | None = setting(None, "Comma-separated subtasks of the target to keep.", list=True)
    measure: Measure = setting("loss", "The measurement of the final model: the mean loss over each target example's "
                                       "response tokens.")
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


def metagrad_folder(run: Run, target: str, tasks: list[str] | None, measure: str) -> Path:
    examples = load_target(target, tasks)
    return run.path / "metagrad" / f"{target_name(target)}-{measure}-{examples_sha256(examples)[:12]}"


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


def load_metagradients(run: Run, target: str, tasks: list[str] | None = None, measure: str = "loss"
                       ) -> Metagradients | None:
    """The run's finished metagradients for the target, or None; refused when they were computed for another run."""
    folder = metagrad_folder(run, target, tasks, measure)
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


def run_trainer(run: Run, device) -> tuple[LoraTrainer, object]:
    """A fresh trainer of the run's warm-up, and its tokenizer: its base model with the LoRA initialisation of its seed,
    its training examples in its order, its settings."""
    base, tokenizer, _ = run.load_base_model(device)
    settings = train_settings(run)
    pool = {e.id: e for e in run.pool()}
    examples = [pool[i] for i in run.manifest["warmup_ids"]]
    model, device = place(add_lora(base, settings.lora, settings.seed), device)
    encoded = [encode_example(e, tokenizer, settings.max_length) for e in examples]
    return LoraTrainer(model, encoded, [e.id for e in examples], settings, tokenizer.pad_token_id, device), tokenizer


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
    config = run.manifest["config"]
    if len(run.checkpoints()) < int(config["epochs"]):
        raise InfluenceError(f"{run.path}: the warm-up has {len(run.checkpoints())} of its {config['epochs']} epochs; "
                             "finish it first (`influence warmup --resume`)")
    examples = load_target(target, settings.target_tasks)
    folder = metagrad_folder(run, target, settings.target_tasks, settings.measure)
    if (folder / "metagrad.npz").is_file() and not settings.overwrite:
        done = load_metagradients(run, target, settings.target_tasks, settings.measure)
        if done.per_target is not None or not settings.per_target_example:
            return folder
    device = parse_device(settings.device)
    n_measures = 1 + (len(examples) if settings.per_target_example else 0)
    steps = int(run.manifest["steps"]["total"])
    training_seconds = run.manifest.get("wall_seconds")
    factor = 2.5 + 1.2 * n_measures  # measured on the tiny model and SmolLM2: replay 1x, reverse ~1.5x + 1.2x each
    say = (f"metagrad: {steps} optimizer steps of {len(run.manifest['warmup_ids'])} training examples, {n_measures} "
           f"measurement(s) on {len(examples)} target example(s): about {factor:.1f}x the warm-up's training"
           + (f" (~{factor * training_seconds / 60:.1f} min; it took {training_seconds / 60:.1f} min)"
              if training_seconds else ""))
    if float(config["lora"]["dropout"]) > 0:
        say += ("\nnote: the run trained with LoRA dropout {:g}: the metagradients are exact, but with dropout the effect "
                "of dropping whole examples is far from linear (a warm-up with --lora-dropout 0 predicts it far better; "
                "see the README)").format(float(config["lora"]["dropout"]))
    if progress or settings.dry_run:
        print(say, file=sys.stderr, flush=True)
    if settings.dry_run:
        return None
    with writer_lock(run.path, "metagrad"):
        return _compute(run, target, examples, folder, settings, device, n_measures, progress)


def _compute(run: Run, target: str, examples, folder: Path, settings: MetagradSettings, device, n_measures: int,
             progress: bool) -> Path:
    started = time.time()
    trainer, tokenizer = run_trainer(run, device)
    check, worst = checkpoint_check(run, trainer, settings.tolerance)
    replay = Replay(trainer, settings.max_states_gb, check)
    key = {"run_id": run.run_id, "pool_sha256": run.pool_sha256, "target": target,
           "target_tasks": settings.target_tasks, "target_sha256": examples_sha256(examples),
           "measure": settings.measure, "per_target_example": settings.per_target_example,
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
    encoded = [encode_example(e, tokenizer, run.max_length) for e in examples]
    names = trainer.parameter_names

    def measurements(final: State) -> list[State]:
        """The gradients of the measurements with respect to the final parameters."""
        grads = measurement_gradient(trainer.model, names, final, batches_of(encoded, tokenizer.pad_token_id),
                                     len(encoded))
        if settings.per_target_example:
            grads += measurement_gradient(trainer.model, names, final, batches_of(encoded, tokenizer.pad_token_id, 1),
                                          len(encoded), True)
        return grads

    def save(segment: int, adjoints) -> None:
        atomic_write(partial, lambda path: torch.save({"key": json.dumps(key, sort_keys=True), "segment": segment,
                                                       "adjoints": [asdict(a) for a in adjoints]}, path))

    adjoints = replay.metagradients(measurements, progress, save, resume)
    weights = np.stack([a.weights.numpy() for a in adjoints])
    target_ids = [e.id for e in examples] if settings.per_target_example else []
    atomic_write(folder / "metagrad.npz", lambda path: np.savez(
        path.open("wb"), weights=weights, training_ids=np.array(trainer.ids), target_ids=np.array(target_ids, dtype=str)))
    meta = {**key, "settings": asdict(settings), "n_training": len(trainer.ids), "steps": len(replay.steps),
            "segments": replay.n_segments, "replay_relative_difference": worst["relative_difference"],
            "seconds": round(time.time() - started, 1), "training_seconds": run.manifest.get("wall_seconds"),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "meaning": __doc__.split("\n\n")[1]}
    atomic_write(folder / "meta.json", lambda path: path.write_text(json.dumps(meta, indent=2, default=str)))
    partial.unlink(missing_ok=True)
    return folder
