"""The one random projector of the toolkit.

``Projector(input_dim, output_dim, seed).project(g)`` computes ``g @ R`` where ``R`` is a Rademacher
matrix scaled by ``1/sqrt(output_dim)`` (so squared norms are preserved in expectation) and is a pure
function of ``(seed, input_dim, output_dim)``: see :mod:`influence.kernels.projection`. The same
numbers come out on CPU and on any GPU, with the Triton kernel or the torch fallback. Unlike TRAK's
and LESS's projectors, the matrix is never materialised whole unless it fits a memory budget you set
(``cache_bytes``), in which case the torch path keeps its signs as int8 to avoid regenerating them.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch

from .kernels import projection as kernel

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
    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        seed: int = 0,
        backend: str | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        tile_bytes: int = 64 << 20,
    ):
        if input_dim >= 2**32:
            raise ValueError("input_dim must be below 2^32")
        if output_dim < 1:
            raise ValueError("output_dim must be positive")
        self.spec = ProjectorSpec(int(input_dim), int(output_dim), int(seed) & kernel.MASK32)
        self.backend = backend
        self.cache_bytes = cache_bytes
        self.rows_per_tile = max(1, tile_bytes // (4 * output_dim))
        self._cache: dict[torch.device, list[torch.Tensor]] = {}

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.spec.output_dim)

    def _tiles(self, device: torch.device):
        """(start, stop, sign tile) over the input dimension.

        Tiles are kept for later calls when the whole matrix fits ``cache_bytes``: as float32 (no
        conversion per call) if that fits, else as int8; otherwise they are regenerated every call.
        """
        spec = self.spec
        if device in self._cache:
            yield from self._cache[device]
            return
        entries = spec.input_dim * spec.output_dim
        cacheable = entries <= self.cache_bytes
        dtype = torch.float32 if 4 * entries <= self.cache_bytes or not cacheable else torch.int8
        tiles = []
        for start in range(0, spec.input_dim, self.rows_per_tile):
            stop = min(start + self.rows_per_tile, spec.input_dim)
            tile = (start, stop, kernel.sign_tile(spec.seed, start, stop, spec.output_dim, device, dtype))
            if cacheable:
                tiles.append(tile)
            yield tile
        if cacheable:
            self._cache[device] = tiles

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Project rows of ``grads`` (n x input_dim, fp32/bf16/fp16) to fp32 (n x output_dim)."""
        if grads.ndim != 2 or grads.shape[1] != self.spec.input_dim:
            raise ValueError(f"expected (n, {self.spec.input_dim}) gradients, got {tuple(grads.shape)}")
        backend = self.backend or default_backend(grads.device)
        if backend == "triton":
            return kernel.project_triton(grads.contiguous(), self.spec.seed, self.spec.output_dim)
        if backend != "torch":
            raise ValueError(f"unknown projector backend {backend!r}")
        out = torch.zeros((grads.shape[0], self.spec.output_dim), dtype=torch.float32, device=grads.device)
        for start, stop, tile in self._tiles(grads.device):
            out.addmm_(grads[:, start:stop].float(), tile if tile.dtype == torch.float32 else tile.float())
        return out.mul_(self.scale)
