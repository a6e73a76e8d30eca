"""The counterfactual engine's primitive: LoRA fine-tunes from the base model on subsets of the pool.

``train_subsets(run, k, alpha)`` trains ``k`` models, each on a random subset holding a fraction
``alpha`` of the pool (a random design: unit ``u``'s subset is a pure function of (seed, u), so the
design grows by asking for a larger ``k``), and records what each model does on every pool example
and every target example (:mod:`influence.models.measure`). ``train_masks`` trains models on given subsets
(an explicit design: leave-some-out checks, selection retraining). Memorization, influence estimates,
datamodels and the LDS check are all computed from these records (``influence.scoring.counterfactual``,
``influence.evaluate.lds``).

Every model is an independent unit (:mod:`influence.core.units`): published whole when finished, never
redone, claimable by several processes or machines working on one store at once, with ``worker =
(i, n)`` for a static split, a time cap and a cost estimate printed before starting. Training uses the
warm-up's settings (the same learning algorithm the gradient methods approximate) unless overridden.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import check, from_dict, setting, settings_from
from ..core.naming import POOL, target_dataset
from ..core.units import UnitClaims, UnitReport, UnitSettings, run_units
from ..data.formats import Example, examples_sha256
from ..data.targets import load_target, target_name
from ..data.templates import Encoded, collate, encode_example
from ..errors import InfluenceError
from ..models.loading import ModelLoading, add_lora, load_base_model, model_fingerprint, parse_device, place
from ..models.losses import forward_response
from ..models.measure import correct_choices, encode_choices, generate_responses, measure, single_token_choices
from .loop import LoraTrainer, TrainingDiverged, TrainSettings, padded_tokens
from .run import Run
from .subset_store import SubsetStore


@dataclass
class SubsetReport:
    """What a call of :func:`train_subsets` / :func:`train_masks` did or, with ``dry_run``, would do."""

    store: str
    units: int  # units asked for
    estimate_seconds: float  # per unit, measured on this machine before starting
    pool_size: int
    subset_size: int | str
    settings: dict
    run: UnitReport | None = None  # None for a dry run
    notes: list[str] = field(default_factory=list)
    speed: Speed | None = None  # what the estimate was computed from
    todo: int = 0  # units this worker had left to train when it started


def train_settings(run: Run, overrides: dict | TrainSettings | None = None) -> TrainSettings:
    """The warm-up's training settings updated with ``overrides`` (field names, e.g.
    ``{"learning_rate": 1e-4, "lora": {"r": 8}}``), or ``overrides`` itself when it is complete."""
    if isinstance(overrides, TrainSettings):
        return overrides
    return from_dict(TrainSettings, overrides or {}, base=run.manifest["config"], where="training settings")


def stored_subset_settings(run: Run, name: str) -> dict | None:
    """What the set of subset models ``name`` was made with (design, training settings, targets), or
    None when it does not exist yet: resuming it or adding units needs no flag repeated."""
    from .subset_store import SubsetStore, stored_subsets

    if name not in stored_subsets(run.subsets_path):
        return None
    metadata = SubsetStore.open(run.subsets_path, name).metadata
    return {"design": metadata["design"], "settings": metadata["settings"],
            "targets": [(t["target"], t.get("target_tasks")) for t in metadata["targets"].values()]}


def unit_seed(design_seed: int, unit: int) -> int:
    """Seed of unit ``unit``'s LoRA initialisation and data order: distinct per unit and design."""
    return int(np.random.default_rng([design_seed, unit, 1]).integers(2**31 - 1))


def unit_training(design: dict, mask: np.ndarray, unit: int, settings: TrainSettings,
                  weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, TrainSettings]:
    """What a unit of a store trains: the pool indices in training order's input, their loss weights (None: all 1) and
    the settings with the unit's seed. A ``drop`` unit is the run's training itself with the dropped examples' weights
    at 0; the others train on their mask's examples, weighted by ``weights`` (an explicit design's row) where given,
    with a seed of their own."""
    if design["kind"] == "drop":
        members = np.asarray(design["training"])
        return members, mask[members].astype(np.float64), settings
    members = np.flatnonzero(mask)
    return members, None if weights is None else weights[members], replace(settings, seed=unit_seed(design["seed"], unit))


