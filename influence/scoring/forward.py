"""Loss- and uncertainty-based scores from one forward pass per example per checkpoint.

All metrics are computed together (``compute_forward_scores``) and stored per checkpoint in the run's
store (group ``forward-train/<checkpoint>``, resumable like gradient stores); each method then averages
its metric over checkpoints. Per response token with predicted distribution ``p`` and gold token ``y``:

=====================  ===========================================================  ======================
method                 definition (mean over the example's response tokens)         direction, scale
=====================  ===========================================================  ======================
``nll``                ``-log p_y``                                                 higher = harder; nats
``ppl``                ``exp(nll)``                                                 higher = harder; >= 1
``nll_full``           ``-log p`` over every token of the text, prompt included     higher = harder; nats
``el2n``               ``|| p - onehot(y) ||_2`` (Paul et al. 2021)                 higher = harder; [0, sqrt 2]
``entropy``            ``-sum_v p_v log p_v``                                       higher = less certain; [0, log V]
``least_confidence``   ``1 - max_v p_v``                                            higher = less certain; [0, 1)
``mean_margin``        ``p_top1 - p_top2``                                          higher = more certain; [0, 1]
``min_margin``         minimum of ``p_top1 - p_top2`` over the response             higher = more certain; [0, 1]
``ifd``                ``nll(response | instruction) / nll(response alone)``        > 1: the instruction does
                       (Li et al. 2023, Instruction-Following Difficulty)           not help (mismatch)
=====================  ===========================================================  ======================

``rank`` sorts by the score, highest first; pick the end you want with ``--select top|bottom|middle``
or a threshold (``--select below --threshold 1`` keeps IFD < 1).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import setting, settings_from
from ..core.chunks import ChunkedStore, has_store
from ..core.locks import exclusive
from ..core.storage import StoreRoot
from ..data.formats import Example, examples_sha256
from ..data.templates import IGNORE_INDEX, Encoded, collate, encode_example
from ..gradients.store import check_current
from ..models.loading import choose_device, load_adapter, place
from ..models.losses import logits_at, mean_by_row
from ..models.passes import fill_pending
from ..train.run import Run
from .base import FORWARD_SCORES, Method, Scores, Target

MEANING = {
    "nll": "mean NLL of the response tokens (nats/token); higher = harder",
    "ppl": "perplexity of the response, exp(nll); >= 1; higher = harder",
    "nll_full": "mean NLL over every token of the text, prompt included (nats/token); higher = harder",
    "el2n": "EL2N: mean over response tokens of ||softmax - onehot(gold)||_2, in [0, sqrt 2]; higher = harder",
    "entropy": "mean predictive entropy over response tokens (nats), in [0, log V]; higher = less certain",
    "least_confidence": "mean of 1 - max probability over response tokens, in [0, 1); higher = less certain",
    "mean_margin": "mean of top-1 minus top-2 probability over response tokens, in [0, 1]; higher = more certain",
    "min_margin": "smallest top-1 minus top-2 probability over the response, in [0, 1]; higher = more certain",
    "ifd": "IFD = NLL(response | instruction) / NLL(response alone); > 1 flags an instruction that does "
    "not help predict the response (mismatch); higher = harder instruction-following",
}
METRICS = tuple(MEANING)
FORMAT = "influence-forward"
DATASET = "forward-train"


def _min_by_row(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.full((n,), float("inf"), dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, rows, values, reduce="amin")


@torch.no_grad()
def token_metrics(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every metric except IFD for a batch, from one forward pass (logits at every text position)."""
    n = batch["input_ids"].shape[0]
    keep = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    keep[:, :-1] = batch["attention_mask"][:, 1:].bool()
    logits = logits_at(model, batch, keep).float()
    targets = batch["input_ids"][:, 1:][keep[:, :-1]]
    response = batch["labels"][:, 1:][keep[:, :-1]] != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]
    log_p = torch.log_softmax(logits, dim=-1)
    del logits
    nll = -log_p.gather(1, targets[:, None])[:, 0]
    p = log_p.exp()
    entropy = -(p * log_p).sum(dim=1)
    del log_p
    top2 = p.topk(2, dim=1).values
    p_gold = p.gather(1, targets[:, None])[:, 0]
    el2n = (p.square().sum(dim=1) - 2 * p_gold + 1).clamp(min=0).sqrt()
    del p
    margin = top2[:, 0] - top2[:, 1]
    r_rows = rows[response]
    result = {
        "nll": mean_by_row(nll[response], r_rows, n),
        "nll_full": mean_by_row(nll, rows, n),
        "el2n": mean_by_row(el2n[response], r_rows, n),
        "entropy": mean_by_row(entropy[response], r_rows, n),
        "least_confidence": mean_by_row(1 - top2[response, 0], r_rows, n),
        "mean_margin": mean_by_row(margin[response], r_rows, n),
        "min_margin": _min_by_row(margin[response], r_rows, n),
    }
    result["ppl"] = result["nll"].exp()
    return result


def response_alone(encoded: Encoded, start_token: int) -> Encoded:
    """The response tokens on their own, after one start token, all of them scored (for IFD)."""
    tokens = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    return Encoded([start_token, *tokens], [IGNORE_INDEX, *tokens], False)


def start_token_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


@dataclass(kw_only=True)
class ForwardSettings:
    """How ``forward-scores`` runs its pass."""

    batch_size: int = setting(8, "Examples per forward pass.", min=1)
    chunk_size: int = setting(128, "Examples per stored chunk (resume unit).", min=1)
    overwrite: bool = setting(False, "Replace stores made with other settings instead of refusing.")


