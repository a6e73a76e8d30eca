"""``influence curvature``: K-FAC and EK-FAC curvature of the LoRA parameters, fitted on the warm-up's training
data at a checkpoint and stored in the run, for the influence functions of :mod:`influence.scoring.curvature`.

For each LoRA linear module (every ``lora_A`` and ``lora_B``) with weight ``W`` (out x in), per-token inputs ``a``
and per-token gradients ``g`` of the loss with respect to its outputs, the Gauss-Newton (Fisher) block of ``W`` is
approximated, as in K-FAC (Martens & Grosse 2015) and EK-FAC (George et al. 2018; Grosse et al. 2023), by::

    A = sum_tokens a a^T / N_tokens        S = sum_tokens g g^T / N_tokens        (real tokens only, no padding)
    A = Q_A diag(l_A) Q_A^T                S = Q_S diag(l_S) Q_S^T                 (eigendecompositions, float64)
    K-FAC eigenvalues:   l[o, i] = l_S[o] * l_A[i]
    EK-FAC eigenvalues:  l[o, i] = mean over fit examples n of (Q_S^T G_n Q_A)[o, i]^2,  G_n = sum_t g_t a_t^T

and the damped inverse applied to a gradient ``G`` of ``W`` is ``Q_S [(Q_S^T G Q_A) / (l + damping)] Q_A^T``, with
``damping = 0.1 x mean(l)`` per module unless a value is given (Kronfluence's heuristic; Grosse et al. 2023).

Gradients are those of each example's loss summed over its response tokens: the training loss averages over every
response token of a batch, so an example weighs in proportion to its tokens (scoring takes the pool's gradients the
same way, and the target's of its mean loss). ``labels = sampled`` (the default, as Kronfluence's) draws each response label from the model's
own prediction, which makes ``A`` x ``S`` an approximation of the true Fisher; ``empirical`` uses the data's
labels (the empirical Fisher). Draws are seeded per chunk of fit examples, so a fit is reproducible whichever
process computes which chunk.

Storage: ``RUN/curvature.zarr/<labels>-<fit data sha256[:12]>/<checkpoint>`` holds, per chunk of fit examples, the
covariance sums (pass 1) and then the eigenvalue-correction sums (pass 2), each published whole (the unit of work:
an interrupted fit resumes at the first missing chunk, several processes share the chunks by claims), then the
``factors`` the methods read. Its metadata (model, adapter, fit data, labels, chunking, run id) are checked before
any reuse, as a gradient store's are.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .. import __version__
from ..config import setting, settings_from
from ..core.chunks import check_metadata, checked_codecs, creation_lock, publish_store, remove_all_partials
from ..core.locks import writer_lock
from ..core.storage import StoreRoot
from ..core.units import UnitClaims, WorkerShare, in_processes, run_units
from ..data.formats import Example, examples_sha256, load_examples
from ..data.templates import Encoded, collate, encode_example
from ..errors import InfluenceError, StoreMismatchError
from ..models.loading import device_setting, load_adapter, parse_device, place
from ..train.run import Checkpoint, Run
from .per_example import SAMPLED, LoraGradients

Labels = Literal["sampled", "empirical"]
CheckpointChoice = Literal["last", "all"]
RELATIVE_DAMPING = 0.1  # damping = 0.1 x the mean eigenvalue of each module (Kronfluence's heuristic)
PASSES = ("covariance", "corrections")
CHECKED = ("model", "adapter_sha256", "fit_sha256", "n_fit", "labels", "seed", "chunk_size", "max_length", "modules",
           "loss")
LOSS = "each example's loss summed over its response tokens"


@dataclass(kw_only=True)
class CurvatureSettings:
    """What ``influence curvature`` fits (see :mod:`influence.gradients.curvature`)."""

    fit_data: str | None = setting(None, "Data file to fit the curvature on [default: the warm-up's training examples].",
                                   path={"dir_okay": False, "exists": True})
    labels: Labels = setting("sampled", "sampled: labels drawn from the model (true Fisher, Kronfluence's default); "
                                        "empirical: the data's labels (empirical Fisher).")
    checkpoints: CheckpointChoice = setting("last", "Fit at the last checkpoint (the attributed model) or at all.")
    seed: int = setting(0, "Seed of the sampled labels.")
    batch_size: int = setting(8, "Examples per backward pass.", min=1)
    chunk_size: int = setting(64, "Fit examples per unit of work (the resume unit).", min=1)
    workers: int = setting(1, "Processes that share the chunks here (each with its share of the CPU threads); any "
                              "number of `influence curvature` processes started on one run share them too (torchrun: "
                              "each rank takes cuda:<LOCAL_RANK>).", min=1)
    worker: tuple[int, int] | None = setting(None, "Take only chunks c with c % n == i (i/n), for schedulers without a "
                                                   "shared file system lock; rerun without it to finish the fit.",
                                             type=WorkerShare())
    overwrite: bool = setting(False, "Replace curvature fitted with other settings instead of refusing.")
    device: str | None = device_setting()
    dry_run: bool = setting(False, "Print the cost (measured on one batch here) and stop.")


def curvature_root(run: Run) -> StoreRoot:
    return StoreRoot(run.path / "curvature.zarr")


def fit_key(labels: str, fit: list[Example]) -> str:
    """The folder of one fit: its label mode and the fit data's content."""
    return f"{labels}-{examples_sha256(fit)[:12]}"