@dataclass(kw_only=True)
class SubsetSettings:
    """A random design of subset models: ``k`` units, each on a random ``alpha`` fraction of the pool, the
    targets they are measured on, the set's name and seed (``influence subsets train``)."""

    k: int = setting(help="Number of subset models (units 0..k-1; a larger k adds units); at least 2, since "
                          "estimates compare models with and without each example.", min=2)
    alpha: float = setting(0.5, "Fraction of the pool in each subset.", min=0, max=1, min_open=True, max_open=True)
    targets: list[EvalSpec] = setting(default_factory=list, help="Target to evaluate every model on (registry name "
                                      "or file); repeat for several.", flag="target", multiple=True)
    target_tasks: list[str] | None = setting(None, "Comma-separated subtasks of the target(s) to keep.", list=True)
    name: str = setting("fit", "Name of this set of subset models in the run.")
    seed: int = setting(0, "Seed of the subsets and of each unit's training.")


def train_subsets(run_dir: str | Path, settings: SubsetSettings | None = None, *,
                  training: dict | TrainSettings | None = None, units: UnitSettings | None = None,
                  device: str | None = None, eval_batch_size: int = 16, progress: bool = True,
                  say: Callable[[str], None] | None = None, **values) -> SubsetReport:
    """Train units ``0..k-1`` of the random design (each on ``round(alpha x pool)`` examples) that are not
    finished yet, and record their outcomes on the pool and on the targets. ``settings`` (a
    :class:`SubsetSettings`) and ``values`` (its fields by keyword) give the design; ``training`` overrides the
    warm-up's training settings (or the set's own, when it exists); ``units`` how the units are run."""
    settings = settings_from(SubsetSettings, settings, where="subsets train", **values)
    run = Run(run_dir)
    n = run.manifest["pool_size"]
    size = int(round(settings.alpha * n))
    if not 1 <= size <= n - 1:
        raise InfluenceError(f"--alpha {settings.alpha} gives subsets of {size} of the pool's {n} examples; each subset "
                             "must hold at least one example and leave at least one out")
    design = {"kind": "random", "alpha": settings.alpha, "size": size, "seed": settings.seed}
    return _train(run, settings.name, design, None, list(range(settings.k)), settings.targets, settings.target_tasks,
                  training, units, device, eval_batch_size, progress, say)


def train_masks(run_dir: str | Path, masks: np.ndarray, unit_names: list[str], targets: list[EvalSpec], *, name: str,
                seed: int = 0, target_tasks: list[str] | None = None, training: dict | TrainSettings | None = None,
                units: UnitSettings | None = None, device: str | None = None, eval_batch_size: int = 16,
                progress: bool = True, say: Callable[[str], None] | None = None) -> SubsetReport:
    """Train one model per row of ``masks`` (units named ``unit_names``) in the explicit design ``name``."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or len(unit_names) != len(masks) or not masks.any(axis=1).all():
        raise InfluenceError("masks must be (units x pool) with at least one example per unit, one name per unit")
    design = {"kind": "explicit", "names": list(unit_names), "seed": seed}
    return _train(Run(run_dir), name, design, masks, list(range(len(masks))), targets, target_tasks, training, units,
                  device, eval_batch_size, progress, say)


def train_drops(run_dir: str | Path, fraction: float, k: int, targets: list[EvalSpec], *, name: str, seed: int = 0,
                target_tasks: list[str] | None = None, units: UnitSettings | None = None, device: str | None = None,
                eval_batch_size: int = 16, progress: bool = True,
                say: Callable[[str], None] | None = None) -> SubsetReport:
    """The single-model LDS's models (MAGIC's setting): the run's own training replayed ``k`` times, each time with
    the loss weights of a random ``fraction`` of its training examples at 0 and everything else unchanged (order,
    batches, seed, dropout masks, schedule), measured on ``targets``. Unit ``u`` drops a draw seeded by (seed, u)."""
    run = Run(run_dir)
    index = {e.id: n for n, e in enumerate(run.pool())}
    training = [index[i] for i in run.manifest["warmup_ids"]]
    count = max(1, int(round(fraction * len(training))))
    if not 0 < fraction < 1 or count >= len(training):
        raise InfluenceError(f"--drop {fraction:g}: drop fractions must lie in (0, 1) and leave some of the run's "
                             f"{len(training)} training examples")
    design = {"kind": "drop", "fraction": fraction, "size": count, "seed": seed, "training": training}
    return _train(run, name, design, None, list(range(k)), targets, target_tasks, None, units, device,
                  eval_batch_size, progress, say)


EvalSpec = str | tuple[str, list[str] | None]  # a target, or (target, its subtasks to keep)


@dataclass
class EvalSet:
    """Examples every unit's model is measured on (a target, or held-out evaluation data)."""

    target: str  # as given: a registry name or a file, or a label
    tasks: list[str] | None  # subtasks kept (None: all)
    dataset: str  # its name in the store: short name + content hash
    examples: list[Example]

    @classmethod
    def of(cls, label: str, examples: list[Example], tasks: list[str] | None = None) -> EvalSet:
        return cls(label, tasks, target_dataset(target_name(label), examples_sha256(examples)), examples)