@exclusive("forward-scores")
def compute_forward_scores(run_dir: str | Path, settings: ForwardSettings | None = None, progress: bool = True,
                           **values) -> list[str]:
    """Fill the forward-score store of every checkpoint for the whole pool (resumable); ``settings`` (a
    :class:`ForwardSettings`) and ``values`` (its fields by keyword) say how."""
    settings = settings_from(ForwardSettings, settings, where="forward-scores", **values)
    batch_size, chunk_size, overwrite = settings.batch_size, settings.chunk_size, settings.overwrite
    run = Run(run_dir)
    run.check_data_unchanged()
    run.claim_stores()
    pool: list[Example] = run.pool()
    device = choose_device()
    encoded: list[Encoded] | None = None
    written = []
    estimated = False
    for checkpoint in run.checkpoints():
        base, tokenizer, fingerprint = run.load_base_model(device)
        metadata = {
            "format": FORMAT,
            "format_version": 1,
            "model": fingerprint,
            "checkpoint": checkpoint.name,
            "adapter_sha256": checkpoint.adapter_sha256(),
            "dataset": "train",
            "n_examples": len(pool),
            "examples_sha256": examples_sha256(pool),
            "max_length": run.max_length,
            "chunk_size": chunk_size,
            "metrics": list(METRICS),
            "influence_version": __version__,
            "run_id": run.run_id,
        }
        store = ChunkedStore.open_or_create(
            run.store_path, f"{DATASET}/{checkpoint.name}", metadata, [e.id for e in pool], [""] * len(pool),
            {m: ((), "float32") for m in METRICS}, overwrite,
        )
        written.append(store.where)
        if not store.pending_chunks():
            continue
        model, device = place(load_adapter(base, checkpoint.path).eval(), device)
        if encoded is None:
            encoded = [encode_example(e, tokenizer, run.max_length) for e in pool]
        start_token = start_token_id(tokenizer)

        def compute(batch, part, model=model, start_token=start_token):
            metrics = token_metrics(model, batch)
            alone = {k: v.to(device) for k, v in collate([response_alone(e, start_token) for e in part],
                                                         tokenizer.pad_token_id).items()}
            metrics["ifd"] = metrics["nll"] / token_metrics(model, alone)["nll"].clamp(min=1e-8)
            return metrics

        if progress and not estimated:  # the cost, once, timed on a batch of median length
            order = np.argsort([len(e.input_ids) for e in encoded])
            sample = [encoded[i] for i in order[len(order) // 2 : len(order) // 2 + batch_size]]
            batch = {k: v.to(device) for k, v in collate(sample, tokenizer.pad_token_id).items()}
            started = time.perf_counter()
            with torch.no_grad():
                compute(batch, sample)
            per_example = (time.perf_counter() - started) / len(sample)
            left = len(pool) * len(run.checkpoints())
            print(f"forward scores: {len(pool)} examples x {len(run.checkpoints())} checkpoint(s), ~{per_example:.3f} s "
                  f"each measured here: at most ~{left * per_example / 60:.1f} min", file=sys.stderr, flush=True)
            estimated = True
        fill_pending(store, encoded, tokenizer.pad_token_id, batch_size, device, compute,
                     f"forward scores {checkpoint.name}", progress)
        del model, base
    return written


def _complete(root: StoreRoot, path: str) -> bool:
    return has_store(root, path) and ChunkedStore.open(root, path).complete


class ForwardMetric(Method):
    """One metric of the forward pass, averaged over the warm-up checkpoints (the pass runs where missing)."""

    family = "difficulty"
    needs = (FORWARD_SCORES,)

    def scores(self, run: Run, target: Target | None, options) -> Scores:
        paths = [f"{DATASET}/{c.name}" for c in run.checkpoints()]
        if not all(_complete(run.store_path, path) for path in paths):
            compute_forward_scores(run.path)  # resumes whatever is missing
        stores = [ChunkedStore.open(run.store_path, path) for path in paths]
        for checkpoint, store in zip(run.checkpoints(), stores):
            check_current(run, checkpoint, store)
        values = np.mean([s.array(self.name).astype(np.float64) for s in stores], axis=0)
        finite = np.logical_and.reduce([s.array("finite") for s in stores]) & np.isfinite(values)
        return Scores(
            method=self.name,
            ids=stores[0].ids.tolist(),
            score=np.where(finite, values, np.nan),
            description=f"{self.meaning}. Averaged over the warm-up checkpoints.",
            finite=finite,
            details={"checkpoints": [s.metadata["checkpoint"] for s in stores]},
        )


SUMMARIES = {
    "nll": "mean NLL of the response tokens", "ppl": "perplexity of the response", "nll_full": "mean NLL of the "
    "whole text, prompt included", "el2n": "EL2N (Paul et al. 2021): error of the predicted distribution",
    "entropy": "predictive entropy over the response", "least_confidence": "1 - the top token probability",
    "mean_margin": "top-1 minus top-2 probability, averaged", "min_margin": "the smallest top-1 minus top-2 margin",
    "ifd": "Instruction-Following Difficulty (Li et al. 2023)",
}
for _metric in METRICS:  # one registered method per metric of the pass
    type(f"Forward_{_metric}", (ForwardMetric,), {"name": _metric, "meaning": MEANING[_metric],
                                                  "summary": SUMMARIES[_metric], "__module__": __name__})