def fit_examples(run: Run, fit_data: str | None) -> list[Example]:
    """The examples the curvature is fitted on: ``fit_data``'s, or the warm-up's training examples."""
    if fit_data is not None:
        return load_examples(fit_data)
    chosen = set(run.manifest.get("warmup_ids") or [])
    examples = [e for e in run.pool() if e.id in chosen] if chosen else run.pool()
    if not examples:
        raise InfluenceError(f"{run.path}: the warm-up's training examples are not in the pool; give --fit-data")
    return examples


def fit_command(run: Run, fit_data: str | None, labels: str, every_checkpoint: bool) -> str:
    """The ``influence curvature`` command that fits what a method asks for."""
    return (f"influence curvature --run {run.path}" + (f" --fit-data {fit_data}" if fit_data else "")
            + (f" --labels {labels}" if labels != "sampled" else "") + (" --checkpoints all" if every_checkpoint else ""))


def chosen_checkpoints(run: Run, which: str) -> list[Checkpoint]:
    checkpoints = run.checkpoints()
    return checkpoints if which == "all" else checkpoints[-1:]


# --- the curvature itself -------------------------------------------------------------------------------------------


@dataclass
class ModuleCurvature:
    """One module's eigenbases and eigenvalues (float64): ``eigenvalues`` (out x in) are K-FAC's outer product or
    EK-FAC's corrections."""

    a_basis: torch.Tensor
    s_basis: torch.Tensor
    eigenvalues: torch.Tensor

    def damping(self, value: float | None) -> float:
        return RELATIVE_DAMPING * float(self.eigenvalues.mean()) if value is None else float(value)

    def inverse_times(self, grads: torch.Tensor, damping: float, power: float = 1.0) -> torch.Tensor:
        """``Q_S [(Q_S^T G Q_A) / (l + damping)^power] Q_A^T`` for every (out, in) matrix of ``grads`` (rows, out, in)."""
        rotated = self.s_basis.T @ grads.double() @ self.a_basis
        return (self.s_basis @ (rotated / (self.eigenvalues + damping) ** power) @ self.a_basis.T).to(grads.dtype)


STRATEGIES = ("ekfac", "kfac", "identity")


@dataclass
class Curvature:
    """Every module's curvature for one strategy, applied to flattened LoRA gradients (in the order of
    :class:`~influence.gradients.per_example.LoraGradients`)."""

    strategy: str
    modules: dict[str, ModuleCurvature]
    shapes: dict[str, tuple[int, int]]
    damping: dict[str, float]
    metadata: dict

    @classmethod
    def identity(cls, shapes: dict[str, tuple[int, int]]) -> Curvature:
        return cls("identity", {}, dict(shapes), {}, {})

    def inverse_times(self, flat: torch.Tensor, power: float = 1.0) -> torch.Tensor:
        """The damped inverse curvature (to ``power``: 1/2 whitens, so that dot products of two whitened gradients are
        their influence) times each row of ``flat`` (rows, dim); the identity leaves rows as they are."""
        if self.strategy == "identity":
            return flat
        sizes = [int(np.prod(shape)) for shape in self.shapes.values()]
        pieces = []
        for (name, shape), piece in zip(self.shapes.items(), torch.split(flat, sizes, dim=1)):
            matrices = piece.reshape(len(flat), *shape)
            pieces.append(self.modules[name].inverse_times(matrices, self.damping[name], power).reshape(len(flat), -1))
        return torch.cat(pieces, dim=1)


