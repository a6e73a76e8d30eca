"""The one random projector of the toolkit.

``Projector(input_dim, output_dim, seed).project(g)`` computes ``g @ R`` where ``R`` is a Rademacher
matrix scaled by ``1/sqrt(output_dim)`` (so squared norms are preserved in expectation) and is a pure
function of ``(seed, input_dim, output_dim)``: see :mod:`influence.kernels.projection`. The same
numbers come out on CPU and on any GPU, with the Triton kernel or the torch fallback. Unlike TRAK's
and LESS's projectors, the matrix is never materialised whole: the torch path keeps as many of its
signs as fit a memory budget (``cache_bytes``, one byte per sign) and regenerates the rest per call.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from ..core.threads import torch_threads
from ..kernels import projection as kernel

DEFAULT_CACHE_BYTES = 2 << 30


@dataclass(frozen=True)
class ProjectorSpec:
    """Everything that determines the projection; stored with every gradient store."""

    input_dim: int
    output_dim: int
    seed: int
    kind: str = kernel.KIND

    def to_dict(self) -> dict:
        return asdict(self)


def default_backend(device: torch.device) -> str:
    """Triton on CUDA when available; the torch fallback on CPU (override: INFLUENCE_PROJECTOR)."""
    forced = os.environ.get("INFLUENCE_PROJECTOR")
    if forced:
        return forced
    return "triton" if device.type == "cuda" and kernel.HAVE_TRITON else "torch"


class Projector:
    """``g @ R`` for the matrix of :class:`ProjectorSpec`, on any device.

    The torch path splits the output into fixed blocks of ``COLUMN_BLOCK`` columns and walks the input
    dimension in tiles of ``tile_bytes`` (float32), small enough to stay in the CPU cache while a
    tile's signs are generated and multiplied. The signs of the first input rows, as many whole tiles
    as fit ``cache_bytes`` at one byte per sign, are kept as int8 for later calls; the rest are
    regenerated on every call. Memory is therefore the output, ``cache_bytes`` and one tile per
    worker, whatever the dimensions.

    On CPU, worker threads (``workers``, default: torch's thread count) take whole column blocks,
    which is faster than torch's intra-op threading on these small products. Every output column is
    summed over the same tiles in the same order, so the result is the same for any number of
    workers and any cache budget.
    """

    COLUMN_BLOCK = 512

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        seed: int = 0,
        backend: str | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        tile_bytes: int = 4 << 20,
        workers: int | None = None,
    ):
        if input_dim >= 2**32:
            raise ValueError("input_dim must be below 2^32")
        if output_dim < 1:
            raise ValueError("output_dim must be positive")
        self.spec = ProjectorSpec(int(input_dim), int(output_dim), int(seed) & kernel.MASK32)
        self.backend = backend
        self.workers = workers
        self.column_blocks = [(c, min(c + self.COLUMN_BLOCK, output_dim)) for c in range(0, output_dim, self.COLUMN_BLOCK)]
        self.rows_per_tile = max(1, tile_bytes // (4 * min(self.COLUMN_BLOCK, output_dim)))
        whole_tiles = max(0, cache_bytes) // (output_dim * self.rows_per_tile)
        self.cached_rows = min(int(input_dim), whole_tiles * self.rows_per_tile)
        self._cache: dict[torch.device, torch.Tensor] = {}
        self._cache_complete: set[torch.device] = set()

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.spec.output_dim)

    @torch.no_grad()
    def _column_block(self, grads: torch.Tensor, first: int, last: int, out: torch.Tensor) -> None:
        """``out[:, first:last] = grads @ signs[:, first:last]`` (unscaled), tile by tile."""
        spec, device = self.spec, grads.device
        cached, fill = self._cache[device], device not in self._cache_complete
        buffer = torch.empty(self.rows_per_tile * (32 * math.ceil((last - first) / 32)), dtype=torch.float32, device=device)
        acc = torch.zeros((grads.shape[0], last - first), dtype=torch.float32, device=device)
        for start in range(0, spec.input_dim, self.rows_per_tile):
            stop = min(start + self.rows_per_tile, spec.input_dim)
            if stop <= self.cached_rows and not fill:
                tile = buffer[: (stop - start) * (last - first)].view(stop - start, last - first)
                tile.copy_(cached[start:stop, first:last])
            else:
                tile = kernel.sign_tile(spec.seed, start, stop, spec.output_dim, device, torch.float32, buffer, (first, last))
                if stop <= self.cached_rows:
                    cached[start:stop, first:last] = tile
            acc.addmm_(grads[:, start:stop], tile)
        out[:, first:last] = acc

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Project rows of ``grads`` (n x input_dim, fp32/bf16/fp16) to fp32 (n x output_dim)."""
        if grads.ndim != 2 or grads.shape[1] != self.spec.input_dim:
            raise ValueError(f"expected (n, {self.spec.input_dim}) gradients, got {tuple(grads.shape)}")
        backend = self.backend or default_backend(grads.device)
        if backend == "triton":
            return kernel.project_triton(grads.contiguous(), self.spec.seed, self.spec.output_dim)
        if backend != "torch":
            raise ValueError(f"unknown projector backend {backend!r}")
        device, grads = grads.device, grads.float()
        if device not in self._cache:
            self._cache[device] = torch.empty((self.cached_rows, self.spec.output_dim), dtype=torch.int8, device=device)
        out = torch.empty((grads.shape[0], self.spec.output_dim), dtype=torch.float32, device=device)
        workers = min(len(self.column_blocks), self.workers or (torch.get_num_threads() if device.type == "cpu" else 1))
        if workers > 1:
            with torch_threads(1), ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda block: self._column_block(grads, *block, out), self.column_blocks))
        else:
            for block in self.column_blocks:
                self._column_block(grads, *block, out)
        self._cache_complete.add(device)
        return out.mul_(self.scale)
