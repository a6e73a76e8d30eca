"""The one training primitive: LoRA fine-tuning of a causal LM on encoded examples, epoch by epoch.

The warm-up (checkpoints with Adam moments, per-presentation dynamics) and the models of the
counterfactual engine (one per random subset of the pool) both train through :class:`LoraTrainer`,
with the settings of :class:`TrainSettings`. Its defaults are LESS's: ``less/scripts/train/
base_training_args.sh`` on top of the Hugging Face Trainer defaults of the version LESS pins
(transformers 4.36.2).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..data.templates import Encoded, collate
from ..errors import InfluenceError
from ..models.loading import LoraSettings, lora_parameters
from ..models.losses import ResponseForward, forward_response
from .run import TrainedState

LossWeighting = Literal["micro_batch", "token"]
Scheduler = Literal["linear", "cosine"]


@dataclass(kw_only=True)
class TrainSettings:
    """How a LoRA adapter is trained; defaults are LESS's.

    LESS's flags: 4 epochs, lr 2e-5, linear schedule (``scheduler = "cosine"`` for the other common one),
    3% warm-up, weight decay 0, AdamW (torch),
    batch 1 x 32 accumulation, LoRA r=128/alpha=512/dropout 0.1 on q/k/v/o. Trainer defaults: betas
    (0.9, 0.999), eps 1e-8, gradient-norm clipping at ``max_grad_norm = 1.0``, warm-up steps
    ``ceil(ratio * total)``, and, under accumulation, each forward pass's mean token loss divided by
    the accumulation steps (``loss_weighting = "micro_batch"``: with batch 1 every example weighs the
    same; ``"token"`` weighs every response token of the step the same, as transformers >= 4.46 does).

    Deliberate differences: an optimizer step is also taken on the last, partial accumulation window
    of an epoch (transformers 4.36 carries it over into the next epoch), so each per-epoch checkpoint
    holds exactly that epoch's updates; we train in fp32 by default (``bf16`` autocasts the forward).
    """

    lora: LoraSettings = field(default_factory=LoraSettings)
    epochs: int = field(default=4, metadata={"help": "Epochs of training.", "min": 1})
    learning_rate: float = field(default=2e-5, metadata={"flag": "lr", "aliases": ("learning-rate",),
                                                         "help": "Peak learning rate (linear decay).",
                                                         "min": 0, "min_open": True})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of steps with linear LR warm-up.",
                                                        "min": 0, "max": 1, "max_open": True})
    batch_size: int = field(default=1, metadata={"help": "Examples per forward pass.", "min": 1})
    grad_accum: int = field(default=32, metadata={
        "help": "Forward passes per optimizer step (shared between the processes of a torchrun launch).", "min": 1})
    max_length: int = field(default=2048, metadata={"help": "Truncate examples to this many tokens.", "min": 1})
    seed: int = field(default=0, metadata={
        "help": "Seed of the random subset (where one is drawn), the LoRA initialisation and the data order."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay.", "min": 0})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "Clip the gradient norm of each optimizer step (the Trainer default LESS trains with); 0 = off.",
        "min": 0})
    loss_weighting: LossWeighting = field(default="micro_batch", metadata={
        "help": "Under accumulation: each forward pass's mean loss / accumulation steps (Trainer 4.36, LESS) or "
                "every response token of the step weighted alike (Trainer >= 4.46)."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast for the forward pass."})
    scheduler: Scheduler = field(default="linear", metadata={
        "help": "Learning-rate decay after the warm-up steps (transformers' schedules)."})


def step_loss(forward: ResponseForward, step_tokens: int, settings: TrainSettings,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """This forward pass's share of the optimizer step's loss (see ``TrainSettings.loss_weighting``), with each
    example's loss multiplied by its weight where ``weights`` are given (the data weights metagradients differentiate
    by; the normalisers stay the unweighted token counts, so weight 0 removes an example's loss and nothing else)."""
    summed = forward.losses * forward.counts
    if weights is not None:
        summed = summed * weights.to(summed.dtype)
    if settings.loss_weighting == "token":
        return summed.sum() / max(step_tokens, 1)
    # Trainer 4.36: the model's loss is the mean over the pass's response tokens; accelerate divides
    # it by the accumulation steps.
    mean = summed.sum() / forward.counts.sum().clamp(min=1)
    return mean / settings.grad_accum