def load_curvature(run: Run, checkpoint: Checkpoint, strategy: str, labels: str = "sampled",
                   fit_data: str | None = None, damping: float | None = None) -> Curvature:
    """The curvature fitted at ``checkpoint`` (refused, naming the command, where it is missing or stale)."""
    fit = fit_examples(run, fit_data)
    path = f"{fit_key(labels, fit)}/{checkpoint.name}"
    root = curvature_root(run)
    command = fit_command(run, fit_data, labels, checkpoint.name != run.checkpoints()[-1].name)
    if not root.has_group(f"{path}/factors"):
        raise InfluenceError(f"no {labels}-label curvature at checkpoint {checkpoint.name} (fitted on "
                             f"{'--fit-data ' + fit_data if fit_data else 'the warm-up data'}): run `{command}` first")
    group = root.open_group(path, mode="r")
    metadata = dict(group.attrs)
    run.owns(metadata.get("run_id"), f"{root}/{path}")
    if metadata["adapter_sha256"] != checkpoint.adapter_sha256() or metadata["fit_sha256"] != examples_sha256(fit):
        raise InfluenceError(f"{root}/{path}: fitted on another adapter or other data than the run's now; run "
                             f"`{command} --overwrite`")
    factors = root.open_group(f"{path}/factors", mode="r")
    shapes = {name: tuple(shape) for name, shape in metadata["modules"]}
    modules, damped = {}, {}
    for index, name in enumerate(shapes):
        a_basis = torch.from_numpy(factors[f"a_basis.{index}"][:])
        s_basis = torch.from_numpy(factors[f"s_basis.{index}"][:])
        if strategy == "kfac":
            eigenvalues = torch.outer(torch.from_numpy(factors[f"s_eigenvalues.{index}"][:]),
                                      torch.from_numpy(factors[f"a_eigenvalues.{index}"][:]))
        else:
            eigenvalues = torch.from_numpy(factors[f"corrections.{index}"][:])
        modules[name] = ModuleCurvature(a_basis, s_basis, eigenvalues)
        damped[name] = modules[name].damping(damping)
    return Curvature(strategy, modules, shapes, damped, metadata)


# --- fitting ----------------------------------------------------------------------------------------------------


def covariance_sums(hooks: LoraGradients, result) -> dict[str, np.ndarray]:
    """Pass 1 of one batch: per module, the sums of ``a a^T`` and ``g g^T`` over its real tokens, and their count."""
    sums = {}
    for index, name in enumerate(hooks.names):
        x, dy, mask = result.tokens[name]
        x, dy = x[mask].double(), dy[mask].double()
        sums[f"a.{index}"] = (x.T @ x).numpy()
        sums[f"s.{index}"] = (dy.T @ dy).numpy()
        sums[f"n.{index}"] = np.array([float(mask.sum())])
    return sums


def correction_sums(hooks: LoraGradients, result, bases: dict[int, tuple[torch.Tensor, torch.Tensor]]
                    ) -> dict[str, np.ndarray]:
    """Pass 2 of one batch: per module, the sum over examples of ``(Q_S^T G_n Q_A)^2``."""
    sums = {}
    for index, (name, grads) in enumerate(hooks.split(result.grads).items()):
        a_basis, s_basis = bases[index]
        sums[f"c.{index}"] = (s_basis.T @ grads.double() @ a_basis).square().sum(dim=0).numpy()
    sums["examples"] = np.array([len(result.grads)], dtype=np.float64)
    return sums


def fit_curvature(run_dir: str | Path, settings: CurvatureSettings | None = None, *, progress: bool = True,
                  **values) -> list[str]:
    """Fit the curvature at the chosen checkpoints (see the module docstring); returns the stores' paths.
    Prints the cost before the work; resumes what an interrupted fit left."""
    settings = settings_from(CurvatureSettings, settings, where="curvature", **values)
    if settings.overwrite and (settings.workers > 1 or settings.worker is not None):
        raise InfluenceError("--overwrite replaces the fit: run it in one process, not with --workers or --worker")
    if settings.workers > 1 and not settings.dry_run:
        return in_processes(fit_curvature, settings.workers, dict(run_dir=run_dir, settings=replace(settings, workers=1)),
                            progress)[0]
    run = Run(run_dir)
    run.check_data_unchanged()
    fit = fit_examples(run, settings.fit_data)
    device = parse_device(settings.device)
    with writer_lock(run.path, "curvature", shared=not settings.overwrite):
        if not settings.dry_run and settings.worker is None:
            remove_all_partials(curvature_root(run))
        paths = [_fit_at(run, checkpoint, fit, settings, device, progress)
                 for checkpoint in chosen_checkpoints(run, settings.checkpoints)]
    return [] if settings.dry_run else paths


