"""The one loader of per-example vectors that diversity works in (``--space``).

* ``grads``: the pool's projected gradient features (LESS's Adam feature, the run's stores), each
  checkpoint's rows unit-normalised, then averaged with the checkpoints' learning-rate weights (as LESS
  weighs them) and normalised again; ``grads:<checkpoint>`` takes one checkpoint (e.g.
  ``grads:epoch-2``);
* ``reps``: the RDS baseline's representations (final-layer hidden state at the last token, warm-up's
  last checkpoint), computed and stored first where missing;
* ``embed:<model>``: an external embedding model (hub id or local folder, or a built-in name): the mean
  over tokens of its final hidden states for the example's text (instruction and response), stored in
  the run's store (``embeddings/<model>-<hash>``, resumable like the others).

Every space is returned unit-normalised, so cosine similarity is a dot product and cosine distance
``1 - x.y`` is in [0, 2]. Rows that cannot be used (non-finite or all-zero features) are flagged
``finite = False``; diversity methods leave them out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..core.chunks import ChunkedStore, has_store
from ..core.locks import exclusive
from ..core.naming import TRAIN
from ..data.formats import Example, examples_sha256
from ..errors import InfluenceError
from ..progress import progress_bar
from ..train.run import Run


@dataclass
class Space:
    name: str
    ids: list[str]
    vectors: np.ndarray  # (n, d) float32, unit rows (zero where not finite)
    finite: np.ndarray  # (n,) bool
    description: str


def _unit(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    matrix = np.nan_to_num(matrix.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(matrix, axis=1)
    ok = norms > 0
    matrix[ok] /= norms[ok, None]
    return matrix, ok


def load_space(run_dir: str | Path, space: str = "grads", proj_dim: int | None = None) -> Space:
    """The pool's vectors in ``space`` (see the module docstring)."""
    run = Run(run_dir)
    kind, _, argument = space.partition(":")
    if kind == "grads":
        return _gradient_space(run, argument or None, proj_dim, space)
    if kind == "reps":
        from .representations import representation_stores

        store = representation_stores(run.path)[0]
        vectors, ok = _unit(store.array("reps"))
        finite = ok & store.array("finite")
        return Space(space, store.ids.tolist(), vectors, finite,
                     "RDS representations: final-layer hidden state at the last token (warm-up's last checkpoint)")
    if kind == "embed" and argument:
        store = embedding_store(run.path, argument)
        vectors, ok = _unit(store.array("embedding"))
        return Space(space, store.ids.tolist(), vectors, ok & store.array("finite"),
                     f"mean-pooled final hidden states of {argument}")
    raise InfluenceError(f"--space {space}: unknown; use grads, grads:<checkpoint>, reps or embed:<model>")


def _gradient_space(run: Run, checkpoint: str | None, proj_dim: int | None, name: str) -> Space:
    from .store import open_checkpoint_stores, resolve_dim

    stores = open_checkpoint_stores(run, TRAIN, resolve_dim(run, proj_dim))
    if checkpoint is not None:
        stores = [s for s in stores if s.metadata["checkpoint"] == checkpoint]
        if not stores:
            names = ", ".join(c.name for c in run.checkpoints())
            raise InfluenceError(f"--space grads:{checkpoint}: no such checkpoint (the run has {names})")
    lrs = np.array([s.metadata["checkpoint_mean_lr"] for s in stores], dtype=np.float64)
    weights = lrs / lrs.sum() if lrs.sum() > 0 else np.full(len(stores), 1 / len(stores))
    total = np.zeros((stores[0].n_examples, stores[0].metadata["projector"]["output_dim"]), dtype=np.float32)
    finite = np.ones(stores[0].n_examples, dtype=bool)
    for store, weight in zip(stores, weights):
        for start, block in store.iter_chunks():
            rows, ok = _unit(block)
            total[start : start + len(rows)] += weight * rows
            finite[start : start + len(rows)] &= ok
        finite &= store.array("finite")
    vectors, ok = _unit(total)
    return Space(name, stores[0].ids.tolist(), vectors, finite & ok,
                 f"projected Adam gradient features ({', '.join(s.metadata['checkpoint'] for s in stores)}), "
                 "unit rows averaged with the checkpoints' learning-rate weights")


EMBED_FORMAT = "influence-embeddings"


def example_text(example: Example) -> str:
    """The text an embedding model reads: every turn, role-tagged."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in example.messages)


def embedding_store(run_dir: str | Path, model: str, batch_size: int = 16, max_length: int = 512) -> ChunkedStore:
    """The pool's embeddings by ``model`` (computed first where missing or incomplete)."""
    run = Run(run_dir)
    path = f"embeddings/{_slug(model)}"
    if not has_store(run.store_path, path) or not ChunkedStore.open(run.store_path, path).complete:
        compute_embeddings(run.path, model, batch_size, max_length)
    store = ChunkedStore.open(run.store_path, path)
    run.owns(store.metadata.get("run_id"), store.where)
    expected = run.pool_sha256
    if store.metadata.get("examples_sha256") != expected:
        raise InfluenceError(f"{store.where}: made for another pool (the pool changed since); delete it to recompute")
    return store


def _slug(model: str) -> str:
    return f"{Path(model).name or 'model'}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


@exclusive("embeddings")
def compute_embeddings(run_dir: str | Path, model: str, batch_size: int = 16, max_length: int = 512,
                       progress: bool = True) -> ChunkedStore:
    """Embed every pool example with ``model`` (mean of the final hidden states over its tokens)."""
    from transformers import AutoModel, AutoTokenizer

    from ..models.loading import SMOLLM2, TINY, check_model_name, load_base_model, parse_device

    run = Run(run_dir)
    run.claim_stores()
    pool = run.pool()
    check_model_name(model)
    device = parse_device(None)
    if model in (TINY, SMOLLM2):
        encoder, tokenizer = load_base_model(model)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model)
            encoder = AutoModel.from_pretrained(model)
        except OSError as err:
            raise InfluenceError(f"--space embed:{model}: cannot load it ({str(err).splitlines()[0]})") from None
    encoder = encoder.to(device).eval()
    hidden = encoder.config.hidden_size
    metadata = {"format": EMBED_FORMAT, "format_version": 1, "model": model, "dataset": TRAIN, "n_examples": len(pool),
                "examples_sha256": examples_sha256(pool), "chunk_size": 128, "max_length": max_length,
                "pooling": "mean of final hidden states over the text's tokens", "influence_version": __version__,
                "run_id": run.run_id}
    store = ChunkedStore.open_or_create(run.store_path, f"embeddings/{_slug(model)}", metadata, [e.id for e in pool],
                                        [""] * len(pool), {"embedding": ((hidden,), "float32")})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [example_text(e) for e in pool]
    pending = store.pending_chunks()
    bar = progress_bar(total=store.rows_in(pending), desc="embeddings", unit="ex", disable=not progress)
    for index in pending:
        start, stop = store.chunk_bounds(index)
        rows = []
        for b in range(start, stop, batch_size):
            batch = tokenizer(texts[b : min(b + batch_size, stop)], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(device)
            with torch.no_grad():
                output = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 output_hidden_states=True)
            states = output.hidden_states[-1].float()
            mask = batch["attention_mask"][..., None].float()
            rows.append(((states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).cpu().numpy())
            bar.update(len(rows[-1]))
        store.write_columns(index, embedding=np.concatenate(rows))
    bar.close()
    return store
