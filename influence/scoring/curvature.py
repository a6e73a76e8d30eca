"""Influence functions with curvature (Koh & Liang 2017; Grosse et al. 2023): the effect of each pool example on each
target example through the damped inverse of the curvature of the LoRA parameters, fitted by ``influence
curvature`` (K-FAC or EK-FAC, :mod:`influence.gradients.curvature`), at the run's last checkpoint (or every
checkpoint, weighted by its mean learning rate as LESS weights them)::

    influence(x, t) = grad L(t)^T (H + damping)^-1 grad S(x)

with ``L`` the target example's mean loss over its response tokens and ``S`` the pool example's loss summed over its
response tokens (the training loss averages over every response token of a batch, so that is how it weighs ``x``).
Upweighting ``x`` moves the parameters by ``-(H + damping)^-1 grad S(x)`` per unit weight, which changes ``t``'s loss
by minus this product.

``identity`` is the same pipeline with ``H`` replaced by the identity (no curvature: the plain gradient dot product,
the ablation). The pool's gradients are computed exactly at the checkpoint (``--pool-gradients recompute``), or read
from the run's projected stores (``--pool-gradients store``), so that the products run at the speed of the disk (on
Dask with ``--dask``):
``project-grads --train-gradient ekfac`` (or ``kfac``) stores ``P (H + damping)^(-1/2) grad L(x)`` and the target's
gradients are whitened the same way and projected by the store's own projector ``P``, which keeps the product equal
in expectation. Whitening both sides matters: projecting ``(H + damping)^-1 grad L(t)`` against plain projected pool
gradients, as one might first try, leaves a product far smaller than the projection's error (at 4096 dimensions for
a 1792-dimensional gradient, Spearman with the exact scores about 0; ``tests/test_curvature.py``). ``identity``
reads the plain gradients (``--train-gradient sgd``).

Sign and scale: positive = training on x lowers t's loss (helpful), negative = raises it (harmful); unbounded, in
squared loss-gradient units over curvature units. rank averages over the target's examples: higher = more helpful.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd
import torch

from ..config import setting
from ..core.naming import TRAIN, gradient_dataset
from ..data.targets import load_target
from ..errors import InfluenceError
from ..data.templates import IGNORE_INDEX, collate, encode_example
from ..gradients.curvature import (
    CheckpointChoice,
    Curvature,
    Labels,
    chosen_checkpoints,
    fit_command,
    fit_examples,
    fit_key,
    curvature_root,
    load_curvature,
)
from ..gradients.per_example import LoraGradients
from ..gradients.projection import Projector
from ..gradients.store import check_current, open_checkpoint_stores, resolve_dim
from ..models.loading import load_adapter, parse_device, place
from ..progress import progress_bar
from ..train.run import Checkpoint, Run
from .base import PLAIN_GRADIENTS, TARGET, Attribution, Method, Need, NeedsGradients, Scores, Target
from .options import dask, proj_dim
from .products import pairwise_products

PoolGradients = Literal["recompute", "store"]
MEANING = __doc__.strip().split("Sign and scale: ")[1]


@dataclass(kw_only=True)
class FittedCurvature:
    """Which fitted curvature a method reads, and how it scores with it."""

    damping: float | None = setting(None, "Damping added to the curvature's eigenvalues [default: 0.1 x their mean, "
                                          "per module, as Kronfluence].", min=0)
    labels: Labels = setting("sampled", "Which fitted curvature: sampled labels (true Fisher) or empirical.")
    fit_data: str | None = setting(None, "Which fitted curvature: the one fitted on this data file [default: the "
                                         "warm-up's training examples].")
    checkpoints: CheckpointChoice = setting("last", "Score at the last checkpoint, or at all weighted by their mean "
                                                    "learning rate (each needs its curvature).")
    batch_size: int = setting(8, "Examples per backward pass.", min=1)


@dataclass(kw_only=True)
class CurvatureOptions(FittedCurvature):
    """The options of the influence functions: the curvature, and where the pool's gradients come from."""

    pool_gradients: PoolGradients = setting("recompute", "recompute: the pool's exact gradients at the checkpoint; "
                                                         "store: its projected whitened gradients (project-grads "
                                                         "--train-gradient ekfac or kfac; sgd for identity).")
    proj_dim: int | None = proj_dim()
    dask: str | None = dask()
    per_token: int = setting(0, "Also split each target example's influence with the top K pool examples by its response "
                                "tokens: tokens.parquet in the ranking's folder.", min=0)