def _fit_at(run: Run, checkpoint: Checkpoint, fit: list[Example], settings: CurvatureSettings, device,
            progress: bool) -> str:
    base, tokenizer, fingerprint = run.load_base_model(device)
    model, device = place(load_adapter(base, checkpoint.path), device)
    hooks = LoraGradients(model)
    encoded = [encode_example(e, tokenizer, run.max_length) for e in fit]
    root = curvature_root(run)
    path = f"{fit_key(settings.labels, fit)}/{checkpoint.name}"
    metadata = {"model": fingerprint, "checkpoint": checkpoint.name, "adapter_sha256": checkpoint.adapter_sha256(),
                "fit_sha256": examples_sha256(fit), "n_fit": len(fit), "fit_data": settings.fit_data or "warm-up",
                "labels": settings.labels, "seed": settings.seed, "chunk_size": settings.chunk_size, "loss": LOSS,
                "max_length": run.max_length, "modules": [[n, list(hooks.shapes[n])] for n in hooks.names],
                "influence_version": __version__, "run_id": run.run_id,
                "definition": __doc__.split("\n\n")[1].strip()}
    n_chunks = -(-len(fit) // settings.chunk_size)
    seconds = _seconds_per_example(hooks, encoded, settings, tokenizer.pad_token_id, device)
    left = 0 if root.has_group(f"{path}/factors") else sum(
        stop - start for phase in PASSES for c, (start, stop) in enumerate(_bounds(len(fit), settings.chunk_size))
        if not root.has_group(_unit(path, phase, c)))
    say = (f"curvature at {checkpoint.name}: {len(fit)} fit examples x 2 passes ({left} example passes left), "
           f"~{seconds:.3f} s each measured here: ~{left * seconds / 60:.1f} min")
    if progress or settings.dry_run:
        print(say, file=sys.stderr, flush=True)
    if settings.dry_run:
        hooks.remove()
        return path
    _open_fit(root, path, metadata, settings.overwrite)
    claims = UnitClaims(run.path / ".claims" / "curvature" / path.replace("/", "--"))
    for phase in PASSES:
        if root.has_group(f"{path}/factors"):
            break
        bases = _bases(root, path, hooks.names) if phase == "corrections" else None

        def work(chunk: int, phase=phase, bases=bases) -> None:
            start, stop = _bounds(len(fit), settings.chunk_size)[chunk]
            sums = _chunk_sums(hooks, encoded[start:stop], phase, bases, settings, chunk, tokenizer.pad_token_id,
                               device)
            with creation_lock(root, _unit(path, phase, chunk)):  # its staging copy is not a leftover meanwhile
                publish_store(root, _unit(path, phase, chunk), lambda built: _write(root, built, sums))

        def missing(phase=phase) -> bool:
            return any(not root.has_group(_unit(path, phase, c)) for c in range(n_chunks))

        while True:  # chunks other processes hold are waited for (and taken over if their process dies)
            run_units(list(range(n_chunks)), lambda c, phase=phase: root.has_group(_unit(path, phase, c)),
                               work, UnitClaims(claims.folder / phase), settings.worker, progress=progress,
                               desc=f"curvature {phase} {checkpoint.name}")
            if not missing() or settings.worker is not None:
                break
            time.sleep(1.0)
        if missing():
            hooks.remove()
            raise InfluenceError(f"curvature at {checkpoint.name}: chunks of the {phase} pass are left to the other "
                                 f"--worker shares; run `influence curvature --run {run.path}` when they are done to "
                                 "finish the fit")
        if phase == "covariance":
            _publish_bases(root, path, hooks.names, n_chunks)
    if not root.has_group(f"{path}/factors"):
        _publish_factors(root, path, hooks.names, n_chunks)
    hooks.remove()
    return path


def _open_fit(root: StoreRoot, path: str, metadata: dict, overwrite: bool) -> None:
    """Create the fit's group, or check that the one there was made with the same settings (replace it with
    ``overwrite``)."""
    with creation_lock(root, path):
        if root.has_group(path):
            found = dict(root.open_group(path, mode="r").attrs)
            try:
                if found.get("run_id") != metadata["run_id"]:
                    raise InfluenceError(f"{root}/{path}: fitted by another run ({found.get('run_id')}); not replaced")
                check_metadata(json.loads(json.dumps(found)), json.loads(json.dumps(metadata)), f"{root}/{path}",
                               CHECKED)
                return
            except StoreMismatchError as err:
                if not overwrite:
                    raise InfluenceError(f"{err}; use --overwrite to fit it anew") from None
            root.remove(path)
        root.create_group(path, metadata)


def _bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + chunk_size)) for start in range(0, n, chunk_size)]


