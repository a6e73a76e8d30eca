"""``project-grads``: per-example gradient features of the pool and the target at every checkpoint,
projected and written to the run's gradient stores (LESS, step 2)."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import setting, settings_from
from ..core.chunks import remove_all_partials
from ..core.locks import writer_lock
from ..core.naming import TRAIN, GradientType, gradient_dataset, grads_group, target_dataset
from ..core.resources import available_memory, free_disk, require_room
from ..core.storage import StoreRoot
from ..core.units import UnitClaims, WorkerShare, in_processes
from ..data.formats import Example, examples_sha256
from ..data.targets import load_target, target_name
from ..data.templates import Encoded, collate, encode_example
from ..errors import InfluenceError
from ..models.loading import device_setting, load_adapter, parse_device, place
from ..progress import progress_bar
from ..train.run import Checkpoint, Run
from .per_example import FEATURES, OBJECTIVE_OF, OBJECTIVES, AdamPreconditioner, LoraGradients
from .projection import DEFAULT_CACHE_BYTES, Projector
from .store import GradientStore, stored_datasets, stored_dims

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
    busy_chunks: int = 0  # left to other processes working on the same stores


PROJECTION_BUFFER_BYTES = 256 << 20


def projection_rows(dim: int, batch_size: int, chunk_size: int) -> int:
    """Rows projected per call: gradients of several backward batches of one stored chunk (up to
    PROJECTION_BUFFER_BYTES of fp32) go through the projector together, which amortises generating
    its signs."""
    return max(batch_size, min(chunk_size, PROJECTION_BUFFER_BYTES // (4 * dim)))


def check_memory(gradient_dim: int, dims: list[int], batch_size: int, chunk_size: int, features: int,
                 say: bool) -> None:
    """Refuse, before anything is allocated, a projection whose buffers would not fit in the memory there is
    (one stored chunk of projected rows per dimension and feature, the batch of gradients and the signs the
    projector keeps), and warn of a projection larger than the gradient itself."""
    rows = projection_rows(max(dims), batch_size, chunk_size)
    needed = (chunk_size * sum(dims) * 4 * features + rows * gradient_dim * 4
              + min(DEFAULT_CACHE_BYTES, gradient_dim * max(dims)) + rows * max(dims) * 4)
    require_room(f"projecting {gradient_dim}-dimensional gradients to {', '.join(map(str, dims))} dimensions", needed,
                 available_memory(), "memory", "use a smaller --proj-dim (LESS uses 8192) or --chunk-size")
    larger = [d for d in dims if d > gradient_dim]
    if larger and say:
        print(f"warning: --proj-dim {', '.join(map(str, larger))} is larger than the gradient itself ({gradient_dim} "
              f"dimensions): the projection adds size, not information; --proj-dim {gradient_dim} or less keeps as "
              "much", file=sys.stderr, flush=True)


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
    claims: UnitClaims | None = None,
    shard: tuple[int, int] | None = None,
) -> tuple[int, int, int]:
    """Fill the pending chunks of every store in ``outputs`` (same examples and chunking; one per
    projected dimension and feature): each chunk's gradients of ``objective`` are computed once,
    transformed once per feature and projected with every projector whose store still lacks it.

    Several processes may fill the same stores at once: a chunk is worked on only by the process
    that holds its ``claims`` lock (and with ``shard = (i, n)`` only chunks ``c % n == i``); chunks are
    computed the same way whichever process takes them, so the stores end the same. Returns (chunks
    resumed from disk, non-finite rows, chunks left to other processes)."""
    for output in outputs:
        if hooks.dim != output.projector.spec.input_dim:
            raise ValueError(f"LoRA gradient has {hooks.dim} entries, projector expects {output.projector.spec.input_dim}")
    first = outputs[0].store
    buffer_rows = projection_rows(hooks.dim, batch_size, first.chunk_size)
    pending = sorted(set().union(*(o.store.pending_chunks() for o in outputs)))
    skipped = first.n_chunks - len(pending)
    mine = [i for i in pending if shard is None or i % shard[1] == shard[0]]
    bar = progress_bar(total=first.rows_in(mine), desc=desc, unit="ex", disable=not progress)

    def compute(index: int, writes: list[Output]) -> int:
        """Compute chunk ``index`` for the stores in ``writes``; returns its non-finite rows."""
        start, stop = first.chunk_bounds(index)
        chunk = encoded[start:stop]
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
            finite = output.store.write_chunk(index, projected, norms, losses, tokens,
                                              out_to_loss if objective == "margin" else None)
        if not finite.all():
            bad_ids = [ids[start + i] for i in np.flatnonzero(~finite)]
            log.warning("%s: non-finite gradient for %d example(s): %s", first.where, len(bad_ids), bad_ids[:10])
        return int((~finite).sum())

    nonfinite = busy = 0
    try:
        for index in mine:
            with claims.claim(index) if claims is not None else nullcontext(True) as held:
                if not held:  # another process is computing it
                    busy += 1
                    continue
                writes = [o for o in outputs if not o.store.is_done(index)]  # read afresh: it may just have been done
                if writes:
                    nonfinite += compute(index, writes)
    finally:
        bar.close()
    return skipped, nonfinite, busy


@dataclass(kw_only=True)
class ProjectSettings:
    """What ``project-grads`` computes and stores (see :func:`project_grads`). Projection settings left unset
    are the run's stores' own, so resuming or adding a target needs no flag repeated (else LESS's: 8192
    dimensions, seed 0, chunks of 128)."""

    target_tasks: list[str] | None = setting(None, "Comma-separated subtasks of the target to keep.", list=True)
    proj_dim: list[int] | None = setting(
        None, "Projected dimension, or several comma-separated (e.g. 4096,8192): gradients are computed once "
              "[default: the run's stored dimensions, else 8192].", list=True, min=1)
    seed: int | None = setting(None, "Projection seed [default: the stores', else 0].")
    batch_size: int = setting(8, "Examples per backward pass.", min=1)
    chunk_size: int | None = setting(None, "Examples per stored chunk, the resume unit [default: the stores', else "
                                           "128].", min=1)
    include_train: bool = setting(True, "Also the pool (--skip-train: only the target, the pool's stores already "
                                        "exist).", off_flag="skip-train")
    overwrite: bool = setting(False, "Replace stores made with other settings instead of refusing.")
    train_gradients: list[GradientType] = setting(
        default_factory=lambda: ["adam"], flag="train-gradient", list=True, nonempty=True,
        help="Pool features, comma-separated: adam (LESS), sgd (plain gradient, for TracIn), margin (TRAK's "
             "model-output gradient; the target then gets it too), ekfac or kfac (the gradient whitened by the "
             "curvature of `influence curvature --checkpoints all`, for rank --method ekfac|kfac --pool-gradients "
             "store).")
    workers: int = setting(1, "Processes that split the chunks (each with its share of the CPU threads). On GPUs: "
                              "torchrun --nproc-per-node N -m influence project-grads --run-dir RUN ...", min=1)
    shard: tuple[int, int] | None = setting(None, "Only chunks c with c % n == i (i/n): a static split for job "
                                                  "arrays.", type=WorkerShare())
    store: str | None = setting(None, "Keep the run's gradient stores at this fsspec URL (s3://bucket/x/grads.zarr, "
                                      "gs://...) instead of RUN/grads.zarr; recorded in the run for every later "
                                      "command.")
    device: str | None = device_setting()
    dry_run: bool = setting(False, "Print the cost (measured on one batch here) and stop.")

    def __post_init__(self):
        if isinstance(self.proj_dim, int):  # one dimension given as a number
            self.proj_dim = [self.proj_dim]
        if isinstance(self.train_gradients, str):
            self.train_gradients = [self.train_gradients]


def project_grads(run_dir: str | Path, target: str | None = None, settings: ProjectSettings | None = None, *,
                  progress: bool = True, cooperative: bool = False, **values) -> list[CollectReport]:
    """Compute and store projected gradient features for every checkpoint of a run; ``settings`` (a
    :class:`ProjectSettings`) and ``values`` (its fields by keyword) say which.

    ``store``: keep the run's gradient stores at this fsspec URL (``s3://bucket/x/grads.zarr``; any
    protocol fsspec knows) instead of ``grads.zarr`` in the run folder; recorded in the run, so later
    commands find them without it.

    Before any work it prints the cost: the backward passes left to do (examples x checkpoints x
    objectives, minus what the stores already hold), timed on one batch of this run's examples on this
    machine, and the bytes the stores will take; ``dry_run`` stops there.

    The pool gets the features named in ``train_gradients``: ``adam`` (LESS's Adam feature, the
    default), ``sgd`` (the plain gradient, for TracIn), ``margin`` (the gradient of TRAK's model output
    function, for TRAK); the target gets the plain gradient (LESS, TracIn) and, with ``margin``, TRAK's.
    Features of one objective come from one backward pass. ``proj_dim`` may list several dimensions
    (LESS keeps 4096 and 8192): the gradients are computed once and projected to each. A target's
    stores are keyed by its content, so another file with the same name never shares them. Existing
    stores are resumed; stores with different metadata are refused (or replaced with ``overwrite``).

    Several processes may run it on one run at once and split the chunks between them (each chunk
    claimed by one process, the stores ending byte-identical to one process's): ``workers = n`` starts
    n processes here, ``torchrun --nproc-per-node n -m influence project-grads`` starts them on GPUs
    (rank r takes ``cuda:<LOCAL_RANK>``), and ``shard = (i, n)`` restricts this process to chunks
    ``c % n == i`` (a static split for schedulers such as SLURM arrays). A crashed process's chunks are
    taken on the next run.
    """
    settings = settings_from(ProjectSettings, settings, where="project-grads", **values)
    stored = stored_settings(run_dir) if Path(run_dir, "manifest.json").is_file() else dict(DEFAULTS)
    settings = replace(settings, proj_dim=settings.proj_dim or stored["proj_dim"],
                       seed=stored["seed"] if settings.seed is None else settings.seed,
                       chunk_size=stored["chunk_size"] if settings.chunk_size is None else settings.chunk_size)
    if settings.store is not None and not settings.dry_run:
        Run(run_dir).place_stores(settings.store)
    if settings.workers > 1 and not settings.dry_run:
        return [report for reports in in_processes(project_grads, settings.workers, dict(
            run_dir=run_dir, target=target, settings=replace(settings, workers=1, store=None), cooperative=True),
            progress) for report in reports]
    shared_work = cooperative or settings.shard is not None or _world_size() > 1
    if settings.overwrite and shared_work:
        raise InfluenceError("--overwrite replaces stores: run it in one process, not with --workers, --shard or torchrun")
    run = Run(run_dir)  # says what is missing before a lock file is made in a folder that is not a run
    with writer_lock(run_dir, "project-grads", shared=not settings.overwrite):
        if not shared_work and not settings.dry_run:  # alone on the run: what killed writers left is removed
            remove_all_partials(run.store_path)
        return _project_grads(run, target, settings, progress, shared_work)


DEFAULTS = {"proj_dim": [8192], "seed": 0, "chunk_size": 128}


def stored_settings(run_dir: str | Path) -> dict:
    """The projection settings of the pool's stores already in the run (dimensions, seed, chunk size),
    so that resuming or adding a target needs no flag repeated; LESS's defaults where there are none."""
    run = Run(run_dir)
    dims = stored_dims(run.store_path)
    found = dict(DEFAULTS)
    for dim in dims:
        try:
            store = GradientStore.open(run.store_path, grads_group(dim, TRAIN, run.checkpoints()[0].name))
        except InfluenceError:
            continue
        found = {"proj_dim": [d for d in dims if stored_datasets(run.store_path, d, TRAIN)] or [dim],
                 "seed": store.metadata["projector"]["seed"], "chunk_size": store.metadata["chunk_size"]}
        break
    return found


def _world_size() -> int:
    """Processes of a torchrun / accelerate launch (1 outside one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))




def _project_grads(run: Run, target: str | None, settings: ProjectSettings, progress: bool,
                   cooperative: bool) -> list[CollectReport]:
    dims = sorted(set(settings.proj_dim))
    seed, batch_size, chunk_size, shard = settings.seed, settings.batch_size, settings.chunk_size, settings.shard
    target_tasks, include_train, overwrite = settings.target_tasks, settings.include_train, settings.overwrite
    device, dry_run, train_types = settings.device, settings.dry_run, list(settings.train_gradients)
    run.check_data_unchanged()
    datasets: list[tuple[str, list[Example], list[str], dict]] = []
    if include_train:
        datasets.append((TRAIN, run.pool(), sorted(set(train_types)), {}))
    if target is not None:
        examples = load_target(target, target_tasks)
        extra = {"target": target, "target_tasks": sorted(set(target_tasks)) if target_tasks else None}
        types = ["sgd", "margin"] if "margin" in train_types else ["sgd"]
        datasets.append((target_dataset(target_name(target), examples_sha256(examples)), examples, types, extra))
    if not datasets:
        raise InfluenceError("nothing to do: no --target, and the pool was skipped (--skip-train)")
    if not include_train:  # a target alone is only useful beside the pool's stores of the same dimension
        missing = [d for d in dims if d not in stored_dims(run.store_path)]
        if missing:
            have = ", ".join(map(str, stored_dims(run.store_path))) or "none"
            raise InfluenceError(f"--skip-train: the pool has no gradients at --proj-dim {', '.join(map(str, missing))} "
                                 f"(stored: {have}); the target's could not be compared with them. Use a stored "
                                 "dimension, or drop --skip-train")
    for strategy in sorted(set(train_types) & set(CURVED)):  # refused before any work where it is not fitted
        for checkpoint in run.checkpoints():
            _whitening(run, checkpoint, strategy)
    if overwrite:
        _remove_legacy_stores(run.store_path)
    device = parse_device(device)
    projectors: dict[int, Projector] = {}
    encodings: dict[str, list[Encoded]] = {}
    reports = []
    estimated = False
    for checkpoint in run.checkpoints():
        base, tokenizer, fingerprint = run.load_base_model(device)
        model, device = place(load_adapter(base, checkpoint.path), device)
        hooks = LoraGradients(model)
        if not projectors:
            check_memory(hooks.dim, dims, batch_size, chunk_size, len(train_types) + 1, progress or dry_run)
            projectors = {dim: Projector(hooks.dim, dim, seed) for dim in dims}
        adapter_hash = checkpoint.adapter_sha256()
        for dataset, examples, _, _ in datasets:
            if dataset not in encodings:  # the tokenizer is the same at every checkpoint
                encodings[dataset] = [encode_example(e, tokenizer, run.max_length) for e in examples]
        if not estimated:
            estimated = True
            cost = estimate_cost(hooks, run, datasets, encodings, dims, batch_size, tokenizer.pad_token_id, device,
                                 overwrite)
            if progress or dry_run:
                print(cost.text(), file=sys.stderr, flush=True)
            if not run.store_path.remote:  # object stores report no free space
                require_room("project-grads' stores", int(cost.store_bytes * (1 - cost.done_fraction)),
                             free_disk(run.store_path.base), "disk at " + run.store_path.base,
                             "free some, use a smaller --proj-dim, or keep the stores elsewhere with --store")
            if dry_run:
                hooks.remove()
                return []
            run.claim_stores()  # after every check: a refused command leaves no store folder behind
        for dataset, examples, types, extra in datasets:
            encoded = encodings[dataset]
            ids = [e.id for e in examples]
            for objective in OBJECTIVES:
                started = time.time()
                chosen = [t for t in types if OBJECTIVE_OF[t] == objective]
                if not chosen:
                    continue
                outputs = []
                for gradient_type in chosen:
                    transform = (_preconditioner(hooks, checkpoint, device) if gradient_type == "adam" else
                                 _whitening(run, checkpoint, gradient_type) if gradient_type in CURVED else None)
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
                            "run_id": run.run_id,
                        }
                        store = GradientStore.open_or_create(
                            run.store_path, grads_group(dim, key, checkpoint.name), metadata,
                            ids=ids, tasks=[e.task or "" for e in examples], overwrite=overwrite,
                        )
                        if cooperative and not store.shareable:
                            raise InfluenceError(f"{store.where}: written by an earlier version, which keeps the chunks' "
                                                 "done flags together; finish it in one process, or recompute it with "
                                                 "--overwrite")
                        outputs.append(Output(store, projector, transform))
                keys = [gradient_dataset(dataset, t) for t in chosen]
                claims = UnitClaims(run.path / ".claims" / f"grads-dim{'-'.join(map(str, dims))}" / checkpoint.name /
                                    "+".join(keys)) if cooperative else None
                resumed, nonfinite, busy = collect_stores(
                    hooks, encoded, ids, tokenizer.pad_token_id, outputs, batch_size, device, progress,
                    desc=f"{', '.join(keys)} {checkpoint.name}", objective=objective, claims=claims, shard=shard)
                reports.append(CollectReport(", ".join(keys), checkpoint.name, len(examples),
                                             sum(e.truncated for e in encoded), nonfinite,
                                             round(time.time() - started, 1), resumed, busy))
        hooks.remove()
        del model, base
    return reports


@dataclass
class Cost:
    """What ``project-grads`` has left to do and what it will take (measured on this machine)."""

    backward_examples: int  # example x checkpoint x objective backward passes not yet stored
    seconds_per_example: float
    store_bytes: int  # the stores' size when complete (gradients; the small columns aside)
    done_fraction: float

    def text(self) -> str:
        hours = self.backward_examples * self.seconds_per_example / 3600
        return (f"project-grads: {self.backward_examples} example backward passes left ({self.done_fraction:.0%} "
                f"already stored), ~{self.seconds_per_example:.3f} s each measured here: ~{hours * 60:.1f} min "
                f"for one process; stores ~{self.store_bytes / 2**30:.2f} GiB when complete")


def estimate_cost(hooks: LoraGradients, run: Run, datasets, encodings: dict[str, list[Encoded]], dims: list[int],
                  batch_size: int, pad_token_id: int, device, overwrite: bool) -> Cost:
    """Time one batch of median-length examples (after a warm-up batch) and count the work left."""
    checkpoints = run.checkpoints()
    total = done = store_bytes = 0
    for dataset, examples, types, _ in datasets:
        objectives = {OBJECTIVE_OF[t] for t in types}
        for checkpoint in checkpoints:
            store_bytes += len(examples) * sum(dims) * 2 * len(types)
            for objective in objectives:
                total += len(examples)
                keys = [gradient_dataset(dataset, t) for t in types if OBJECTIVE_OF[t] == objective]
                done += 0 if overwrite else min(_stored_rows(run, key, checkpoint.name, dims) for key in keys)
    pool = max((encodings[d] for d, *_ in datasets), key=len)
    order = np.argsort([len(e.input_ids) for e in pool])
    middle = [pool[i] for i in order[len(order) // 2 : len(order) // 2 + batch_size]]
    batch = {k: v.to(device) for k, v in collate(middle, pad_token_id).items()}
    hooks.compute(batch, "loss")  # allocations and kernels warmed up
    started = time.perf_counter()
    hooks.compute(batch, "loss")
    seconds = (time.perf_counter() - started) / len(middle)
    return Cost(total - done, seconds, store_bytes, done / max(total, 1))


def _stored_rows(run: Run, key: str, checkpoint: str, dims: list[int]) -> int:
    """Rows already stored for ``key`` at every dimension (0 where a store does not exist yet)."""
    rows = []
    for dim in dims:
        try:
            store = GradientStore.open(run.store_path, grads_group(dim, key, checkpoint))
        except InfluenceError:
            return 0
        rows.append(store.n_examples - store.rows_in(store.pending_chunks()))
    return min(rows)


def _remove_legacy_stores(root: StoreRoot) -> None:
    """Delete stores of the version-1 layout (``train``/``target-*`` at the top of ``grads.zarr``)."""
    for name in root.children():
        if name == TRAIN or name.startswith("target-"):
            root.remove(name)


CURVED = ("ekfac", "kfac")  # features whitened by the fitted curvature


def _whitening(run: Run, checkpoint: Checkpoint, strategy: str):
    """``(H + damping)^(-1/2) g`` with the curvature ``influence curvature`` fitted at ``checkpoint`` (its defaults)."""
    from .curvature import load_curvature

    curvature = load_curvature(run, checkpoint, strategy)
    return lambda grads: curvature.inverse_times(grads, power=0.5)


def _preconditioner(hooks: LoraGradients, checkpoint: Checkpoint, device) -> AdamPreconditioner:
    exp_avg, exp_avg_sq, hyper = checkpoint.adam_moments()
    beta1, beta2 = hyper["betas"]
    return AdamPreconditioner(
        hooks.flatten(exp_avg, device), hooks.flatten(exp_avg_sq, device), beta1, beta2, hyper["eps"]
    )