@dataclass(frozen=True)
class NeedsCurvature(Need):
    """The curvature ``strategy`` reads, fitted at the checkpoints the method scores at (and, to read the pool from the
    store, its projected gradients whitened by that curvature; plain ones for the identity)."""

    strategy: str = "ekfac"

    def missing(self, run, target, options):
        if getattr(options, "pool_gradients", "recompute") == "store":
            feature = "sgd" if self.strategy == "identity" else self.strategy
            need = PLAIN_GRADIENTS if feature == "sgd" else NeedsGradients(f"the pool's {feature}-whitened gradients",
                                                                          feature=feature)
            if why := need.missing(run, target, options):
                return why
        if self.strategy == "identity":
            return None
        fit = fit_examples(run, options.fit_data)
        root = curvature_root(run)
        for checkpoint in chosen_checkpoints(run, options.checkpoints):
            if not root.has_group(f"{fit_key(options.labels, fit)}/{checkpoint.name}/factors"):
                command = fit_command(run, options.fit_data, options.labels, options.checkpoints == "all")
                return f"the curvature at checkpoint {checkpoint.name}: run `{command}` first"
        return None


def fitted(strategy: str) -> NeedsCurvature:
    return NeedsCurvature("the curvature fitted on the warm-up data", "influence curvature", strategy=strategy)


class Scorer:
    """The model at one checkpoint with its curvature: per-example gradients, multiplied by the inverse curvature."""

    def __init__(self, run: Run, checkpoint: Checkpoint, strategy: str, options: FittedCurvature, device):
        self.run, self.checkpoint, self.options = run, checkpoint, options
        base, self.tokenizer, _ = run.load_base_model(device)
        self.model, self.device = place(load_adapter(base, checkpoint.path), device)
        self.hooks = LoraGradients(self.model)
        self.curvature = Curvature.identity(self.hooks.shapes) if strategy == "identity" else load_curvature(
            run, checkpoint, strategy, options.labels, options.fit_data, options.damping)

    def gradients(self, examples, desc: str = "", progress: bool = False, token_sum: bool = False):
        """Per-example gradients (rows in the examples' order) of the mean loss over the response tokens (the summed
        loss with ``token_sum``: the pool's side), batch by batch: yields (rows, gradients)."""
        encoded = [encode_example(e, self.tokenizer, self.run.max_length) for e in examples]
        bar = progress_bar(total=len(encoded), desc=desc, unit="ex", disable=not progress)
        for start in range(0, len(encoded), self.options.batch_size):
            chunk = encoded[start : start + self.options.batch_size]
            batch = {k: v.to(self.device) for k, v in collate(chunk, self.tokenizer.pad_token_id).items()}
            yield range(start, start + len(chunk)), self.hooks.compute(batch, "loss", token_sum=token_sum).grads.detach()
            bar.update(len(chunk))
        bar.close()

    def token_gradients(self, example) -> tuple[list[str], torch.Tensor]:
        """An example's response tokens and, per token, the gradient of its share of the example's mean loss (its own
        loss over the number of response tokens): the rows sum to the example's gradient."""
        encoded = encode_example(example, self.tokenizer, self.run.max_length)
        positions = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
        alone = [replace(encoded, labels=[label if i == p else IGNORE_INDEX for i, label in enumerate(encoded.labels)])
                 for p in positions]
        grads = [self.hooks.compute({k: v.to(self.device) for k, v in collate(
            alone[start : start + self.options.batch_size], self.tokenizer.pad_token_id).items()}, "loss").grads.detach()
            for start in range(0, len(alone), self.options.batch_size)]
        tokens = [self.tokenizer.decode([encoded.input_ids[p]]) for p in positions]
        return tokens, torch.cat(grads) / max(len(positions), 1) if grads else torch.zeros((0, self.hooks.dim))

    def preconditioned(self, examples) -> torch.Tensor:
        """(n, dim) inverse curvature times each example's gradient."""
        return torch.cat([self.curvature.inverse_times(grads) for _, grads in self.gradients(examples)])

    def close(self) -> None:
        self.hooks.remove()


def weights_of(checkpoints: list[Checkpoint]) -> np.ndarray:
    """LESS's checkpoint weights: each checkpoint's mean learning rate, normalised to sum 1 (one checkpoint: 1)."""
    lrs = np.array([c.mean_lr for c in checkpoints], dtype=np.float64)
    return lrs / lrs.sum() if lrs.sum() > 0 else np.full(len(lrs), 1.0 / len(lrs))


