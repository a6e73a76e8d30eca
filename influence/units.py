"""The one unit-of-work mechanism for per-example passes: a store's pending chunks, filled in batches.

A chunk of a :class:`~influence.store.ChunkedStore` is the unit: it is computed whole and marked done
last, so an interrupted pass resumes at the first unfinished chunk and ends identical to an
uninterrupted one. Forward scores and representations use :func:`fill_pending`; gradient collection
(``influence.collect``) walks the same chunks with its own batching, since it projects several
batches at once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import InfluenceError
from .store import ChunkedStore
from .templates import Encoded, collate


def check_sizes(**sizes: int) -> None:
    """Refuse a non-positive batch size, chunk size or dimension, naming the option."""
    bad = [f"--{name.replace('_', '-')} must be at least 1, got {value}" for name, value in sizes.items()
           if not isinstance(value, int) or value < 1]
    if bad:
        raise InfluenceError("; ".join(bad))


BatchFn = Callable[[dict[str, torch.Tensor], list[Encoded]], dict[str, torch.Tensor]]


def fill_pending(
    store: ChunkedStore,
    encoded: list[Encoded],
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    compute: BatchFn,
    desc: str = "",
    progress: bool = True,
) -> int:
    """Compute every pending chunk of ``store`` with ``compute(batch, encodings) -> {column: (rows, ...)}``
    and write it. Returns how many chunks were already done (resumed)."""
    pending = store.pending_chunks()
    todo = sum(stop - start for start, stop in map(store.chunk_bounds, pending))
    bar = tqdm(total=todo, desc=desc, unit="ex", disable=not progress or not todo)
    try:
        for index in pending:
            start, stop = store.chunk_bounds(index)
            values: dict[str, list[np.ndarray]] = {}
            for b in range(start, stop, batch_size):
                part = encoded[b : min(b + batch_size, stop)]
                batch = {k: v.to(device) for k, v in collate(part, pad_token_id).items()}
                for name, value in compute(batch, part).items():
                    values.setdefault(name, []).append(value.detach().float().cpu().numpy())
                bar.update(len(part))
            store.write_columns(index, **{name: np.concatenate(parts) for name, parts in values.items()})
    finally:
        bar.close()
    return store.n_chunks - len(pending)
