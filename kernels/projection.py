"""Random Rademacher projection with signs computed from a counter-based hash, never stored.

The matrix ``R`` (``input_dim x output_dim``, entries +-1/sqrt(output_dim)) is a pure function of
``(seed, input_dim, output_dim)``:

* ``row_key[i]  = hash32((i + hash32(seed ^ 0x9E3779B9)) mod 2^32)`` for each input coordinate;
* ``word_key[w] = hash32((w + hash32(seed ^ 0x85EBCA6B)) mod 2^32)`` for each block of 32 outputs;
* ``R[i, j] = -1 if bit (j mod 32) of hash32(row_key[i] XOR word_key[j // 32]) is set, else +1``.

``hash32`` is a 32-bit integer mixer using only xor, logical shift and multiplication by a constant
below 2^27, so it is exact in torch int64 arithmetic (CPU fallback) and in Triton uint32 arithmetic
(GPU kernel): both paths produce the same signs bit for bit, on any device. One hash yields 32 signs.
"""

from __future__ import annotations

import math
import os

import torch

# This folder is the package influence.kernels; Python started in a checkout's root could also see it as
# `kernels`, the name of Hugging Face's package, which transformers imports. It is never that.
if not __name__.startswith("influence.kernels."):
    raise ImportError(f"{__file__} is part of influence: import influence.kernels.projection, not {__name__}")

MASK32 = 0xFFFFFFFF
MULTIPLIER = 0x45D9F3B
ROW_SALT = 0x9E3779B9
WORD_SALT = 0x85EBCA6B
KIND = "rademacher-hash32-v1"


def hash32(x: torch.Tensor) -> torch.Tensor:
    """32-bit mixer on int64 tensors holding values in [0, 2^32)."""
    x = (((x >> 16) ^ x) * MULTIPLIER) & MASK32
    x = (((x >> 16) ^ x) * MULTIPLIER) & MASK32
    return (x >> 16) ^ x


def _hash_scalar(value: int) -> int:
    return int(hash32(torch.tensor([value & MASK32], dtype=torch.int64))[0])


def row_keys(seed: int, start: int, stop: int, device=None) -> torch.Tensor:
    """int64 keys of input coordinates ``start..stop-1``."""
    base = _hash_scalar(seed ^ ROW_SALT)
    index = torch.arange(start, stop, dtype=torch.int64, device=device)
    return hash32((index + base) & MASK32)


def word_keys(seed: int, output_dim: int, device=None) -> torch.Tensor:
    """int64 keys of the ``ceil(output_dim / 32)`` blocks of 32 output coordinates."""
    base = _hash_scalar(seed ^ WORD_SALT)
    index = torch.arange(math.ceil(output_dim / 32), dtype=torch.int64, device=device)
    return hash32((index + base) & MASK32)


def sign_bits(rows: torch.Tensor, words: torch.Tensor, output_dim: int) -> torch.Tensor:
    """0/1 tile (len(rows) x output_dim), 1 meaning -1: the reference definition of the matrix."""
    mixed = hash32(rows[:, None] ^ words[None, :])  # (rows, words)
    shifts = torch.arange(32, dtype=torch.int64, device=rows.device)
    bits = (mixed[:, :, None] >> shifts) & 1  # (rows, words, 32)
    return bits.reshape(rows.shape[0], -1)[:, :output_dim]


FLOAT_ONE_BITS = 0x3F800000  # IEEE-754 bits of 1.0f; with bit 31 set they read -1.0f
_BIT_TO_SIGN_POSITION = {}


def _shifts(device) -> torch.Tensor:
    """``31 - t`` for t in 0..31: left shifts that move bit t of a word to the float sign bit."""
    key = str(device)
    if key not in _BIT_TO_SIGN_POSITION:
        _BIT_TO_SIGN_POSITION[key] = 31 - torch.arange(32, dtype=torch.int32, device=device)
    return _BIT_TO_SIGN_POSITION[key]


