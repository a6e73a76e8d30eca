"""LESS scoring on Dask (``rank --dask [ADDRESS]``): the stream of :mod:`.stream` as a Dask computation
over the Zarr stores, on a ``LocalCluster`` or on any ``distributed`` scheduler.

Each task reads one block of rows from every checkpoint's store (``dask.array.from_zarr``, blocks of
``rows_per_block`` rows, by default the stores' chunk) and scores it with :func:`.core.score_rows`, the
function the one-process stream applies to the same block on the CPU, so both paths compute the same
numbers (the stream on a GPU agrees within float rounding: workers score on their CPUs); a worker holds
one block per checkpoint at a time. The top k is a tree reduction: a top k per block, then neighbouring
top-ks merged pairwise (:meth:`RunningTopK.merge`), so no process ever holds more than two of them.
The client and the checked reads are :mod:`..dask`'s."""

from __future__ import annotations

import numpy as np
import torch

from ...kernels.scoring import RunningTopK
from ..dask import LOCAL, Checked, dask_client
from .core import LessInputs, score_rows

def per_task_array(inputs: LessInputs, rows_per_block: int | None = None):
    """The (pool, subtasks) LESS breakdown as a lazy Dask array, one task per block of rows."""
    import dask.array as da

    train = inputs.train
    rows = rows_per_block or train[0].chunk_size
    grads = da.stack([da.from_array(Checked(store, "grads"), chunks=(rows, inputs.dim)) for store in train])
    finite = da.stack([da.from_array(Checked(store, "finite"), chunks=(rows,)) for store in train])
    means = inputs.means.cpu().numpy()
    weights = np.asarray(inputs.weights, dtype=np.float32)
    return da.blockwise(_score_block, "rs", grads, "crd", finite, "cr", new_axes={"s": means.shape[1]},
                        concatenate=True, dtype=np.float32, means=means, weights=weights)


def _score_block(grads: np.ndarray, finite: np.ndarray, means: np.ndarray, weights: np.ndarray) -> np.ndarray:
    per_task, _ = score_rows(torch.from_numpy(grads), torch.from_numpy(finite), torch.from_numpy(means),
                             torch.from_numpy(weights))
    return per_task.numpy()


def less_per_task_on_dask(inputs: LessInputs, address: str = LOCAL, rows_per_block: int | None = None,
                          workers: int | None = None) -> np.ndarray:
    """The (pool, subtasks) float32 breakdown computed on Dask (NaN rows: unscorable)."""
    with dask_client(address, workers) as client:
        return client.compute(per_task_array(inputs, rows_per_block)).result()


def less_top_k_on_dask(inputs: LessInputs, k: int, address: str = LOCAL, rows_per_block: int | None = None,
                       workers: int | None = None) -> RunningTopK:
    """The k best rows by score: a top k per block, merged pairwise up a tree (ties: earlier row first)."""
    from dask import delayed

    blocks = per_task_array(inputs, rows_per_block)
    starts = np.concatenate([[0], np.cumsum(blocks.chunks[0])[:-1]]).tolist()
    level = [delayed(_block_top)(block, start, k) for block, start in zip(blocks.to_delayed()[:, 0], starts)]
    while len(level) > 1:
        level = [delayed(RunningTopK.merge)(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]
    with dask_client(address, workers) as client:
        return client.compute(level[0]).result()


def _block_top(per_task: np.ndarray, start: int, k: int) -> RunningTopK:
    top = RunningTopK(k)
    top.update(torch.from_numpy(per_task).max(dim=1).values, start)
    return top