def _unit(path: str, phase: str, chunk: int) -> str:
    """Where one chunk's sums of one pass are (beside the fit's other members: stores sit at most three deep)."""
    return f"{path}/{phase}-{chunk:06d}"


def _seconds_per_example(hooks, encoded: list[Encoded], settings: CurvatureSettings, pad_token_id: int,
                         device) -> float:
    batch = {k: v.to(device) for k, v in collate(encoded[: settings.batch_size], pad_token_id).items()}
    started = time.perf_counter()
    hooks.compute(batch, "loss", keep_tokens=True, token_sum=True)
    return (time.perf_counter() - started) / min(len(encoded), settings.batch_size)


def _chunk_sums(hooks: LoraGradients, chunk: list[Encoded], phase: str, bases, settings: CurvatureSettings,
                index: int, pad_token_id: int, device) -> dict[str, np.ndarray]:
    """One unit: the sums of ``phase`` over a chunk of fit examples (labels drawn with a seed of the chunk's own, so
    any process computes the same sums)."""
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + index * 2 + PASSES.index(phase))
    objective = SAMPLED if settings.labels == "sampled" else "loss"
    total: dict[str, np.ndarray] = {}
    for b in range(0, len(chunk), settings.batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk[b : b + settings.batch_size], pad_token_id).items()}
        result = hooks.compute(batch, objective, generator, keep_tokens=phase == "covariance", token_sum=True)
        sums = covariance_sums(hooks, result) if phase == "covariance" else correction_sums(hooks, result, bases)
        for key, value in sums.items():
            total[key] = total[key] + value if key in total else value
    return total


def _write(root: StoreRoot, built: str, arrays: dict[str, np.ndarray]) -> None:
    group = root.create_group(built, {})
    for name, value in arrays.items():
        array = group.create_array(name, shape=value.shape, dtype=value.dtype, compressors=checked_codecs())
        array[...] = value


def _summed(root: StoreRoot, path: str, phase: str, n_chunks: int) -> dict[str, np.ndarray]:
    """The sums of every chunk of ``phase``, added in chunk order (the same whichever process made which)."""
    total: dict[str, np.ndarray] = {}
    for chunk in range(n_chunks):
        group = root.open_group(_unit(path, phase, chunk), mode="r")
        for name in sorted(group.array_keys()):
            total[name] = total[name] + group[name][...] if name in total else group[name][...]
    return total


def _publish_bases(root: StoreRoot, path: str, names: list[str], n_chunks: int) -> None:
    """The eigendecompositions of the averaged covariances (float64), published as ``bases``."""
    if root.has_group(f"{path}/bases"):
        return
    sums = _summed(root, path, "covariance", n_chunks)
    arrays = {}
    for index in range(len(names)):
        tokens = max(float(sums[f"n.{index}"][0]), 1.0)
        for side in ("a", "s"):
            values, vectors = torch.linalg.eigh(torch.from_numpy(sums[f"{side}.{index}"] / tokens))
            arrays[f"{side}_eigenvalues.{index}"] = values.clamp(min=0).numpy()
            arrays[f"{side}_basis.{index}"] = vectors.numpy()
    with creation_lock(root, f"{path}/bases"):
        if not root.has_group(f"{path}/bases"):
            publish_store(root, f"{path}/bases", lambda built: _write(root, built, arrays))


def _bases(root: StoreRoot, path: str, names: list[str]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    group = root.open_group(f"{path}/bases", mode="r")
    return {i: (torch.from_numpy(group[f"a_basis.{i}"][...]), torch.from_numpy(group[f"s_basis.{i}"][...]))
            for i in range(len(names))}


def _publish_factors(root: StoreRoot, path: str, names: list[str], n_chunks: int) -> None:
    """The bases, K-FAC's eigenvalues and EK-FAC's corrections (the mean over fit examples), as ``factors``."""
    bases = root.open_group(f"{path}/bases", mode="r")
    arrays = {name: bases[name][...] for name in bases.array_keys()}
    sums = _summed(root, path, "corrections", n_chunks)
    for index in range(len(names)):
        arrays[f"corrections.{index}"] = sums[f"c.{index}"] / max(float(sums["examples"][0]), 1.0)
    with creation_lock(root, f"{path}/factors"):
        if not root.has_group(f"{path}/factors"):
            publish_store(root, f"{path}/factors", lambda built: _write(root, built, arrays))
