"""Scoring on Dask (``rank --dask [ADDRESS]``): the client (a LocalCluster or any ``distributed`` scheduler), the
stores' columns as Dask reads them, and checkpoint-weighted products of the pool's stored gradients with target
vectors as a Dask computation (the curvature methods' store path; LESS has its own breakdown in
:mod:`.less.dask`). Workers must see the stores at the same path (a shared file system, or a store URL every worker
can open)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ..core.chunks import ChunkedStore
from ..errors import InfluenceError
from ..gradients.store import GradientStore

LOCAL = "local"


def dask_device(device: str | None) -> str:
    """The device the scoring inputs are loaded on for Dask: the CPU, where workers score (a GPU
    asked for is refused rather than silently unused)."""
    if device not in (None, "cpu"):
        raise InfluenceError(f"--dask scores on the workers' CPUs: drop --device {device}, or drop --dask to score "
                             f"in one process on {device}")
    return "cpu"


@contextmanager
def dask_client(address: str = LOCAL, workers: int | None = None) -> Iterator:
    """A ``distributed`` client: of a new LocalCluster (``address`` ``"local"``: ``workers``
    single-threaded worker processes, default one per core) or of the scheduler at ``address``."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise InfluenceError("--dask needs dask and distributed: pip install 'influence[dask]'") from None
    if address == LOCAL:
        with LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError, ValueError) as err:
        raise InfluenceError(f"--dask {address}: cannot reach a Dask scheduler there ({err})") from None
    with client:
        yield client


class Checked:
    """A store's column as Dask reads it: every block through :meth:`ChunkedStore.read`, so a corrupt or missing
    chunk is the same named error on a worker as in the one-process stream."""

    def __init__(self, store: ChunkedStore, column: str):
        array = store.group[column]
        self.store, self.column = store, column
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key):
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        start, stop, _ = rows.indices(self.shape[0])
        block = self.store.read(self.column, start, stop)
        return block[(slice(None), *rest)] if rest else block


def products_on_dask(train: list[GradientStore], targets: list[torch.Tensor], weights, address: str = LOCAL,
                     rows_per_block: int | None = None, workers: int | None = None) -> np.ndarray:
    """``sum_c weights[c] * rows_c(x) . targets[c]^T`` for every pool row ``x`` as one Dask task per block of rows
    (``rows_per_block``, by default the stores' chunk): the (n_pool, n_target) float64 matrix, NaN rows where any
    store flagged the row; the same numbers as the one-process :func:`..products.pairwise_products`."""
    import dask.array as da

    rows = rows_per_block or train[0].chunk_size
    dim = targets[0].shape[1]
    grads = da.stack([da.from_array(Checked(store, "grads"), chunks=(rows, dim)) for store in train])
    finite = da.stack([da.from_array(Checked(store, "finite"), chunks=(rows,)) for store in train])
    sides = np.stack([t.float().cpu().numpy() for t in targets])
    products = da.blockwise(_product_block, "rt", grads, "crd", finite, "cr", new_axes={"t": sides.shape[1]},
                            concatenate=True, dtype=np.float64, sides=sides,
                            weights=np.asarray(weights, dtype=np.float64))
    with dask_client(address, workers) as client:
        return client.compute(products).result()


def _product_block(grads: np.ndarray, finite: np.ndarray, sides: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One block's products, as :func:`..products.pairwise_products` computes them (float32 products, summed in
    float64 over checkpoints)."""
    block = np.zeros((grads.shape[1], sides.shape[1]), dtype=np.float64)
    for rows, side, weight in zip(grads, sides, weights):
        block += weight * (torch.from_numpy(np.ascontiguousarray(rows)).float()
                           @ torch.from_numpy(side).T).double().numpy()
    block[~np.logical_and.reduce(finite, axis=0)] = np.nan
    return block
