"""The LoRA warm-up: a short training run on a random fraction of the pool (LESS, step 1).

It keeps a checkpoint per epoch (adapter, Adam moments by parameter name, mean learning rate), and
records per-example training dynamics at every presentation (loss, response-token accuracy, exact
match), which forgetting-event statistics are computed from.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data import Example, file_sha256, load_pool
from ..errors import InfluenceError, RunError
from ..losses import ResponseForward, forward_response
from ..models import LoraSettings, add_lora, check_model_name, choose_device, load_base_model, lora_parameters, model_fingerprint
from ..run import Run, atomic_write, package_versions, save_checkpoint, write_manifest
from ..store import LOCK_FILE, writer_lock
from ..templates import Encoded, collate, encode_example

LOSS_WEIGHTINGS = ("micro_batch", "token")


@dataclass
class WarmupConfig:
    """Warm-up settings; defaults are LESS's: ``less/scripts/train/base_training_args.sh`` on top of the
    Hugging Face Trainer defaults of the version LESS pins (transformers 4.36.2).

    LESS's flags: 4 epochs, lr 2e-5, linear schedule, 3% warm-up, weight decay 0, AdamW (torch),
    batch 1 x 32 accumulation, LoRA r=128/alpha=512/dropout 0.1 on q/k/v/o, 5% of the pool. Trainer
    defaults: betas (0.9, 0.999), eps 1e-8, gradient-norm clipping at ``max_grad_norm = 1.0``, warm-up
    steps ``ceil(ratio * total)``, and, under accumulation, each forward pass's mean token loss divided
    by the accumulation steps (``loss_weighting = "micro_batch"``: with batch 1 every example weighs the
    same; ``"token"`` weighs every response token of the step the same, as transformers >= 4.46 does).

    Deliberate differences: an optimizer step is also taken on the last, partial accumulation window
    of an epoch (transformers 4.36 carries it over into the next epoch), so each per-epoch checkpoint
    holds exactly that epoch's updates; we train in fp32 by default (``bf16`` autocasts the forward).
    """

    model: str
    train_files: list[str]
    out: str
    lora: LoraSettings = field(default_factory=LoraSettings)
    fraction: float = 0.05
    epochs: int = 4
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.03
    batch_size: int = 1
    grad_accum: int = 32
    max_length: int = 2048
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    loss_weighting: str = "micro_batch"
    bf16: bool = False
    track_all: bool = False  # evaluate the whole pool after every epoch (forgetting on every example)

    def check(self) -> None:
        """Refuse out-of-range settings before any work, naming the option."""
        problems = []
        if not 0 < self.fraction <= 1:
            problems.append(f"--fraction must be in (0, 1], got {self.fraction}")
        for name, value in (("epochs", self.epochs), ("batch-size", self.batch_size),
                            ("grad-accum", self.grad_accum), ("max-length", self.max_length)):
            if value < 1:
                problems.append(f"--{name} must be at least 1, got {value}")
        if not self.learning_rate > 0:
            problems.append(f"--lr must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            problems.append("--weight-decay and --max-grad-norm must not be negative")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            problems.append(f"--loss-weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {self.loss_weighting!r}")
        problems += self.lora.problems()
        if problems:
            raise InfluenceError("invalid warm-up settings: " + "; ".join(problems))


def sample_fraction(n: int, fraction: float, seed: int) -> np.ndarray:
    """Indices of a random ``fraction`` of ``n`` examples (at least one), sorted, reproducible."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    count = max(1, round(n * fraction))
    return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))


def encode_all(examples: list[Example], tokenizer, max_length: int) -> tuple[list[Encoded], int]:
    """Encode examples; returns the encodings and how many were truncated."""
    encoded = [encode_example(e, tokenizer, max_length) for e in examples]
    return encoded, sum(e.truncated for e in encoded)


def step_loss(forward: ResponseForward, step_tokens: int, config: WarmupConfig) -> torch.Tensor:
    """This forward pass's share of the optimizer step's loss (see ``WarmupConfig.loss_weighting``)."""
    if config.loss_weighting == "token":
        return (forward.losses * forward.counts).sum() / max(step_tokens, 1)
    # Trainer 4.36: the model's loss is the mean over the pass's response tokens; accelerate divides
    # it by the accumulation steps.
    mean = (forward.losses * forward.counts).sum() / forward.counts.sum().clamp(min=1)
    return mean / config.grad_accum