def influence_matrix(run: Run, target: Target, strategy: str, options: CurvatureOptions, progress: bool = True
                     ) -> tuple[np.ndarray, list, dict]:
    """(n_pool x n_target influences, the target's examples, what was combined)."""
    examples = load_target(target.name, target.task_list)
    checkpoints = chosen_checkpoints(run, options.checkpoints)
    weights = weights_of(checkpoints)
    pool = run.pool()
    if options.dask is not None and options.pool_gradients != "store":
        raise InfluenceError("--dask scores the stored gradients: add --pool-gradients store (the pool's exact "
                             "gradients are recomputed in this process)")
    device = parse_device(None)
    matrix = np.zeros((len(pool), len(examples)))
    details = {"strategy": strategy, "checkpoints": [c.name for c in checkpoints], "weights": weights.tolist(),
               "pool_gradients": options.pool_gradients, "labels": options.labels,
               "fit_data": options.fit_data or "warm-up", "damping": {}}
    with contextlib.ExitStack() as stack:
        if options.dask is not None:  # one client (one LocalCluster) for every checkpoint
            from .dask import dask_client

            options = replace(options, dask=stack.enter_context(dask_client(options.dask)).scheduler.address)
        for checkpoint, weight in zip(checkpoints, weights):
            _add_checkpoint(run, checkpoint, weight, strategy, options, examples, pool, matrix, details, device,
                            progress)
    return matrix, examples, details


def _add_checkpoint(run: Run, checkpoint: Checkpoint, weight: float, strategy: str, options: CurvatureOptions,
                    examples, pool, matrix: np.ndarray, details: dict, device, progress: bool) -> None:
    """Add one checkpoint's weighted influences to ``matrix``."""
    scorer = Scorer(run, checkpoint, strategy, options, device)
    details["damping"][checkpoint.name] = scorer.curvature.damping
    if options.pool_gradients == "store":
        matrix += weight * _from_store(run, checkpoint, scorer, examples, strategy, options)
    else:
        targets = scorer.preconditioned(examples)
        for rows, grads in scorer.gradients(pool, f"{strategy} {checkpoint.name}", progress, token_sum=True):
            matrix[rows.start : rows.stop] += weight * (grads @ targets.T).double().numpy()
    scorer.close()


def _from_store(run: Run, checkpoint: Checkpoint, scorer: Scorer, examples, strategy: str,
                options: CurvatureOptions) -> np.ndarray:
    """The products of the pool's stored projected whitened gradients (plain ones for the identity) with the target's
    gradients whitened the same way and projected by the store's projector."""
    if strategy != "identity" and (options.damping, options.labels, options.fit_data) != (None, "sampled", None):
        raise InfluenceError("--pool-gradients store reads gradients whitened with the default curvature (sampled "
                             "labels, the warm-up data, the default damping): drop --damping, --labels and --fit-data, "
                             "or use --pool-gradients recompute")
    dim = resolve_dim(run, options.proj_dim)
    feature = "sgd" if strategy == "identity" else strategy
    store = next(s for s in open_checkpoint_stores(run, gradient_dataset(TRAIN, feature), dim)
                 if s.metadata["checkpoint"] == checkpoint.name)
    check_current(run, checkpoint, store)
    whitened = torch.cat([scorer.curvature.inverse_times(grads, power=0.5) for _, grads in scorer.gradients(examples)])
    spec = store.metadata["projector"]
    projected = Projector(spec["input_dim"], spec["output_dim"], spec["seed"]).project(whitened.float())
    if options.dask is not None:
        from .dask import products_on_dask

        matrix = products_on_dask([store], [projected], np.ones(1), options.dask)
    else:
        matrix, _ = pairwise_products([store], [projected], np.ones(1))
    return matrix * store.array("n_tokens")[:, None]  # the store holds the mean loss's gradients: the sum's, per row


