"""The LoRA warm-up: a short training run on a random fraction of the pool (LESS, step 1).

It keeps a checkpoint per epoch (adapter, Adam moments by parameter name, mean learning rate), and
records per-example training dynamics at every presentation (loss, response-token accuracy, exact
match), which forgetting-event statistics are computed from.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from ..config import check, setting
from ..core.locks import LOCK_FILE, writer_lock
from ..core.storage import check_writable
from ..data.formats import (
    Columns,
    Example,
    demo_pool_files,
    examples_from_records,
    load_pool,
    resolved_source,
    source_sha256,
    write_records,
)
from ..data.templates import Encoded, collate, encode_example
from ..errors import InfluenceError, RunError
from ..models.loading import (
    ModelLoading,
    add_lora,
    check_model_name,
    choose_device,
    load_base_model,
    model_fingerprint,
    place,
    tokenizer_fingerprint,
)
from ..models.losses import forward_response
from ..progress import progress_bar
from .loop import LoraTrainer, TrainingDiverged, TrainSettings, token_accuracy
from .run import Run, atomic_write, package_versions, provenance, save_checkpoint, write_manifest


@dataclass(kw_only=True)
class WarmupConfig(TrainSettings):
    """Warm-up settings: the training settings (LESS's defaults, see :class:`TrainSettings`), the model,
    the pool, the output folder and the random fraction of the pool to train on (LESS: 5%)."""

    model: str = setting("smollm2-135m", "Hugging Face id, local folder, 'smollm2-135m' (embedded) or 'tiny-llama' "
                                         "(tests).")
    train_files: list[str] = setting(
        default_factory=list, flag="train", multiple=True,
        help="Pool data: a file (.jsonl, .json, .tsv, each also .gz; .parquet; .csv), a Hugging Face save_to_disk folder "
             "(folder:split for one split) or hf:<org>/<name>[:<split>]; repeat for several. A file whose fields have other "
             "names takes its own mapping after it: FILE:prompt=question,response=answer (or :messages=turns). "
             "Default: the embedded demo pool.")
    out: str = setting(help="Output directory to create.", path={"file_okay": False})
    fraction: float = field(default=0.05, metadata={"help": "Random fraction of the pool to warm up on.", "min": 0,
                                                    "min_open": True, "max": 1})
    track_all: bool = field(default=False, metadata={
        "help": "Evaluate the whole pool after every epoch (training dynamics and forgetting for every example)."})
    fsdp: bool = field(default=False, metadata={
        "help": "Under torchrun: shard the base weights, adapters and Adam moments over the processes (PyTorch FSDP2) "
                "instead of DDP, for a base model too large for one device. Same optimisation; whole checkpoints."})
    loading: ModelLoading = field(default_factory=ModelLoading, metadata={"prefix": ""})
    columns: Columns = field(default_factory=Columns, metadata={"prefix": ""})


@dataclass(kw_only=True)
class WarmupRun:
    """How a ``warmup`` command runs (not what it trains: that is :class:`WarmupConfig`)."""

    resume: bool = setting(False, "Continue an interrupted run in --out after its last checkpoint (its own settings; "
                                  "a flag given that differs from them is refused).")
    dry_run: bool = setting(False, "Print the cost (a training step timed here) and stop; writes nothing.")


def sample_fraction(n: int, fraction: float, seed: int) -> np.ndarray:
    """Indices of a random ``fraction`` of ``n`` examples (at least one), sorted, reproducible."""
    count = max(1, round(n * fraction))
    return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))


def encode_all(examples: list[Example], tokenizer, max_length: int) -> tuple[list[Encoded], int]:
    """Encode examples; returns the encodings and how many were truncated."""
    encoded = [encode_example(e, tokenizer, max_length) for e in examples]
    return encoded, sum(e.truncated for e in encoded)


@torch.no_grad()
def evaluate_pool(model, encoded: list[Encoded], ids: list[str], pad_token_id: int, batch_size: int,
                  device, epoch: int, step: int, progress: bool, trainer: LoraTrainer) -> list[dict]:
    """Forward-only dynamics of every example (dropout off): the ``eval`` presentations. Processes
    training together share the batches and gather the rows; sharded, each runs as many forward passes
    as the busiest (they are collective), the extra ones discarded."""
    was_training = model.training
    model.eval()
    rows = []
    starts = trainer.share(list(range(0, len(encoded), batch_size)))
    for start in progress_bar(starts, desc=f"track-all epoch {epoch}", disable=not progress):
        part = encoded[start or 0 : (start or 0) + batch_size]
        batch = {k: v.to(device) for k, v in collate(part, pad_token_id).items()}
        forward = forward_response(model, batch)
        if start is None:  # a pass only to join the collective forward
            continue
        accuracy, exact = token_accuracy(forward)
        for j in range(len(part)):
            rows.append({"phase": "eval", "epoch": epoch, "step": step, "id": ids[start + j],
                         "loss": float(forward.losses[j]), "token_accuracy": float(accuracy[j]),
                         "exact_match": bool(exact[j]), "_order": start + j})
    model.train(was_training)
    return trainer.gathered(rows)


def _config_dict(config: WarmupConfig) -> dict:
    return asdict(config)


# Settings of the launch, not of the optimisation: a run may resume with others.
RESUMABLE_CHANGES = {"out", "fsdp"}


def _check_resumable(out: Path, config: WarmupConfig) -> dict:
    """The manifest of an interrupted run with the same settings, or a RunError naming what differs."""
    manifest = Run(out).manifest
    saved = manifest["config"]
    # settings added since: absent from older runs' manifests
    defaults = {"loading": asdict(ModelLoading()), "columns": asdict(Columns())}
    for key, value in _config_dict(config).items():
        if key in RESUMABLE_CHANGES or json.loads(json.dumps(value)) == saved.get(key, defaults.get(key)):
            continue
        raise RunError(f"{out}: cannot resume: setting '{key}' is {value!r} here but {saved.get(key)!r} in the run")
    for entry in manifest["train_files"]:
        if source_sha256(entry["path"]) != entry["sha256"]:
            raise RunError(f"{entry['path']}: training file changed since the run started; cannot resume")
    return manifest


def warmup(config: WarmupConfig, progress: bool = True, resume: bool = False, dry_run: bool = False,
           records: list[dict] | None = None) -> Run | None:
    """Run the warm-up and return the run directory.

    ``records``: an in-memory pool (dicts in any supported format) instead of ``config.train_files``;
    they are written to ``<out>/pool.jsonl``, which the run then reads like any pool file.

    Refuses to overwrite an existing run; with ``resume`` an interrupted run with the same settings
    continues after its last complete checkpoint (adapter, Adam state, scheduler, RNG and dynamics are
    restored, so the result equals an uninterrupted run). With ``progress`` it prints the cost first (a
    training step timed here); ``dry_run`` prints it and stops, writing nothing.
    """
    try:
        check(config)
    except InfluenceError as err:
        raise InfluenceError(f"invalid warm-up settings: {err}") from None
    check_model_name(config.model)
    if records is None and not config.train_files:
        config = replace(config, train_files=demo_pool_files())
    if records is not None:
        if config.train_files:
            raise InfluenceError("give the pool as records or as train_files, not both")
        examples_from_records(records, "pool.jsonl", config.columns)  # validated before anything is written
        if not dry_run:
            config = replace(config, train_files=[str(_records_file(Path(config.out), records, resume))])
    pool = load_pool(config.train_files, config.columns) if records is None or not dry_run else \
        examples_from_records(records, "pool.jsonl", config.columns)  # validates every file before anything is written
    if dry_run:
        print(_estimate(config, pool), file=sys.stderr, flush=True)
        return None
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a folder")
    if out.is_dir() and not (out / "manifest.json").exists() and {p.name for p in out.iterdir()} - RETRYABLE_LEFTOVERS:
        raise RunError(f"{out}: exists and is not an influence run; choose an empty or new folder")
    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    # Under torchrun / accelerate launch the processes train together and the first one writes the run.
    with writer_lock(out, "warmup") if launch_rank() == 0 else contextlib.nullcontext():
        run = _warmup(config, pool, out, progress, resume)
    if launch_world_size() > 1:
        # FSDP2's sharded modules sit in reference cycles: left to the interpreter's exit, they are freed
        # after gloo's threads and the process aborts ("terminate called without an active exception").
        gc.collect()
    return run


def launch_rank() -> int:
    """This process's rank in a torchrun / accelerate launch (0 outside one)."""
    return int(os.environ.get("RANK", "0"))


def launch_world_size() -> int:
    """How many processes the torchrun / accelerate launch started (1 outside one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def seconds_per_token(trainer: LoraTrainer, encoded: list[Encoded]) -> float:
    """One training step's forward and backward on a batch of median-length examples, timed (after a
    warm-up call) per padded token. The RNG is restored and the gradients dropped: training is unchanged."""
    order = np.argsort([len(e.input_ids) for e in encoded])
    middle = [encoded[i] for i in order[len(order) // 2 : len(order) // 2 + trainer.settings.batch_size]]
    batch = {k: v.to(trainer.device) for k, v in collate(middle, trainer.pad_token_id).items()}
    was_training = trainer.model.training
    trainer.model.train()
    with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
        for _ in range(2):  # the second call is timed
            started = time.perf_counter()
            forward_response(trainer.model, batch).losses.sum().backward()
            trainer.model.zero_grad(set_to_none=True)
    trainer.model.train(was_training)
    return (time.perf_counter() - started) / (max(len(e.input_ids) for e in middle) * len(middle))


def _cost_text(trainer: LoraTrainer, encoded: list[Encoded], config: WarmupConfig) -> str:
    from .loop import padded_tokens

    per_token = seconds_per_token(trainer, encoded)
    lengths = np.array([len(e.input_ids) for e in encoded])
    seconds = per_token * padded_tokens(lengths, config.batch_size, shuffle=True) * config.epochs
    return (f"warm-up: {len(encoded)} examples x {config.epochs} epochs ({trainer.total_steps} optimizer steps), "
            f"~{per_token * 1e3:.2f} ms per token measured here: ~{seconds / 60:.1f} min")


def _estimate(config: WarmupConfig, pool: list[Example]) -> str:
    """The cost of the warm-up ``config`` describes, measured on a throwaway adapter."""
    device = choose_device()
    model, tokenizer = load_base_model(config.model, config.loading.resolved(device), device)
    chosen = sample_fraction(len(pool), config.fraction, config.seed)
    encoded, _ = encode_all([pool[i] for i in chosen], tokenizer, config.max_length)
    model, device = place(add_lora(model, config.lora, config.seed), device)
    trainer = LoraTrainer(model, encoded, [pool[i].id for i in chosen], config, tokenizer.pad_token_id, device)
    return _cost_text(trainer, encoded, config)


def _records_file(out: Path, records: list[dict], resume: bool) -> Path:
    """``out/pool.jsonl`` holding ``records``: written once; never over another run or other content."""
    target = out / "pool.jsonl"
    if (out / "manifest.json").is_file() and not resume:
        raise RunError(f"{out}: a run already exists here; use --resume, another --out, or delete it")
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a folder")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if target.is_file() and target.read_text(encoding="utf-8") != text:
        raise RunError(f"{target}: exists with other records; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return target if target.is_file() else write_records(records, target)


# What an interrupted first start leaves in a run folder: a retry may go ahead over them.
RETRYABLE_LEFTOVERS = {LOCK_FILE, "manifest.json.tmp", "pool.jsonl"}


def _warmup(config: WarmupConfig, pool: list[Example], out: Path, progress: bool, resume: bool) -> Run:
    previous = None
    if (out / "manifest.json").exists():
        if not resume:
            raise RunError(f"{out}: a run already exists here; use --resume, another --out, or delete it")
        previous = _check_resumable(out, config)
    elif {p.name for p in out.iterdir()} - RETRYABLE_LEFTOVERS:
        raise RunError(f"{out}: exists and is not an influence run; choose an empty or new folder")
    chosen = sample_fraction(len(pool), config.fraction, config.seed)
    examples = [pool[i] for i in chosen]

    device = choose_device()
    loading = config.loading.resolved(device)
    model, tokenizer = load_base_model(config.model, loading, device)
    encoded, n_truncated = encode_all(examples, tokenizer, config.max_length)
    fingerprint = model_fingerprint(config.model, model)
    if previous is not None and previous.get("tokenizer") not in (None, tokenizer_fingerprint(tokenizer)):
        raise RunError(f"{out}: cannot resume: the tokenizer or chat format differs from the run's "
                       f"({tokenizer_fingerprint(tokenizer)} vs {previous['tokenizer']})")
    if previous is not None and previous.get("model_fingerprint") != fingerprint:
        raise RunError(f"{out}: cannot resume: the weights of --model {config.model} differ from those the run "
                       f"started with ({fingerprint} vs {previous.get('model_fingerprint')})")
    model = add_lora(model, config.lora, config.seed)
    if not (config.fsdp and launch_world_size() > 1):  # sharded: each unit moves to the device as it is
        model, device = place(model, device)            # sharded, so the whole model never sits on one GPU
    trainer = LoraTrainer(model, encoded, [e.id for e in examples], config, tokenizer.pad_token_id, device,
                          data_parallel=True, shard=config.fsdp)
    if progress and previous is None and (trainer.is_main or trainer.sharded):  # sharded: every process times it
        cost = _cost_text(trainer, encoded, config)
        if trainer.is_main:
            print(cost, file=sys.stderr, flush=True)
    progress = progress and trainer.is_main
    if config.fsdp and not trainer.sharded and progress:
        print("note: --fsdp shards over the processes of a torchrun launch; one process holds the whole model",
              file=sys.stderr, flush=True)

    done_epochs = 0
    if previous is not None:
        if previous["checkpoints"]:
            last = Run(out).checkpoints()[-1]
            done_epochs = last.epoch
            exp_avg, exp_avg_sq, _ = last.adam_moments()
            trainer.restore(load_file(str(last.adapter_file)), exp_avg, exp_avg_sq, last.step, last.rng_state())
        if done_epochs >= config.epochs:
            return Run(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = previous or {
        "kind": "influence-run",
        "run_id": uuid.uuid4().hex,  # what the run's stores and rankings record, so no other run takes them
        "model": config.model,
        "model_fingerprint": fingerprint,
        "model_loading": asdict(loading),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "config": _config_dict(config),
        "train_files": [{"path": resolved_source(p), "sha256": source_sha256(p)} for p in config.train_files],
        "pool_size": len(pool),
        "warmup_ids": [e.id for e in examples],
        "n_truncated": n_truncated,
        "steps": {"per_epoch": trainer.steps_per_epoch, "total": trainer.total_steps, "warmup": trainer.warmup_steps},
        "versions": package_versions(),
        **provenance(),
        "device": str(device),
        "checkpoints": [],
    }
    manifest["processes"] = trainer.processes  # of this start (a resumed run may use another number)
    manifest["sharded"] = trainer.sharded
    if trainer.is_main:
        write_manifest(out, manifest)

    dynamics: list[dict] = []
    if done_epochs:
        dynamics = pd.read_parquet(out / "dynamics.parquet").to_dict("records")
        dynamics = [d for d in dynamics if d["epoch"] <= done_epochs]
    pool_encoded: list[Encoded] | None = None
    started = time.time()
    bar = progress_bar(total=trainer.total_steps, initial=trainer.step, desc="warmup", unit="step", disable=not progress)
    for epoch in range(done_epochs + 1, config.epochs + 1):
        try:
            rows, epoch_lrs = trainer.run_epoch(epoch, bar)
        except TrainingDiverged as err:
            raise RunError(f"{out}: {err}") from None
        dynamics += rows
        step = trainer.step
        if config.track_all:
            if pool_encoded is None:
                pool_encoded, _ = encode_all(pool, tokenizer, config.max_length)
            dynamics += evaluate_pool(model, pool_encoded, [e.id for e in pool], tokenizer.pad_token_id,
                                      max(config.batch_size, 8), device, epoch, step, progress, trainer)
        state = trainer.whole_state()  # sharded: gathered by every process
        if trainer.is_main:
            checkpoint = save_checkpoint(out, model, trainer.optimizer, state, epoch, step, float(np.mean(epoch_lrs)))
            atomic_write(out / "dynamics.parquet", lambda path: pd.DataFrame(dynamics).to_parquet(path, index=False))
            manifest["checkpoints"].append(
                {"name": checkpoint.name, "epoch": epoch, "step": step, "mean_lr": checkpoint.mean_lr}
            )
            write_manifest(out, manifest)
    bar.close()
    manifest["wall_seconds"] = round(time.time() - started, 1)
    if trainer.is_main:
        write_manifest(out, manifest)
    trainer.accelerator.wait_for_everyone()  # the run is complete on disk when any process returns
    return Run(out)