def token_accuracy(forward: ResponseForward) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: fraction of response tokens predicted by argmax, and whether all were."""
    accuracy = forward.per_example((forward.logits.argmax(dim=-1) == forward.targets).float())
    return accuracy, accuracy == 1


def _restore(model, optimizer, scheduler, checkpoint, by_name: dict, device) -> None:
    """Load a checkpoint's adapter, Adam state, scheduler position and RNG state into a fresh run."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(checkpoint.adapter_file)))
    exp_avg, exp_avg_sq, _ = checkpoint.adam_moments()
    for name, param in by_name.items():
        optimizer.state[param] = {
            "step": torch.tensor(float(checkpoint.step)),
            "exp_avg": exp_avg[name].to(device),
            "exp_avg_sq": exp_avg_sq[name].to(device),
        }
    with warnings.catch_warnings():  # replaying the schedule without optimizer steps is intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(checkpoint.step):
            scheduler.step()
    torch.set_rng_state(checkpoint.rng_state())


@torch.no_grad()
def evaluate_pool(model, encoded: list[Encoded], ids: list[str], pad_token_id: int, batch_size: int,
                  device, epoch: int, step: int, progress: bool) -> list[dict]:
    """Forward-only dynamics of every example (dropout off): the ``eval`` presentations."""
    was_training = model.training
    model.eval()
    rows = []
    for start in tqdm(range(0, len(encoded), batch_size), desc=f"track-all epoch {epoch}", disable=not progress):
        part = encoded[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(part, pad_token_id).items()}
        forward = forward_response(model, batch)
        accuracy, exact = token_accuracy(forward)
        for j in range(len(part)):
            rows.append({"phase": "eval", "epoch": epoch, "step": step, "id": ids[start + j],
                         "loss": float(forward.losses[j]), "token_accuracy": float(accuracy[j]),
                         "exact_match": bool(exact[j])})
    model.train(was_training)
    return rows


def _config_dict(config: WarmupConfig) -> dict:
    return {**asdict(config), "lora": config.lora.to_dict()}


def _check_resumable(out: Path, config: WarmupConfig) -> dict:
    """The manifest of an interrupted run with the same settings, or a RunError naming what differs."""
    manifest = Run(out).manifest
    saved = manifest["config"]
    for key, value in _config_dict(config).items():
        if key == "out" or json.loads(json.dumps(value)) == saved.get(key):
            continue
        raise RunError(f"{out}: cannot resume: setting '{key}' is {value!r} here but {saved.get(key)!r} in the run")
    for entry in manifest["train_files"]:
        if file_sha256(entry["path"]) != entry["sha256"]:
            raise RunError(f"{entry['path']}: training file changed since the run started; cannot resume")
    return manifest


def warmup(config: WarmupConfig, progress: bool = True, resume: bool = False) -> Run:
    """Run the warm-up and return the run directory.

    Refuses to overwrite an existing run; with ``resume`` an interrupted run with the same settings
    continues after its last complete checkpoint (adapter, Adam state, scheduler, RNG and dynamics are
    restored, so the result equals an uninterrupted run).
    """
    config.check()
    check_model_name(config.model)
    pool = load_pool(config.train_files)  # validates every file before anything is written
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out, "warmup"):
        return _warmup(config, pool, out, progress, resume)