def token_accuracy(forward: ResponseForward) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: fraction of response tokens predicted by argmax, and whether all were."""
    accuracy = forward.per_example((forward.logits.argmax(dim=-1) == forward.targets).float())
    return accuracy, accuracy == 1


class TrainingDiverged(InfluenceError):
    """The training loss became NaN/inf: the adapter would be NaN."""


class LoraTrainer:
    """AdamW with a linear warm-up/decay schedule over the LoRA parameters of a peft model, on
    Hugging Face ``accelerate``.

    ``run_epoch(epoch)`` makes one pass over ``encoded`` in an order seeded by (seed, epoch) and
    returns one dynamics row per presentation (loss, response-token accuracy, exact match). The
    optimizer state is keyed by parameter name (:attr:`names`) so checkpoints can be restored.

    ``data_parallel``: under ``torchrun`` / ``accelerate launch`` the processes train one model
    together (DDP through ``Accelerator.prepare_model``). The settings describe the optimisation, not
    the launch: an optimizer step still takes ``batch_size x grad_accum`` examples, its micro-batches
    shared round-robin between the processes, and dropout is seeded per micro-batch, so N processes
    follow the one-process run up to float rounding (and a run may resume on another number of them).
    Without it (the subset models: one whole model per worker) every process trains alone.

    ``shard`` (with ``data_parallel``, on several processes): PyTorch FSDP2 instead of DDP (see
    :func:`shard_model`): each process holds 1/N of the base weights, adapters and Adam moments, so a
    base model too large for one device trains; the optimisation is the same. Checkpoints hold whole
    tensors (:meth:`whole_state` gathers them), so runs resume sharded or not, on any number of processes.
    """

    def __init__(self, model, encoded: list[Encoded], ids: list[str], settings: TrainSettings, pad_token_id: int,
                 device: torch.device, data_parallel: bool = False, shard: bool = False,
                 weights: np.ndarray | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        self.model, self.encoded, self.ids, self.settings = model, encoded, ids, settings
        # Per-example loss weights (aligned with ``encoded``): None trains as before, bit for bit.
        self.weights = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if self.weights is not None and len(self.weights) != len(encoded):
            raise InfluenceError(f"{len(self.weights)} example weights for {len(encoded)} training examples")
        # Called with the trainer just before each optimizer step (the step's gradient summed, not yet clipped):
        # how a replay (influence.train.metagrad) records the states it differentiates through.
        self.before_step: Callable[[LoraTrainer], None] | None = None
        self.pad_token_id, self.device = pad_token_id, device
        # One per process; under torchrun / accelerate launch it joins the launch's process group
        # (gloo between CPU processes, NCCL between GPUs).
        self.accelerator = Accelerator(cpu=device.type == "cpu")
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise InfluenceError(
                f"accelerate's {self.accelerator.distributed_type.value} launch configuration is not used: launch "
                "with `torchrun` or a plain `accelerate launch` and add --fsdp to shard the base weights, adapters and "
                "Adam moments over the processes (PyTorch FSDP2), or leave it out for DDP")
        self.processes = self.accelerator.num_processes if data_parallel else 1
        self.rank = self.accelerator.process_index if data_parallel else 0
        if self.processes > 1 and getattr(model, "hf_device_map", None):
            raise InfluenceError("--device-map splits one model over the GPUs of one process; it cannot be combined "
                                 "with several training processes (torchrun): use one or the other (or --fsdp)")
        self.sharded = shard and self.processes > 1
        # Several processes: the model sharded in place (FSDP2) or its DDP wrapper; one: the model itself.
        if self.sharded:
            self.trained = shard_model(model, device, self.processes)
        elif self.processes > 1:
            self.trained = self.accelerator.prepare_model(model, device_placement=False)
        else:
            self.trained = model
        self.names = {p: n for n, p in lora_parameters(model).items()}  # the checkpoints' keys of the moments
        self.model_names = {p: n for n, p in model.named_parameters() if p.requires_grad}  # peft's, for the adapter
        self.optimizer = torch.optim.AdamW(list(self.names), lr=settings.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=settings.weight_decay)
        self.per_step = settings.batch_size * settings.grad_accum
        self.steps_per_epoch = math.ceil(len(encoded) / self.per_step)
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.warmup_steps = math.ceil(settings.warmup_ratio * self.total_steps)
        from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

        schedule = get_cosine_schedule_with_warmup if settings.scheduler == "cosine" else get_linear_schedule_with_warmup
        self.scheduler = schedule(self.optimizer, self.warmup_steps, self.total_steps)
        self.step = 0
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the learning rate of the last optimizer step taken

    @property
    def parameter_names(self) -> dict[str, str]:
        """Each trained parameter's stable name (:attr:`names`' values) -> its name in the model (peft's)."""
        return {name: self.model_names[param] for param, name in self.names.items()}

    def adapter_keys(self) -> dict[str, str]:
        """Each trained parameter's stable name -> its key in a saved adapter's file (peft's, without the adapter's
        name)."""
        adapter_name = getattr(self.model, "active_adapter", "default")
        return {name: model_name.replace(f".{adapter_name}", "") for name, model_name in self.parameter_names.items()}

    @property
    def is_main(self) -> bool:
        """Whether this process writes the results (the only one outside a data-parallel launch)."""
        return self.rank == 0

    def restore(self, adapter: dict[str, torch.Tensor], exp_avg: dict[str, torch.Tensor],
                exp_avg_sq: dict[str, torch.Tensor], step: int, rng_state: torch.Tensor) -> None:
        """Continue from a checkpoint: adapter weights, Adam moments, schedule position, RNG state."""
        keys = self.adapter_keys()
        for param, name in self.names.items():
            key = keys[name]
            if key not in adapter or name not in exp_avg or name not in exp_avg_sq:
                raise InfluenceError(f"the checkpoint has no {key} or no Adam moments for it: it was written for "
                                     "another adapter (LoRA settings)")
            with torch.no_grad():
                param.copy_(like(param, adapter[key]))
            self.optimizer.state[param] = {
                "step": torch.tensor(float(step)),
                "exp_avg": like(param, exp_avg[name]),
                "exp_avg_sq": like(param, exp_avg_sq[name]),
            }
        with warnings.catch_warnings():  # replaying the schedule without optimizer steps is intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):
                self.scheduler.step()
        self.step = step
        torch.set_rng_state(rng_state)

    def whole_state(self) -> TrainedState:
        """The adapter and its Adam moments by parameter name, whole and on the CPU, for a checkpoint.
        Sharded, every process must call it (each tensor is gathered from all of them, in one order)."""
        weights, exp_avg, exp_avg_sq = {}, {}, {}
        for param, name in self.names.items():
            weights[self.model_names[param]] = whole(param.detach())
            state = self.optimizer.state.get(param, {})
            if "exp_avg" in state:
                exp_avg[name], exp_avg_sq[name] = whole(state["exp_avg"]), whole(state["exp_avg_sq"])
        return TrainedState(weights, exp_avg, exp_avg_sq)

    def share(self, items: list, at_least: int = 0) -> list:
        """This process's share of ``items``: every N-th from its rank (all of them on one process),
        then ``None`` for each pass it must run without an item of its own: up to ``at_least``, and,
        sharded, up to the busiest process's count (each forward pass is collective)."""
        mine = items[self.rank :: self.processes]
        rounds = max(-(-len(items) // self.processes) if self.sharded else len(mine), at_least)
        return mine + [None] * (rounds - len(mine))

    def epoch_steps(self, epoch: int) -> list[list[int]]:
        """The optimizer steps of one epoch, as indices into ``encoded``: an order seeded by (seed, epoch), cut into
        steps of ``batch_size x grad_accum`` examples (the last one possibly shorter)."""
        order = torch.randperm(len(self.encoded), generator=torch.Generator().manual_seed(self.settings.seed * 1000 + epoch))
        return [order[start : start + self.per_step].tolist() for start in range(0, len(order), self.per_step)]

    def micro_batches(self, step_indices: list[int]) -> list[tuple[int, list[int]]]:
        """This process's micro-batches of one optimizer step, as (position in the step, indices). A pass
        without one of its own (a short last step, or sharded) runs the first at weight 0 (position -1),
        so that every process joins the gradient sum."""
        size = self.settings.batch_size
        micro = [(j, step_indices[j : j + size]) for j in range(0, len(step_indices), size)]
        return [m if m is not None else (-1, micro[0][1]) for m in self.share(micro, at_least=1)]

    def dropout_seed(self, epoch: int, step: int, position: int) -> int:
        """Dropout's seed for one micro-batch: a function of where it is in training, not of which
        process runs it or of what ran before (resume and N processes see the same masks)."""
        return int(np.random.SeedSequence([self.settings.seed, epoch, step, position]).generate_state(1)[0])

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in collate([self.encoded[i] for i in indices], self.pad_token_id).items()}

    def example_weights(self, indices: list[int]) -> torch.Tensor | None:
        return None if self.weights is None else self.weights[indices].to(self.device)

    def run_epoch(self, epoch: int, bar=None, where: str = "") -> tuple[list[dict], list[float]]:
        """Train one epoch; returns (dynamics rows of every process, learning rate of each optimizer step)."""
        self.model.train()
        rows, lrs = [], []
        for first, step_indices in zip(range(0, len(self.encoded), self.per_step), self.epoch_steps(epoch)):
            rows += self.train_step(epoch, first, step_indices, where)
            lrs.append(self.last_lr)
            if bar is not None:
                recent = [d["loss"] for d in rows[-self.per_step:]]
                bar.set_postfix(epoch=epoch, loss=f"{np.mean(recent):.3f}", lr=f"{lrs[-1]:.2e}")
                bar.update(1)
        return self.gathered(rows), lrs

    def train_step(self, epoch: int, first: int, step_indices: list[int], where: str = "") -> list[dict]:
        """One optimizer step on ``step_indices`` (the ``first``-th example of the epoch on): this process's
        dynamics rows."""
        settings, encoded = self.settings, self.encoded
        cuda = [self.device] if self.device.type == "cuda" else []
        n_tokens = sum(encoded[i].n_response_tokens for i in step_indices)
        micro_batches = self.micro_batches(step_indices)
        finite = True
        rows = []
        for k, (position, indices) in enumerate(micro_batches):
            batch = self.batch(indices)
            # The processes' gradients are summed once per step: on the last micro-batch of each.
            synced = contextlib.nullcontext() if k == len(micro_batches) - 1 else self._no_sync()
            with synced, torch.random.fork_rng(devices=cuda):
                torch.manual_seed(self.dropout_seed(epoch, self.step, max(position, 0)))
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                    forward = forward_response(self.trained, batch)
                losses = forward.losses
                finite = finite and bool(torch.isfinite(losses).all())
                # DDP averages over processes: each contributes N times its share of the step's loss
                weight = 0.0 if position < 0 else float(self.processes)
                loss = step_loss(forward, n_tokens, settings, self.example_weights(indices))
                self.accelerator.backward(loss * weight)
            if position < 0:
                continue
            with torch.no_grad():
                accuracy, exact = token_accuracy(forward)
            del forward
            for j, i in enumerate(indices):
                rows.append({"phase": "train", "epoch": epoch, "step": self.step + 1, "id": self.ids[i],
                             "loss": float(losses[j].detach()), "token_accuracy": float(accuracy[j]),
                             "exact_match": bool(exact[j]), "_order": first + position + j})
        if not self._all_finite(finite):
            raise TrainingDiverged(
                f"{where + ': ' if where else ''}the training loss became non-finite at epoch {epoch}, step "
                f"{self.step + 1} (learning rate {self.optimizer.param_groups[0]['lr']:.3g}); the adapters would be "
                "NaN. Lower --lr, or check the data; nothing after the last checkpoint was kept"
            )
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        if self.before_step is not None:
            self.before_step(self)
        if settings.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(list(self.names), settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return rows

    @contextlib.contextmanager
    def _no_sync(self):
        """Keep this micro-batch's gradients local: DDP's ``no_sync`` through accelerate; FSDP2's
        switch, which accelerate's ``no_sync`` reaches only for models it sharded itself."""
        if not self.sharded:
            with self.accelerator.no_sync(self.trained):
                yield
            return
        self.trained.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.trained.set_requires_gradient_sync(True)

    def _all_finite(self, finite: bool) -> bool:
        """Whether every process's losses of this step were finite (all of them stop together)."""
        if self.processes == 1:
            return finite
        flag = torch.tensor([0.0 if finite else 1.0], device=self.accelerator.device)
        return float(self.accelerator.reduce(flag, reduction="sum")) == 0

    def gathered(self, rows: list[dict]) -> list[dict]:
        """Every process's rows (each tagged with its ``_order``), in the one-process order, untagged."""
        if self.processes > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        rows = sorted(rows, key=lambda row: row["_order"])
        for row in rows:
            del row["_order"]
        return rows


def shard_model(model, device: torch.device, processes: int):
    """``model`` sharded in place over the processes of the launch with PyTorch FSDP2 (``fully_shard``).

    Units, innermost first: each module whose own parameters are all trained (a LoRA factor), each
    transformer block (the model's ``_no_split_modules``), then the rest. A unit is gathered in one
    dtype, so the fp32 adapters never share one with bf16/fp16 base weights, and a block's frozen
    weights are gathered only while it runs.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (processes,))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(base, "_no_split_modules", None) or ())
    trained = [m for m in model.modules() if (own := list(m.parameters(recurse=False))) and all(p.requires_grad for p in own)]
    for module in trained + [m for m in model.modules() if type(m).__name__ in blocks]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly sharded) tensor, on the CPU (sharded: a collective call)."""
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A whole ``value`` laid out as ``param``: on its device, sharded as it is (a collective call)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(param.device, param.dtype)
    return distribute_tensor(value, param.device_mesh, param.placements) if isinstance(param, DTensor) else value


def padded_tokens(lengths: np.ndarray, batch_size: int, shuffle: bool = False) -> float:
    """Tokens a pass processes, padding included: each batch costs its longest example times its size
    (training batches come in a random order: one seeded draw stands for it)."""
    if not len(lengths):
        return 0.0
    order = np.random.default_rng(0).permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    ordered = lengths[order]
    return float(sum(ordered[i : i + batch_size].max() * len(ordered[i : i + batch_size])
                     for i in range(0, len(ordered), batch_size)))
