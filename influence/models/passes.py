"""A per-example pass of a model over a chunked store: every pending chunk computed batch by batch and written
(forward scores, representations)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..core.chunks import ChunkedStore
from ..data.templates import Encoded, collate
from ..progress import progress_bar

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
    bar = progress_bar(total=todo, desc=desc, unit="ex", disable=not progress or not todo)
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