# What an interrupted first start leaves in a run folder: a retry may go ahead over them.
RETRYABLE_LEFTOVERS = {LOCK_FILE, "manifest.json.tmp"}


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
    model, tokenizer = load_base_model(config.model)
    encoded, n_truncated = encode_all(examples, tokenizer, config.max_length)
    fingerprint = model_fingerprint(config.model, model)
    if previous is not None and previous.get("model_fingerprint") != fingerprint:
        raise RunError(f"{out}: cannot resume: the weights of --model {config.model} differ from those the run "
                       f"started with ({fingerprint} vs {previous.get('model_fingerprint')})")
    model = add_lora(model, config.lora, config.seed).to(device)
    model.train()
    params = {p: n for n, p in lora_parameters(model).items()}

    optimizer = torch.optim.AdamW(
        list(params), lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay
    )
    per_step = config.batch_size * config.grad_accum
    steps_per_epoch = math.ceil(len(examples) / per_step)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)

    done_epochs = 0
    if previous is not None:
        if previous["checkpoints"]:
            last = Run(out).checkpoints()[-1]
            done_epochs = last.epoch
            _restore(model, optimizer, scheduler, last, {n: p for p, n in params.items()}, device)
        if done_epochs >= config.epochs:
            return Run(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = previous or {
        "kind": "influence-run",
        "model": config.model,
        "model_fingerprint": fingerprint,
        "config": _config_dict(config),
        "train_files": [{"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for p in config.train_files],
        "pool_size": len(pool),
        "warmup_ids": [e.id for e in examples],
        "n_truncated": n_truncated,
        "steps": {"per_epoch": steps_per_epoch, "total": total_steps, "warmup": warmup_steps},
        "versions": package_versions(),
        "device": str(device),
        "checkpoints": [],
    }
    write_manifest(out, manifest)

    dynamics: list[dict] = []
    if done_epochs:
        dynamics = pd.read_parquet(out / "dynamics.parquet").to_dict("records")
        dynamics = [d for d in dynamics if d["epoch"] <= done_epochs]
    pool_encoded: list[Encoded] | None = None
    step = steps_per_epoch * done_epochs
    started = time.time()
    bar = tqdm(total=total_steps, initial=step, desc="warmup", unit="step", disable=not progress)
    for epoch in range(done_epochs + 1, config.epochs + 1):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        epoch_lrs = []
        for start in range(0, len(order), per_step):
            step_indices = order[start : start + per_step].tolist()
            n_tokens = sum(encoded[i].n_response_tokens for i in step_indices)
            for micro in range(0, len(step_indices), config.batch_size):
                indices = step_indices[micro : micro + config.batch_size]
                batch = {k: v.to(device) for k, v in collate([encoded[i] for i in indices], tokenizer.pad_token_id).items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    forward = forward_response(model, batch)
                losses = forward.losses
                if not torch.isfinite(losses).all():
                    raise RunError(
                        f"{out}: the training loss became non-finite at epoch {epoch}, step {step + 1} "
                        f"(learning rate {optimizer.param_groups[0]['lr']:.3g}); the adapters would be "
                        "NaN. Lower --lr, or check the data; nothing after the last checkpoint was kept"
                    )
                step_loss(forward, n_tokens, config).backward()
                with torch.no_grad():
                    accuracy, exact = token_accuracy(forward)
                del forward
                for j, i in enumerate(indices):
                    dynamics.append(
                        {
                            "phase": "train",
                            "epoch": epoch,
                            "step": step + 1,
                            "id": examples[i].id,
                            "loss": float(losses[j].detach()),
                            "token_accuracy": float(accuracy[j]),
                            "exact_match": bool(exact[j]),
                        }
                    )
            epoch_lrs.append(optimizer.param_groups[0]["lr"])
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(params), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            recent = [d["loss"] for d in dynamics[-per_step:]]
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(recent):.3f}", lr=f"{epoch_lrs[-1]:.2e}")
            bar.update(1)
        if config.track_all:
            if pool_encoded is None:
                pool_encoded, _ = encode_all(pool, tokenizer, config.max_length)
            dynamics += evaluate_pool(model, pool_encoded, [e.id for e in pool], tokenizer.pad_token_id,
                                      max(config.batch_size, 8), device, epoch, step, progress)
        checkpoint = save_checkpoint(out, model, optimizer, params, epoch, step, float(np.mean(epoch_lrs)))
        atomic_write(out / "dynamics.parquet", lambda path: pd.DataFrame(dynamics).to_parquet(path, index=False))
        manifest["checkpoints"].append(
            {"name": checkpoint.name, "epoch": epoch, "step": step, "mean_lr": checkpoint.mean_lr}
        )
        write_manifest(out, manifest)
    bar.close()
    manifest["wall_seconds"] = round(time.time() - started, 1)
    write_manifest(out, manifest)
    return Run(out)