def sign_tile(
    seed: int, start: int, stop: int, output_dim: int, device=None, dtype=torch.int8,
    out: torch.Tensor | None = None, columns: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Rows ``start..stop-1`` (and output columns ``columns``, default all) of the unscaled +-1
    matrix, as ``dtype``.

    Same numbers as :func:`sign_bits`, computed faster: bit ``t`` of each word is shifted into the
    sign bit of an int32 whose other bits are those of 1.0f, so the float32 tile is written by three
    vectorised integer passes and no conversion. ``columns`` must start at a multiple of 32. ``out``
    (float32, contiguous, at least rows x columns rounded up to 32) is reused instead of a new tile.
    """
    first, last = columns or (0, output_dim)
    if first % 32 or not 0 <= first < last <= output_dim:
        raise ValueError(f"columns {columns} must start at a multiple of 32 and lie within {output_dim}")
    words = word_keys(seed, output_dim, device)[first // 32 : math.ceil(last / 32)]
    mixed = to_int32_bits(hash32(row_keys(seed, start, stop, device)[:, None] ^ words[None, :]))  # (rows, words)
    n_rows, n_words = mixed.shape
    if out is None:
        out = torch.empty(n_rows * n_words * 32, dtype=torch.float32, device=mixed.device)
    bits = out.view(-1)[: n_rows * n_words * 32].view(torch.int32).view(n_rows, n_words, 32)
    torch.bitwise_left_shift(mixed[:, :, None], _shifts(mixed.device), out=bits)
    bits.bitwise_and_(-(2**31)).bitwise_or_(FLOAT_ONE_BITS)
    signs = bits.view(torch.float32).view(n_rows, n_words * 32)[:, : last - first]
    return signs if dtype == torch.float32 else signs.to(dtype)


def to_int32_bits(keys: torch.Tensor) -> torch.Tensor:
    """Reinterpret int64 values in [0, 2^32) as int32 bit patterns (for the Triton kernel)."""
    return torch.where(keys >= 2**31, keys - 2**32, keys).to(torch.int32)


try:  # Triton is optional: CPU machines use the torch path.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _hash32_tl(x):
        x = ((x >> 16) ^ x) * 0x45D9F3B
        x = ((x >> 16) ^ x) * 0x45D9F3B
        return (x >> 16) ^ x

    @triton.jit
    def _project_kernel(
        g_ptr, out_ptr, row_key_ptr, word_key_ptr,
        n_rows, input_dim, output_dim,
        stride_gb, stride_gd, stride_ob, stride_ok,
        scale,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        words = tl.load(word_key_ptr + offs_k // 32, mask=offs_k < output_dim, other=0).to(tl.uint32, bitcast=True)
        bit_index = (offs_k % 32).to(tl.uint32)
        acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, input_dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < input_dim
            g = tl.load(
                g_ptr + offs_b[:, None] * stride_gb + offs_d[None, :] * stride_gd,
                mask=(offs_b[:, None] < n_rows) & mask_d[None, :],
                other=0.0,
            )
            rows = tl.load(row_key_ptr + offs_d, mask=mask_d, other=0).to(tl.uint32, bitcast=True)
            mixed = _hash32_tl(rows[:, None] ^ words[None, :])
            bits = (mixed >> bit_index[None, :]) & 1
            signs = (1.0 - 2.0 * bits.to(tl.float32)).to(g.dtype)
            if IEEE:
                acc += tl.dot(g, signs, input_precision="ieee")
            else:
                acc += tl.dot(g, signs)
        tl.store(
            out_ptr + offs_b[:, None] * stride_ob + offs_k[None, :] * stride_ok,
            acc * scale,
            mask=(offs_b[:, None] < n_rows) & (offs_k[None, :] < output_dim),
        )


def project_triton(
    grads: torch.Tensor, seed: int, output_dim: int, block_d: int = 64, block_k: int = 64
) -> torch.Tensor:
    """``grads @ R`` with signs generated in registers (fp32 accumulation). Needs Triton."""
    if not HAVE_TRITON:
        raise RuntimeError("Triton is not installed")
    if grads.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        grads = grads.float()  # the CPU interpreter's tl.dot mishandles bf16; GPUs run bf16 natively
    n_rows, input_dim = grads.shape
    rows = to_int32_bits(row_keys(seed, 0, input_dim, grads.device))
    words = to_int32_bits(word_keys(seed, output_dim, grads.device))
    out = torch.empty((n_rows, output_dim), dtype=torch.float32, device=grads.device)
    block_b = 16 if n_rows <= 16 else 32
    grid = (triton.cdiv(n_rows, block_b), triton.cdiv(output_dim, block_k))
    _project_kernel[grid](
        grads, out, rows, words,
        n_rows, input_dim, output_dim,
        grads.stride(0), grads.stride(1), out.stride(0), out.stride(1),
        1.0 / math.sqrt(output_dim),
        BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_K=block_k, IEEE=grads.dtype == torch.float32,
    )
    return out


def signs_triton(seed: int, input_dim: int, output_dim: int, device=None) -> torch.Tensor:
    """The full unscaled matrix as computed by the Triton kernel (for tests: project the identity)."""
    eye = torch.eye(input_dim, dtype=torch.float32, device=device)
    return torch.round(project_triton(eye, seed, output_dim) * math.sqrt(output_dim)).to(torch.int8)