def load_eval_sets(targets: list[EvalSpec], target_tasks: list[str] | None = None) -> list[EvalSet]:
    """Each target (``target_tasks`` applies to those given without their own subtasks), loaded and
    keyed by content; a target given twice counts once."""
    found: dict[str, EvalSet] = {}
    for spec in targets:
        target, tasks = (spec, target_tasks) if isinstance(spec, str) else spec
        evaluated = EvalSet.of(target, load_target(target, tasks), sorted(tasks) if tasks else None)
        found.setdefault(evaluated.dataset, evaluated)
    return list(found.values())


@dataclass
class Universe:
    """What units train on: the base model (and the fingerprint it must have), the examples that masks
    index, and where the stores live."""

    root: Path
    model: str
    examples: list[Example]
    fingerprint: str | None = None  # refuse another model's weights (None: record whatever is loaded)
    loading: ModelLoading | None = None  # how to load it (a run's: as at its warm-up); None: fp32


def _train(run: Run, name: str, design: dict, masks: np.ndarray | None, units: list[int], targets: list[EvalSpec],
           target_tasks: list[str] | None, overrides, running: UnitSettings | None, device, eval_batch_size, progress,
           say) -> SubsetReport:
    run.check_data_unchanged()
    existing = stored_subset_settings(run, name)
    # Adding units to an existing set trains them as it was trained: its settings, not the warm-up's.
    settings = train_settings(run, overrides) if existing is None or isinstance(overrides, TrainSettings) else \
        from_dict(TrainSettings, overrides or {}, base=existing["settings"], where="training settings")
    pool = run.pool()
    universe = Universe(run.subsets_path, run.model_name, pool, run.manifest.get("model_fingerprint"), run.model_loading)
    return train_units(universe, name, design, masks, units, load_eval_sets(list(targets), target_tasks), settings,
                       running=running, device=device, eval_batch_size=eval_batch_size, progress=progress, say=say)


