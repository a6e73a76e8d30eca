"""Exact metagradients of a LoRA fine-tune (MAGIC: Ilyas & Engstrom 2025): the derivative of a measurement of the
final model with respect to the weight ``w_i`` of every training example's loss, by reverse-mode differentiation
through every AdamW step of the training primitive (:class:`~influence.train.loop.LoraTrainer`).

The training is a deterministic function of the weights: the order of each epoch, the micro-batches, the dropout
masks (seeded per micro-batch) and the learning-rate schedule depend on the settings only. Weight ``w_i`` multiplies
example ``i``'s loss in its step's loss (:func:`~influence.train.loop.step_loss`); at ``w = 1`` the training is the
one that was run, bit for bit. One AdamW step is ``s_{t+1} = U(s_t, clip(g_t(theta_t, w)))`` on the state
``s = (theta, m, v)``; the adjoint ``ds`` of the measurement goes back one step as::

    ds_t  = dU/ds_t^T ds_{t+1}  +  [dg_t/dtheta_t^T  dU/dg^T ds_{t+1}]   (the second term: a Hessian-vector product)
    dw   += dg_t/dw^T dU/dg^T ds_{t+1}                                    (a per-example gradient dot product)

both from one double-backward pass per micro-batch through the model at ``theta_t``. The states come from replaying
the training (REPLAY, Ilyas & Engstrom 2025, sec. 3): the run is cut into segments, the state at each segment's start
is kept by a first forward pass, and each segment is replayed forward (keeping its steps' states and gradients) just
before it is reversed, so about ``2 sqrt(T)`` states are held at once instead of ``T``. A LoRA state is small, so when
every step's state fits in ``max_states_gb`` the whole run is one segment and is trained forward once.

What ``dU/ds`` and ``dU/dg`` are: PyTorch's AdamW (decoupled weight decay, bias correction, ``eps`` outside the square
root) after ``torch.nn.utils.clip_grad_norm_``'s clipping of the summed gradient, written out below as functions of
tensors so that autograd differentiates them. ``sqrt(v)`` at ``v = 0`` (a LoRA ``A`` factor's first step, when ``B``
is still zero and so is ``A``'s gradient) has an infinite derivative times a zero one; the update's true derivative
there is finite (``m / (sqrt(v) + eps)`` is smooth in ``g`` at 0, with slope ``1 / eps``), which :class:`_SafeSqrt`
gives by taking the square root's derivative at 0 as 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..data.templates import collate
from ..models.losses import forward_response
from ..progress import progress_bar
from .loop import LoraTrainer, step_loss

State = dict[str, torch.Tensor]  # by the trainer's parameter names (lora_parameters)


@dataclass
class StepRecord:
    """What reversing one optimizer step needs: where it is, the state before it and its summed gradient."""

    epoch: int
    index: int  # 0-based position of the step in the whole training
    indices: list[int]  # the training examples of the step
    lr: float
    theta: State
    exp_avg: State
    exp_avg_sq: State
    grad: State


@dataclass
class Adjoint:
    """The reverse-mode state of one measurement: adjoints of the parameters and moments, and ``d measurement / dw``."""

    theta: State
    exp_avg: State
    exp_avg_sq: State
    weights: torch.Tensor  # float64, one per training example


class _SafeSqrt(torch.autograd.Function):
    """``sqrt`` whose derivative at 0 is taken as 0 (see the module docstring); elsewhere ``0.5 / sqrt(v)``."""

    @staticmethod
    def forward(ctx, v):
        root = v.sqrt()
        ctx.save_for_backward(root)
        return root

    @staticmethod
    def backward(ctx, grad):
        (root,) = ctx.saved_tensors
        return torch.where(root > 0, grad * 0.5 / root.clamp(min=torch.finfo(root.dtype).tiny), torch.zeros_like(grad))


def adamw_update(theta: State, exp_avg: State, exp_avg_sq: State, grad: State, lr: float, step: int, beta1: float,
                 beta2: float, eps: float, weight_decay: float, max_grad_norm: float) -> tuple[State, State, State]:
    """One step of ``torch.optim.AdamW`` (``step`` counted from 1) on gradients clipped as ``clip_grad_norm_`` clips
    them, as differentiable functions of the state and the gradient."""
    if max_grad_norm > 0:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grad.values()]))
        coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
        grad = {name: g * coef for name, g in grad.items()}
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    new_theta, new_m, new_v = {}, {}, {}
    for name, p in theta.items():
        p = p * (1 - lr * weight_decay)
        m = beta1 * exp_avg[name] + (1 - beta1) * grad[name]
        v = beta2 * exp_avg_sq[name] + (1 - beta2) * grad[name] * grad[name]
        denom = _SafeSqrt.apply(v) / math.sqrt(bias2) + eps
        new_theta[name], new_m[name], new_v[name] = p - (lr / bias1) * m / denom, m, v
    return new_theta, new_m, new_v


class _Bound(torch.nn.Module):
    """``model`` called with its LoRA parameters replaced by the tensors ``params`` (autograd leaves), so that a
    forward pass is a function of them (``torch.func.functional_call``)."""

    def __init__(self, model, params: dict[str, torch.Tensor]):
        super().__init__()
        self.inner, self.params = model, params

    def forward(self, **kwargs):
        return torch.func.functional_call(self.inner, self.params, args=(), kwargs=kwargs, strict=False)

    def get_base_model(self):
        return self.inner.get_base_model()


def plan_steps(trainer: LoraTrainer) -> list[tuple[int, int, list[int]]]:
    """Every optimizer step of the training as (epoch, first example's position in the epoch, examples)."""
    return [(epoch, first, indices) for epoch in range(1, trainer.settings.epochs + 1)
            for first, indices in zip(range(0, len(trainer.encoded), trainer.per_step), trainer.epoch_steps(epoch))]


def state_of(trainer: LoraTrainer) -> tuple[State, State, State]:
    """The trainer's parameters and Adam moments by name, copied (zeros for moments not yet created)."""
    theta, m, v = {}, {}, {}
    for param, name in trainer.names.items():
        state = trainer.optimizer.state.get(param, {})
        theta[name] = param.detach().clone()
        m[name] = state["exp_avg"].detach().clone() if "exp_avg" in state else torch.zeros_like(param)
        v[name] = state["exp_avg_sq"].detach().clone() if "exp_avg_sq" in state else torch.zeros_like(param)
    return theta, m, v


def set_state(trainer: LoraTrainer, theta: State, m: State, v: State, step: int) -> None:
    """Put the trainer at the start of optimizer step ``step`` (0-based) with this state."""
    with torch.no_grad():
        for param, name in trainer.names.items():
            param.copy_(theta[name])
            trainer.optimizer.state[param] = {"step": torch.tensor(float(step)), "exp_avg": m[name].clone(),
                                              "exp_avg_sq": v[name].clone()}
    trainer.step = step
    scheduler = trainer.scheduler
    scheduler.last_epoch = step
    for group, base, schedule in zip(trainer.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * schedule(step)


def segment_length(n_steps: int, state_bytes: int, max_states_gb: float | None) -> int:
    """Steps per replay segment: the whole run when every step's record (4 states) fits in ``max_states_gb``
    (None: no cap), else about ``sqrt(T)`` (REPLAY's two levels: ``T / k`` kept starts plus ``k`` records)."""
    if max_states_gb is None or (n_steps * 4 + 3) * state_bytes <= max_states_gb * 2**30:
        return max(n_steps, 1)
    return max(1, math.ceil(math.sqrt(n_steps)))


class Replay:
    """A finished training replayed from its initial state: ``trainer`` is a fresh
    :class:`~influence.train.loop.LoraTrainer` over the run's examples (its model at the LoRA initialisation),
    ``checkpoint_check(epoch, state)`` may compare the replayed parameters with a stored checkpoint (and raise)."""

    def __init__(self, trainer: LoraTrainer, max_states_gb: float | None = 2.0,
                 checkpoint_check: Callable[[int, State], None] | None = None):
        self.trainer, self.check = trainer, checkpoint_check
        self.steps = plan_steps(trainer)
        self.initial = state_of(trainer)
        state_bytes = sum(p.numel() * p.element_size() for p in trainer.names)
        self.segment = segment_length(len(self.steps), state_bytes, max_states_gb)
        self.starts: dict[int, tuple[State, State, State]] = {0: self.initial}
        self.final: State | None = None

    @property
    def n_segments(self) -> int:
        return max(1, math.ceil(len(self.steps) / self.segment))

    def _train(self, first: int, stop: int, record: bool, keep_starts: bool, bar=None, record_from: int = 0,
               check: bool = True) -> list[StepRecord]:
        """Train steps ``first``..``stop - 1`` from the state kept at ``first``; the records of each step from
        ``record_from`` on with ``record``; the state at each segment start with ``keep_starts``; the stored
        checkpoints compared at each epoch's end with ``check``."""
        trainer = self.trainer
        set_state(trainer, *self.starts[first], first)
        trainer.model.train()
        records: list[StepRecord] = []
        current: dict = {}

        def capture(t: LoraTrainer) -> None:
            if t.step < record_from:
                return
            theta, m, v = state_of(t)
            grads = {name: param.grad.detach().clone() if param.grad is not None else torch.zeros_like(param)
                     for param, name in t.names.items()}
            records.append(StepRecord(current["epoch"], t.step, current["indices"], t.last_lr, theta, m, v, grads))

        trainer.before_step = capture if record else None
        try:
            for index in range(first, stop):
                if keep_starts and index % self.segment == 0 and index not in self.starts:
                    self.starts[index] = state_of(trainer)
                epoch, position, indices = self.steps[index]
                current.update(epoch=epoch, indices=indices)
                trainer.train_step(epoch, position, indices, where="replay")
                if check and self.check is not None and (index + 1) % trainer.steps_per_epoch == 0:
                    self.check(epoch, state_of(trainer)[0])
                if bar is not None:
                    bar.update(1)
        finally:
            trainer.before_step = None
        if stop == len(self.steps):
            self.final = state_of(trainer)[0]
        return records

    def forward(self, progress: bool = False) -> None:
        """The first pass: train the whole run, keeping each segment's starting state (and the final parameters)."""
        bar = progress_bar(total=len(self.steps), desc="replay forward", unit="step", disable=not progress)
        self._train(0, len(self.steps), record=False, keep_starts=True, bar=bar)
        bar.close()

    def final_parameters(self) -> State:
        if self.final is None:
            self.forward()
        return self.final

    def metagradients(self, measurements: Callable[[State], list[State]], progress: bool = False,
                      after_segment: Callable[[int, list[Adjoint]], None] | None = None,
                      resume: tuple[int, list[Adjoint]] | None = None) -> list[Adjoint]:
        """Reverse-mode through every step for each measurement, ``measurements(final parameters)`` giving their
        gradients with respect to the final parameters: each one's adjoint at the start of training, with
        ``d measurement / dw``. ``after_segment(segment, adjoints)`` is called after each reversed segment (last
        first) and ``resume`` = (segment, adjoints) continues after one (a saved resume point). One segment: the run
        is trained forward once, keeping every step's state."""
        n_steps = len(self.steps)
        bar = progress_bar(total=n_steps, desc="metagradient", unit="step", disable=not progress)
        if self.n_segments == 1 and resume is None:
            bar.set_description("replay")
            records = self._train(0, n_steps, record=True, keep_starts=False, bar=bar)
            adjoints = self._start(measurements(self.final))
            segments, done = [(0, records)], 1
        else:
            if self.final is None or len(self.starts) < self.n_segments:
                self.forward(progress)
            done, adjoints = resume if resume is not None else (self.n_segments, self._start(measurements(self.final)))
            segments = None
        bar.reset(total=min(done * self.segment, n_steps))
        bar.set_description(f"metagradient x{len(adjoints)}")
        for segment in reversed(range(done)):
            first = segment * self.segment
            records = segments[0][1] if segments else self._train(first, min(first + self.segment, n_steps),
                                                                   record=True, keep_starts=False, check=False)
            for record in reversed(records):
                self.reverse_step(record, adjoints)
                bar.update(1)
            del records
            segments = None
            if after_segment is not None:
                after_segment(segment, adjoints)
        bar.close()
        return adjoints

    def _start(self, finals: list[State]) -> list[Adjoint]:
        """Each measurement's adjoint after the last step: its gradient, and zeros for the moments and weights."""
        return [Adjoint({k: a.detach().clone() for k, a in final.items()},
                        {k: torch.zeros_like(a) for k, a in final.items()},
                        {k: torch.zeros_like(a) for k, a in final.items()},
                        torch.zeros(len(self.trainer.encoded), dtype=torch.float64)) for final in finals]

    def reverse_step(self, record: StepRecord, adjoints: list[Adjoint]) -> None:
        """Move every adjoint from after ``record``'s step to before it (see the module docstring)."""
        grad_adjoints = self.optimizer_vjp(record, adjoints)
        self.gradient_vjp(record, adjoints, grad_adjoints)

    def truncated(self, measurement: Callable[[State], list[State]], back: int, progress: bool = False
                  ) -> tuple[StepRecord, State]:
        """The step ``back`` steps before the end, and the adjoint of its (summed, unclipped) gradient for the
        measurement: reverse-mode through the last ``back`` steps only (one segment; the truncated metagradient of
        metagradient descent, whose candidates enter at that step)."""
        n_steps = len(self.steps)
        back = min(max(back, 1), n_steps)
        records = self._train(0, n_steps, record=True, keep_starts=False, record_from=n_steps - back)
        adjoints = self._start(measurement(self.final))
        for record in reversed(records[1:]):
            self.reverse_step(record, adjoints)
        return records[0], self.optimizer_vjp(records[0], adjoints)[0]

    def optimizer_vjp(self, record: StepRecord, adjoints: list[Adjoint]) -> list[State]:
        """Through the optimizer's update of ``record``'s step: each adjoint's parameters and moments before it, and
        the adjoint of the step's summed gradient (returned)."""
        settings = self.trainer.settings
        names = list(record.theta)
        leaves = [{k: t.clone().requires_grad_() for k, t in part.items()}
                  for part in (record.theta, record.exp_avg, record.exp_avg_sq, record.grad)]
        theta, m, v, grad = leaves
        group = self.trainer.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        new = adamw_update(theta, m, v, grad, record.lr, record.index + 1, beta1, beta2, group["eps"],
                           group["weight_decay"], settings.max_grad_norm)
        outputs = [part[k] for part in new for k in names]
        inputs = [part[k] for part in leaves for k in names]
        grad_adjoints = []
        for adjoint in adjoints:
            incoming = [part[k] for part in (adjoint.theta, adjoint.exp_avg, adjoint.exp_avg_sq) for k in names]
            back = torch.autograd.grad(outputs, inputs, incoming, retain_graph=True, allow_unused=True)
            back = [torch.zeros_like(x) if b is None else b for b, x in zip(back, inputs)]
            n = len(names)
            adjoint.theta = dict(zip(names, back[:n]))
            adjoint.exp_avg = dict(zip(names, back[n : 2 * n]))
            adjoint.exp_avg_sq = dict(zip(names, back[2 * n : 3 * n]))
            grad_adjoints.append(dict(zip(names, back[3 * n :])))
        _detach(adjoints)
        return [{k: g.detach() for k, g in grads.items()} for grads in grad_adjoints]

    def gradient_vjp(self, record: StepRecord, adjoints: list[Adjoint], grad_adjoints: list[State]) -> None:
        """Through the step's gradient as a function of the parameters and the weights, one micro-batch at a time:
        the Hessian-vector product into each adjoint's parameters, the per-example products into its weights."""
        trainer, settings = self.trainer, self.trainer.settings
        names = list(record.theta)
        model_names = trainer.parameter_names
        n_tokens = sum(trainer.encoded[i].n_response_tokens for i in record.indices)
        cuda = [trainer.device] if trainer.device.type == "cuda" else []
        params = {name: record.theta[name].clone().requires_grad_() for name in names}
        bound = _Bound(trainer.model, {model_names[k]: params[k] for k in names})
        for position, indices in trainer.micro_batches(record.indices):
            if position < 0:
                continue
            weights = (trainer.example_weights(indices) if trainer.weights is not None
                       else torch.ones(len(indices), device=trainer.device))
            weights = weights.to(record.theta[names[0]].dtype).requires_grad_()
            batch = trainer.batch(indices)
            with torch.random.fork_rng(devices=cuda), _math_attention():
                torch.manual_seed(trainer.dropout_seed(record.epoch, record.index, position))
                with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                    forward = forward_response(bound, batch)
                loss = step_loss(forward, n_tokens, settings, weights)
                first = torch.autograd.grad(loss, [params[k] for k in names], create_graph=True, allow_unused=True)
                for j, (adjoint, g_bar) in enumerate(zip(adjoints, grad_adjoints)):
                    inner = sum((g * g_bar[k]).sum() for g, k in zip(first, names) if g is not None)
                    d_theta = torch.autograd.grad(inner, [params[k] for k in names] + [weights],
                                                  retain_graph=j < len(adjoints) - 1, allow_unused=True)
                    for k, d in zip(names, d_theta[:-1]):
                        if d is not None:
                            adjoint.theta[k] = adjoint.theta[k] + d
                    if d_theta[-1] is not None:
                        adjoint.weights[indices] += d_theta[-1].detach().double().cpu()
        _detach(adjoints)


def _detach(adjoints: list[Adjoint]) -> None:
    """Every adjoint's parameters and moments as plain tensors (out of the step's graph)."""
    for adjoint in adjoints:
        for part in (adjoint.theta, adjoint.exp_avg, adjoint.exp_avg_sq):
            for k in part:
                part[k] = part[k].detach()


def batches_of(encoded: list, pad_token_id: int, size: int = 8) -> list[dict]:
    """Encoded examples collated ``size`` at a time (measurements and candidates)."""
    return [collate(encoded[i : i + size], pad_token_id) for i in range(0, len(encoded), size)]


def _math_attention():
    """Scaled-dot-product attention by its composite (math) kernel, which autograd differentiates twice; the fused
    kernels have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def weighted_training(trainer: LoraTrainer) -> State:
    """Train ``trainer`` (fresh, with its weights) for all its epochs: its final parameters by name."""
    for epoch in range(1, trainer.settings.epochs + 1):
        trainer.run_epoch(epoch)
    return state_of(trainer)[0]


def response_losses(model, batch: dict) -> torch.Tensor:
    """Each example's mean response-token loss: the default measurement."""
    return forward_response(model, batch).losses


def measurement_gradient(model, names: dict, theta: State, examples_batches: list, n_examples: int,
                         per_example: bool = False,
                         value: Callable[[torch.nn.Module, object], torch.Tensor] = response_losses) -> list[State]:
    """The gradient with respect to the LoRA parameters ``theta`` of the mean over the examples of their measurement
    ``value(model, batch)`` (one value per example of the batch; default the mean response loss), in evaluation mode,
    or with ``per_example`` one gradient per example (then each batch must hold one example). ``names`` maps the
    trainer's names to the model's."""
    was_training = model.training
    model.eval()
    params = {k: t.clone().requires_grad_() for k, t in theta.items()}
    bound = _Bound(model, {names[k]: params[k] for k in params})
    total = {k: torch.zeros_like(t) for k, t in theta.items()}
    out = []
    try:
        for batch in examples_batches:
            values = value(bound, batch)
            grads = torch.autograd.grad(values.sum() / (1 if per_example else n_examples), list(params.values()),
                                        allow_unused=True)
            grads = {k: torch.zeros_like(t) if g is None else g.detach() for (k, t), g in zip(params.items(), grads)}
            if per_example:
                out.append(grads)
            else:
                total = {k: total[k] + grads[k] for k in total}
    finally:
        model.train(was_training)
    return out if per_example else [total]


def drop_prediction(metagradient: np.ndarray, dropped: np.ndarray) -> float:
    """The first-order change of a measurement when the weights of ``dropped`` go from 1 to 0:
    ``-sum_{i dropped} d measurement / d w_i``."""
    return float(-np.asarray(metagradient)[dropped].sum())


def loss_directional_derivatives(model, names: dict, theta: State, direction: State, batches: list[dict]
                                 ) -> np.ndarray:
    """For every example of ``batches``, the derivative of its mean response loss at ``theta`` along ``direction``
    (``grad loss_i . direction``), by forward-mode differentiation (``torch.func.jvp``): one forward pass per batch
    for all of them, in evaluation mode (no dropout)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in batches:
            def losses(params, batch=batch):
                return forward_response(_Bound(model, {names[k]: v for k, v in params.items()}), batch).losses

            with _math_attention():
                _, tangent = torch.func.jvp(losses, (theta,), ({k: direction[k] for k in theta},))
            out.append(tangent.detach().double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)