class InfluenceFunction(Method):
    """EK-FAC, K-FAC and the identity differ by the curvature only."""

    family = "influence"
    Options = CurvatureOptions
    meaning = MEANING

    def attribution(self, run: Run, target: Target, options: CurvatureOptions) -> Attribution:
        matrix, examples, details = influence_matrix(run, target, self.name, options)
        return Attribution(self.name, [e.id for e in run.pool()], [e.id for e in examples],
                           [e.task or "" for e in examples], matrix, self.meaning, details)

    def scores(self, run: Run, target: Target, options: CurvatureOptions) -> Scores:
        scores = super().scores(run, target, options)
        if options.per_token:
            top = np.argsort(-np.nan_to_num(scores.score, nan=-np.inf), kind="stable")[: options.per_token]
            scores.tables["tokens"] = token_contributions(run, target, self.name, options, top.tolist())
        return scores


def token_contributions(run: Run, target: Target, strategy: str, options: FittedCurvature, pool_rows: list[int]
                        ) -> pd.DataFrame:
    """Each target example's influence with each of the pool's ``pool_rows``, split by the target's response tokens
    (at the last checkpoint): ``contribution`` sums over an example's tokens to its influence there. One row per
    (target example, token, pool example), with the example's last user turn (``prompt``); positive = the token's loss
    is lowered by training on the pool example."""
    checkpoint = chosen_checkpoints(run, "last")[0]
    scorer = Scorer(run, checkpoint, strategy, options, parse_device(None))
    pool = run.pool()
    chosen = [pool[i] for i in pool_rows]
    pool_grads = (torch.cat([grads for _, grads in scorer.gradients(chosen, token_sum=True)]) if chosen
                  else torch.zeros((0, 1)))
    rows = []
    for example in load_target(target.name, target.task_list):
        tokens, grads = scorer.token_gradients(example)
        if not tokens:
            continue
        prompt = next((m["content"] for m in reversed(example.messages[:-1]) if m["role"] == "user"), "")
        contributions = (scorer.curvature.inverse_times(grads) @ pool_grads.T).double().numpy()
        for position, token in enumerate(tokens):
            for column, pool_example in enumerate(chosen):
                rows.append({"target_id": example.id, "task": example.task or "", "prompt": prompt,
                             "token_index": position, "token": token, "pool_id": pool_example.id,
                             "contribution": float(contributions[position, column])})
    scorer.close()
    return pd.DataFrame(rows, columns=["target_id", "task", "prompt", "token_index", "token", "pool_id",
                                       "contribution"])


class Ekfac(InfluenceFunction):
    name = "ekfac"
    summary = "influence functions with EK-FAC curvature (eigenvalue-corrected K-FAC; Grosse et al. 2023)"
    needs = (TARGET, fitted("ekfac"))


class Kfac(InfluenceFunction):
    name = "kfac"
    summary = "influence functions with K-FAC curvature (Martens & Grosse 2015)"
    needs = (TARGET, fitted("kfac"))


class Identity(InfluenceFunction):
    name = "identity"
    summary = "the influence-function pipeline without curvature (plain gradient dot products at the checkpoint)"
    needs = (TARGET, NeedsCurvature("the pool's plain gradients with --pool-gradients store",
                                    "influence project-grads --train-gradient sgd", strategy="identity"))


class EkfacSelf(Method):
    """Self-influence: how much an example's own loss depends on training on it."""

    name = "ekfac_self"
    family = "difficulty"
    summary = ("EK-FAC self-influence grad S(x)^T (H + damping)^-1 grad S(x), S the summed token loss: memorised, "
               "atypical or mislabelled examples")
    meaning = ("higher = the example's own loss depends more on training on it (atypical, mislabelled or memorised "
               "examples rank first); non-negative, in squared loss-gradient units over curvature units.")
    needs = (fitted("ekfac"),)
    Options = FittedCurvature

    def scores(self, run: Run, target: Target | None, options: FittedCurvature) -> Scores:
        pool = run.pool()
        checkpoints = chosen_checkpoints(run, options.checkpoints)
        score = np.zeros(len(pool))
        for checkpoint, weight in zip(checkpoints, weights_of(checkpoints)):
            scorer = Scorer(run, checkpoint, "ekfac", options, parse_device(None))
            for rows, grads in scorer.gradients(pool, f"ekfac_self {checkpoint.name}", True, token_sum=True):
                own = (scorer.curvature.inverse_times(grads) * grads).sum(dim=1)
                score[rows.start : rows.stop] += weight * own.double().numpy()
            scorer.close()
        return Scores(self.name, [e.id for e in pool], score, self.meaning, finite=np.isfinite(score),
                      details={"strategy": "ekfac", "checkpoints": [c.name for c in checkpoints]})
