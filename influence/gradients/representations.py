"""The representations RDS compares and ``--space reps`` measures diversity in: the final layer's hidden state at
each example's last token (as LESS's ``collect_reps`` takes it: ``hidden_states[-1]`` at the last non-padding
position), computed with the warm-up's last checkpoint (base model + adapter) and stored like the gradients, in
the run's store (``reps/<dataset>/<checkpoint>``, resumable chunk by chunk, target stores keyed by content)."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import __version__
from ..core.chunks import ChunkedStore, check_metadata, has_store
from ..core.locks import exclusive
from ..core.naming import TRAIN, target_dataset
from ..core.units import check_sizes
from ..data.formats import Example, examples_sha256
from ..data.targets import load_target, target_name
from ..data.templates import encode_example
from ..models.loading import choose_device, load_adapter, place
from ..models.passes import fill_pending
from ..train.run import Checkpoint, Run

FORMAT = "influence-reps"


POOLING = "final-layer hidden state at the last non-padding token (LESS collect_reps)"


def reps_group(dataset: str, checkpoint: str) -> str:
    return f"reps/{dataset}/{checkpoint}"


@torch.no_grad()
def last_token_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, hidden) final-layer hidden state at each row's last non-padding token (right padding)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "output_hidden_states": True}
    try:
        hidden = model(**kwargs, logits_to_keep=1).hidden_states[-1]
    except TypeError:  # models without logits_to_keep
        hidden = model(**kwargs).hidden_states[-1]
    last = batch["attention_mask"].sum(dim=1) - 1
    return hidden[torch.arange(len(last), device=last.device), last].float()


def _datasets(run: Run, target: str | None, target_tasks: list[str] | None) -> list[tuple[str, list[Example]]]:
    datasets = [(TRAIN, run.pool())]
    if target is not None:
        examples = load_target(target, target_tasks)
        datasets.append((target_dataset(target_name(target), examples_sha256(examples)), examples))
    return datasets


def _metadata(run: Run, checkpoint: Checkpoint, fingerprint: str, dataset: str, examples: list[Example],
              chunk_size: int) -> dict:
    return {
        "format": FORMAT, "format_version": 1, "pooling": POOLING, "model": fingerprint,
        "checkpoint": checkpoint.name, "adapter_sha256": checkpoint.adapter_sha256(), "dataset": dataset,
        "n_examples": len(examples), "examples_sha256": examples_sha256(examples), "max_length": run.max_length,
        "chunk_size": chunk_size, "influence_version": __version__, "run_id": run.run_id,
    }


@exclusive("rank --method rds (representations)")
def compute_representations(run_dir: str | Path, target: str | None = None, target_tasks: list[str] | None = None,
                            batch_size: int = 8, chunk_size: int = 128, overwrite: bool = False,
                            progress: bool = True) -> list[ChunkedStore]:
    """Fill the representation stores of the pool (and ``target``) at the run's last checkpoint."""
    check_sizes(batch_size=batch_size, chunk_size=chunk_size)
    run = Run(run_dir)
    run.check_data_unchanged()
    run.claim_stores()
    checkpoint = run.checkpoints()[-1]
    device = choose_device()
    base, tokenizer, fingerprint = run.load_base_model(device)
    model = None
    stores = []
    for dataset, examples in _datasets(run, target, target_tasks):
        store = ChunkedStore.open_or_create(
            run.store_path, reps_group(dataset, checkpoint.name),
            _metadata(run, checkpoint, fingerprint, dataset, examples, chunk_size),
            [e.id for e in examples], [e.task or "" for e in examples],
            {"reps": ((base.config.hidden_size,), "float32")}, overwrite,
        )
        stores.append(store)
        if not store.pending_chunks():
            continue
        if model is None:
            model, device = place(load_adapter(base, checkpoint.path).eval(), device)
        encoded = [encode_example(e, tokenizer, run.max_length) for e in examples]
        fill_pending(store, encoded, tokenizer.pad_token_id, batch_size, device,
                     lambda batch, _: {"reps": last_token_states(model, batch)}, f"representations {dataset}", progress)
    return stores


def representation_stores(run_dir: str | Path, target: str | None = None,
                          target_tasks: list[str] | None = None) -> list[ChunkedStore]:
    """The complete, checked representation stores of the pool (and ``target``), computed or
    finished first where needed."""
    run = Run(run_dir)
    checkpoint = run.checkpoints()[-1]
    fingerprint = run.manifest["model_fingerprint"]  # what the stores were made with, if made from this run
    stores = []
    for dataset, examples in _datasets(run, target, target_tasks):
        path = reps_group(dataset, checkpoint.name)
        expected = _metadata(run, checkpoint, fingerprint, dataset, examples, 0)
        if not has_store(run.store_path, path):
            compute_representations(run_dir, target, target_tasks)
        elif not ChunkedStore.open(run.store_path, path).complete:  # resume with the store's own chunking
            chunk_size = ChunkedStore.open(run.store_path, path).chunk_size
            compute_representations(run_dir, target, target_tasks, chunk_size=chunk_size)
        store = ChunkedStore.open(run.store_path, path)
        run.owns(store.metadata.get("run_id"), store.where)
        check_metadata(store.metadata, expected, store.where + f" (stale: delete {store.where} to recompute it)",
                       ("format", "format_version", "model", "adapter_sha256", "examples_sha256", "max_length"))
        stores.append(store)
    return stores