def train_units(universe: Universe, name: str, design: dict, masks: np.ndarray | None, units: list[int],
                eval_sets: list[EvalSet], settings: TrainSettings, *, weights: np.ndarray | None = None,
                measure_pool: bool = True,
                running: UnitSettings | None = None, device: str | None = None, eval_batch_size: int = 16,
                progress: bool = True,
                say: Callable[[str], None] | None = None, loaded: tuple | None = None,
                generate: dict | None = None, speed: Speed | None = None) -> SubsetReport:
    """Train the unfinished ``units`` of the store ``universe.root/name`` (created with ``design``, and
    ``masks`` for an explicit design, with ``weights``, its units' per-example loss weights, where not all 1) with
    ``settings``, measuring each model on the universe's examples (unless ``measure_pool`` is false) and on
    ``eval_sets``. ``loaded`` = (base model,
    tokenizer, fingerprint) reuses a model already loaded. ``generate`` = {"dataset": an eval set's
    dataset, "n": how many of its examples, "max_new_tokens": ...} also stores each model's greedy
    responses to those prompts (for judges). ``speed`` reuses an earlier cost measurement. ``running``: which
    share of the units, until when, or a dry run (the cost estimate only)."""
    say = say or (lambda message: None)
    running = check(running or UnitSettings())
    worker, max_hours, dry_run = running.worker, running.max_hours, running.dry_run
    if eval_batch_size < 1:
        raise InfluenceError(f"evaluation batch size must be at least 1, got {eval_batch_size}")
    try:
        check(settings)
    except InfluenceError as err:
        raise InfluenceError(f"invalid training settings: {err}") from None
    pool = universe.examples
    if masks is not None and masks.shape[1] != len(pool):
        raise InfluenceError(f"masks cover {masks.shape[1]} examples, the pool has {len(pool)}")
    device = parse_device(device)
    # Everything above is checked before the model is loaded.
    if loaded is None:
        base, tokenizer = load_base_model(universe.model, universe.loading, device)
        fingerprint = model_fingerprint(universe.model, base)
    else:
        base, tokenizer, fingerprint = loaded
    if universe.fingerprint is not None and fingerprint != universe.fingerprint:
        raise InfluenceError(f"--model {universe.model}: its weights are not those the run was warmed up on "
                             f"({fingerprint} now, {universe.fingerprint} then)")
    metadata = {
        "model": fingerprint,
        "pool_sha256": examples_sha256(pool),
        "n_pool": len(pool),
        "pool_measured": measure_pool,
        "generate": generate,
        "design": design,
        "settings": asdict(settings),
        "targets": {t.dataset: {"target": t.target, "target_tasks": t.tasks, "n_examples": len(t.examples),
                                "examples_sha256": examples_sha256(t.examples),
                                "multiple_choice": any(e.choices for e in t.examples)} for t in eval_sets},
        "influence_version": __version__,
    }
    store = SubsetStore.open_or_create(universe.root, name, metadata, [e.id for e in pool],
                                       {t.dataset: ([e.id for e in t.examples], [e.task or "" for e in t.examples])
                                        for t in eval_sets}, masks, weights)
    pool_encoded = [encode_example(e, tokenizer, settings.max_length) for e in pool]
    target_encoded = {t.dataset: ([encode_example(e, tokenizer, settings.max_length) for e in t.examples],
                                  encode_choices(t.examples, tokenizer, settings.max_length),
                                  correct_choices(t.examples)) for t in eval_sets}
    subset_size = (design["size"] if design["kind"] == "random" else f"all but {design['size']}"
                   if design["kind"] == "drop" else "given")
    todo = [u for u in units if not store.is_done(u) and (worker is None or u % worker[1] == worker[0])]
    if speed is None and (todo or dry_run):
        speed = measure_speed(base, settings, pool_encoded, tokenizer.pad_token_id, device, eval_batch_size)
    estimate = unit_seconds(speed, settings, pool_encoded, target_encoded, store, todo or units, measure_pool,
                            eval_batch_size) \
        if speed is not None else 0.0
    report = SubsetReport(str(store.path), len(units), estimate, len(pool), subset_size, asdict(settings), speed=speed,
                          todo=len(todo))
    done = sum(store.is_done(u) for u in units)
    say(f"{store.path}: {len(units)} units asked, {done} done; {len(todo)} to train here, ~{estimate:.1f} s each "
        f"(measured on this machine), ~{len(todo) * estimate / 60:.1f} min in all for one process (pool {len(pool)}, "
        f"subset size {subset_size}, {settings.epochs} epochs, lr {settings.learning_rate:g}, max length {settings.max_length})")
    if dry_run:
        return report

    def work(unit: int) -> None:
        started = time.time()
        mask = store.mask(unit)
        members, weights, unit_settings = unit_training(design, mask, unit, settings, store.unit_weights(unit))
        model, here = place(add_lora(copy.deepcopy(base), settings.lora, unit_settings.seed), device)
        trainer = LoraTrainer(model, [pool_encoded[i] for i in members], [pool[i].id for i in members], unit_settings,
                              tokenizer.pad_token_id, here, weights=weights)
        last_epoch: list[dict] = []
        try:
            for epoch in range(1, settings.epochs + 1):
                last_epoch, _ = trainer.run_epoch(epoch, where=f"{store.path} unit {unit}")
        except TrainingDiverged as err:
            raise InfluenceError(f"{err}; no unit after it was trained") from None
        outcomes = {POOL: measure(model, pool_encoded, tokenizer.pad_token_id, eval_batch_size, here)} \
            if measure_pool else {}
        for dataset, (encoded, choices, correct) in target_encoded.items():
            outcomes[dataset] = measure(model, encoded, tokenizer.pad_token_id, eval_batch_size, here, choices, correct)
        texts = None
        if generate:
            examples = next(t.examples for t in eval_sets if t.dataset == generate["dataset"])[: generate["n"]]
            texts = {generate["dataset"]: generate_responses(model, tokenizer, examples, settings.max_length,
                                                             generate["max_new_tokens"], eval_batch_size, here)}
        store.write_unit(unit, mask, outcomes, texts=texts, attrs={
            "unit": unit, "seed": unit_settings.seed, "seconds": round(time.time() - started, 2),
            "train_loss_last_epoch": float(np.mean([r["loss"] for r in last_epoch])) if last_epoch else None,
            "worker": f"{socket.gethostname()}:{os.getpid()}", "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        del model, trainer

    report.run = run_units(units, store.is_done, work, UnitClaims(store.path / "claims"), worker,
                           max_hours * 3600 if max_hours else None, estimate, progress, desc=f"models {name}")
    if report.run.busy:
        report.notes.append(f"{len(report.run.busy)} unit(s) were being trained by other workers")
    if report.run.left:
        report.notes.append(f"{len(report.run.left)} unit(s) not started: --max-hours reached; rerun to continue")
    return report


@dataclass
class Speed:
    """This machine's measured cost of training and evaluating, per token, and of setting up a model."""

    setup: float  # seconds to copy the base model and add an adapter
    train_token: float  # seconds per token of a training step
    eval_token: float  # seconds per token of a forward pass


def measure_speed(base, settings: TrainSettings, pool_encoded: list[Encoded], pad_token_id: int, device,
                  eval_batch_size: int) -> Speed:
    """Time a training step and an evaluation batch on a throwaway adapter, on examples of median length."""
    lengths = np.array([len(e.input_ids) for e in pool_encoded])
    order = np.argsort(lengths)
    middle = order[len(order) // 2 : len(order) // 2 + max(settings.batch_size, 1)]
    sample = [pool_encoded[i] for i in middle]
    started = time.perf_counter()
    model, device = place(add_lora(copy.deepcopy(base), settings.lora, 0), device)
    setup = time.perf_counter() - started
    trainer = LoraTrainer(model, sample, ["calibration"] * len(sample), replace(settings, epochs=1, grad_accum=1),
                          pad_token_id, device)
    trainer.run_epoch(1)  # warm-up call (allocations), then the timed one
    started = time.perf_counter()
    trainer.run_epoch(1)
    train = (time.perf_counter() - started) / padded_tokens(np.array([len(e.input_ids) for e in sample]), len(sample))
    eval_batch = [pool_encoded[i] for i in order[len(order) // 2 : len(order) // 2 + eval_batch_size]]
    model.eval()
    batch = {k: v.to(device) for k, v in collate(eval_batch, pad_token_id).items()}
    started = time.perf_counter()
    with torch.no_grad():
        forward_response(model, batch)
    evaluation = (time.perf_counter() - started) / padded_tokens(np.array([len(e.input_ids) for e in eval_batch]),
                                                                   len(eval_batch))
    return Speed(setup, train, evaluation)


def unit_seconds(speed: Speed, settings: TrainSettings, pool_encoded: list[Encoded], target_encoded: dict,
                 store: SubsetStore, sample_units: list[int], measure_pool: bool, eval_batch_size: int = 16) -> float:
    """Expected seconds of a unit of ``sample_units`` on average (training tokens x epochs, then the
    evaluation's tokens; generation for judges is not counted)."""
    lengths = np.array([len(e.input_ids) for e in pool_encoded])
    train_tokens = np.mean([padded_tokens(lengths[store.mask(u)], settings.batch_size, shuffle=True)
                            for u in sample_units[:32]]) * settings.epochs
    eval_tokens = padded_tokens(lengths, eval_batch_size) * measure_pool + sum(
        padded_tokens(np.array([len(e.input_ids) for e in encoded]), eval_batch_size)
        + padded_tokens(np.array([len(c.input_ids) for options in choices
                                  if options and not single_token_choices(options) for c in options]), eval_batch_size)
        for encoded, choices, _ in target_encoded.values())
    return float(speed.setup + train_tokens * speed.train_token + eval_tokens * speed.eval_token)
