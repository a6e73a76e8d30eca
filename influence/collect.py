"""``project-grads``: per-example gradient features of the pool and the target at every checkpoint,
projected and written to the run's gradient stores (LESS, step 2)."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .data import Example, examples_sha256, load_pool
from .errors import InfluenceError
from .gradients import FEATURES, OBJECTIVE_OF, OBJECTIVES, AdamPreconditioner, LoraGradients
from .models import load_adapter, load_base_model, model_fingerprint, parse_device
from .projection import Projector
from .run import Checkpoint, Run
from .store import GRADIENT_TYPES, TRAIN, GradientStore, exclusive, gradient_dataset, grads_group, target_dataset
from .targets import load_target, target_name
from .templates import Encoded, collate, encode_example
from .units import check_sizes

log = logging.getLogger(__name__)

@dataclass
class CollectReport:
    dataset: str
    checkpoint: str
    n_examples: int
    n_truncated: int
    n_nonfinite: int
    seconds: float
    resumed_chunks: int


PROJECTION_BUFFER_BYTES = 256 << 20


def projection_rows(dim: int, batch_size: int, chunk_size: int) -> int:
    """Rows projected per call: gradients of several backward batches of one stored chunk (up to
    PROJECTION_BUFFER_BYTES of fp32) go through the projector together, which amortises generating
    its signs."""
    return max(batch_size, min(chunk_size, PROJECTION_BUFFER_BYTES // (4 * dim)))


@dataclass
class Output:
    """One store to fill: its projector and the feature transform (Adam preconditioner, or None for the
    plain gradient)."""

    store: GradientStore
    projector: Projector
    transform: AdamPreconditioner | None = None


def collect_stores(
    hooks: LoraGradients,
    encoded: list[Encoded],
    ids: list[str],
    pad_token_id: int,
    outputs: list[Output],
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    desc: str = "",
    objective: str = "loss",
) -> tuple[int, int]:
    """Fill the pending chunks of every store in ``outputs`` (same examples and chunking; one per
    projected dimension and feature): each chunk's gradients of ``objective`` are computed once,
    transformed once per feature and projected with every projector whose store still lacks it.
    Returns (chunks resumed from disk, non-finite rows)."""
    for output in outputs:
        if hooks.dim != output.projector.spec.input_dim:
            raise ValueError(f"LoRA gradient has {hooks.dim} entries, projector expects {output.projector.spec.input_dim}")
    first = outputs[0].store
    buffer_rows = projection_rows(hooks.dim, batch_size, first.chunk_size)
    missing = {id(o.store): set(o.store.pending_chunks()) for o in outputs}
    pending = sorted(set().union(*missing.values()))
    skipped = first.n_chunks - len(pending)
    todo = sum(first.chunk_bounds(i)[1] - first.chunk_bounds(i)[0] for i in pending)
    bar = tqdm(total=todo, desc=desc, unit="ex", disable=not progress)
    nonfinite = 0
    try:
        for index in pending:
            start, stop = first.chunk_bounds(index)
            chunk = encoded[start:stop]
            writes = [o for o in outputs if index in missing[id(o.store)]]
            transforms = list({id(o.transform): o.transform for o in writes}.values())
            # Longest first inside a chunk: less padding; the order is fixed, so results are reproducible.
            order = sorted(range(len(chunk)), key=lambda i: -len(chunk[i].input_ids))
            rows = len(chunk)
            out = [np.zeros((rows, o.projector.spec.output_dim), dtype=np.float32) for o in writes]
            norms = np.zeros(rows, dtype=np.float32)
            losses = np.zeros(rows, dtype=np.float32)
            tokens = np.zeros(rows, dtype=np.int32)
            out_to_loss = np.zeros(rows, dtype=np.float32)
            waiting_rows: list[int] = []  # computed, not yet projected
            waiting: dict[int, list[torch.Tensor]] = {id(t): [] for t in transforms}  # features per transform
            for b in range(0, rows, batch_size):
                idx = order[b : b + batch_size]
                batch = {k: v.to(device) for k, v in collate([chunk[i] for i in idx], pad_token_id).items()}
                result = hooks.compute(batch, objective)
                waiting_rows += idx
                for transform in transforms:
                    waiting[id(transform)].append(transform(result.grads) if transform is not None else result.grads)
                norms[idx] = result.norms.cpu().numpy()
                losses[idx] = result.losses.float().cpu().numpy()
                tokens[idx] = result.n_tokens.cpu().numpy()
                if result.out_to_loss is not None:
                    out_to_loss[idx] = result.out_to_loss.float().cpu().numpy()
                if len(waiting_rows) + batch_size > buffer_rows or b + batch_size >= rows:
                    features = {key: torch.cat(parts) for key, parts in waiting.items()}
                    for target, output in zip(out, writes):
                        target[waiting_rows] = output.projector.project(features[id(output.transform)]).cpu().numpy()
                    waiting_rows = []
                    waiting = {key: [] for key in waiting}
                bar.update(len(idx))
            for output, projected in zip(writes, out):
                extra = out_to_loss if objective == "margin" else None
                finite = output.store.write_chunk(index, projected, norms, losses, tokens, extra)
            if not finite.all():
                bad_ids = [ids[start + i] for i in np.flatnonzero(~finite)]
                log.warning("%s: non-finite gradient for %d example(s): %s", first.where, len(bad_ids), bad_ids[:10])
                nonfinite += len(bad_ids)
    finally:
        bar.close()
    return skipped, nonfinite


@exclusive("project-grads")
def project_grads(
    run_dir: str | Path,
    target: str | None = None,
    proj_dim: int | list[int] = 8192,
    seed: int = 0,
    batch_size: int = 8,
    chunk_size: int = 128,
    target_tasks: list[str] | None = None,
    include_train: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
    train_gradients: str | list[str] = "adam",
) -> list[CollectReport]:
    """Compute and store projected gradient features for every checkpoint of a run.

    The pool gets the features named in ``train_gradients``: ``adam`` (LESS's Adam feature, the
    default), ``sgd`` (the plain gradient, for TracIn), ``margin`` (the gradient of TRAK's model output
    function, for TRAK); the target gets the plain gradient (LESS, TracIn) and, with ``margin``, TRAK's.
    Features of one objective come from one backward pass. ``proj_dim`` may list several dimensions
    (LESS keeps 4096 and 8192): the gradients are computed once and projected to each. A target's
    stores are keyed by its content, so another file with the same name never shares them. Existing
    stores are resumed; stores with different metadata are refused (or replaced with ``overwrite``).
    """
    dims = sorted({int(d) for d in ([proj_dim] if isinstance(proj_dim, int) else proj_dim)})
    check_sizes(batch_size=batch_size, chunk_size=chunk_size, proj_dim=min(dims, default=0))
    train_types = [train_gradients] if isinstance(train_gradients, str) else list(train_gradients)
    unknown = sorted(set(train_types) - set(GRADIENT_TYPES))
    if unknown or not train_types:
        raise InfluenceError(f"--train-gradient: unknown {', '.join(unknown) or 'none given'}; choose from "
                             f"{', '.join(GRADIENT_TYPES)}")
    run = Run(run_dir)
    run.check_data_unchanged()
    datasets: list[tuple[str, list[Example], list[str], dict]] = []
    if include_train:
        datasets.append((TRAIN, load_pool(run.train_files), sorted(set(train_types)), {}))
    if target is not None:
        examples = load_target(target, target_tasks)
        extra = {"target": target, "target_tasks": sorted(set(target_tasks)) if target_tasks else None}
        types = ["sgd", "margin"] if "margin" in train_types else ["sgd"]
        datasets.append((target_dataset(target_name(target), examples_sha256(examples)), examples, types, extra))
    if not datasets:
        raise InfluenceError("nothing to do: no --target, and the pool was skipped (--skip-train)")
    if overwrite:
        _remove_legacy_stores(run.store_path)
    device = parse_device(device)
    projectors: dict[int, Projector] = {}
    encodings: dict[str, list[Encoded]] = {}
    reports = []
    for checkpoint in run.checkpoints():
        base, tokenizer = load_base_model(run.model_name)
        fingerprint = model_fingerprint(run.model_name, base)
        run.check_model_unchanged(fingerprint)
        model = load_adapter(base, checkpoint.path).to(device)
        hooks = LoraGradients(model)
        if not projectors:
            projectors = {dim: Projector(hooks.dim, dim, seed) for dim in dims}
        adapter_hash = checkpoint.adapter_sha256()
        for dataset, examples, types, extra in datasets:
            if dataset not in encodings:  # the tokenizer is the same at every checkpoint
                encodings[dataset] = [encode_example(e, tokenizer, run.max_length) for e in examples]
            encoded = encodings[dataset]
            ids = [e.id for e in examples]
            for objective in OBJECTIVES:
                started = time.time()
                chosen = [t for t in types if OBJECTIVE_OF[t] == objective]
                if not chosen:
                    continue
                outputs = []
                for gradient_type in chosen:
                    transform = _preconditioner(hooks, checkpoint, device) if gradient_type == "adam" else None
                    key = gradient_dataset(dataset, gradient_type)
                    for dim, projector in projectors.items():
                        metadata = {
                            "model": fingerprint,
                            "checkpoint": checkpoint.name,
                            "adapter_sha256": adapter_hash,
                            "gradient_type": gradient_type,
                            "feature": FEATURES[gradient_type],
                            "projector": projector.spec.to_dict(),
                            "dtype": "float16",
                            "dataset": key,
                            "n_examples": len(examples),
                            "examples_sha256": examples_sha256(examples),
                            "max_length": run.max_length,
                            "chunk_size": chunk_size,
                            **extra,
                            "checkpoint_mean_lr": checkpoint.mean_lr,
                            "influence_version": __version__,
                        }
                        store = GradientStore.open_or_create(
                            run.store_path, grads_group(dim, key, checkpoint.name), metadata,
                            ids=ids, tasks=[e.task or "" for e in examples], overwrite=overwrite,
                        )
                        outputs.append(Output(store, projector, transform))
                label = ", ".join(gradient_dataset(dataset, t) for t in chosen)
                resumed, nonfinite = collect_stores(hooks, encoded, ids, tokenizer.pad_token_id, outputs, batch_size,
                                                    device, progress, desc=f"{label} {checkpoint.name}", objective=objective)
                reports.append(CollectReport(label, checkpoint.name, len(examples), sum(e.truncated for e in encoded),
                                             nonfinite, round(time.time() - started, 1), resumed))
        hooks.remove()
        del model, base
    return reports


def _remove_legacy_stores(root: Path) -> None:
    """Delete stores of the version-1 layout (``train``/``target-*`` at the top of ``grads.zarr``)."""
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and (path.name == TRAIN or path.name.startswith("target-")):
                shutil.rmtree(path)


def _preconditioner(hooks: LoraGradients, checkpoint: Checkpoint, device) -> AdamPreconditioner:
    exp_avg, exp_avg_sq, hyper = checkpoint.adam_moments()
    beta1, beta2 = hyper["betas"]
    return AdamPreconditioner(
        hooks.flatten(exp_avg, device), hooks.flatten(exp_avg_sq, device), beta1, beta2, hyper["eps"]
    )
