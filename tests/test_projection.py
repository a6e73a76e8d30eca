import os
import subprocess
import sys

import pytest
import torch

from influence.gradients.projection import Projector
from influence.kernels import projection as kernel


def test_signs_are_a_pure_function_of_seed_and_index():
    full = kernel.sign_tile(3, 0, 100, 70)
    # Any tiling gives the same rows: the sign of (i, j) depends on (seed, i, j) only.
    assert torch.equal(kernel.sign_tile(3, 40, 60, 70), full[40:60])
    # A larger output dimension extends, it does not reshuffle, the first columns.
    assert torch.equal(kernel.sign_tile(3, 0, 100, 96)[:, :70], full)
    assert not torch.equal(kernel.sign_tile(4, 0, 100, 70), full)
    assert set(full.unique().tolist()) == {-1, 1}
    assert abs(full.float().mean().item()) < 0.05


def test_golden_signs_never_change():
    """Stores written by other versions and machines rely on these exact numbers."""
    row = kernel.sign_tile(0, 0, 1, 40)[0].tolist()
    assert row == GOLDEN_ROW
    assert int(kernel.hash32(torch.tensor([123456789], dtype=torch.int64))[0]) == GOLDEN_HASH


# Reference values; hash32 also checked against a pure-Python evaluation of the same formula.
GOLDEN_ROW = [-1, -1, 1, 1, 1, 1, -1, 1, -1, -1, 1, -1, 1, 1, -1, -1, -1, -1, 1, 1,
              -1, -1, -1, 1, 1, -1, -1, -1, -1, 1, -1, 1, -1, 1, 1, -1, 1, -1, 1, 1]
GOLDEN_HASH = 1952335732


def test_hash32_exact_at_the_top_of_the_range():
    def reference(x):
        for _ in range(2):
            x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        return (x >> 16) ^ x

    values = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 123456789]
    got = kernel.hash32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [reference(v) for v in values]


def test_projection_is_linear_scaled_and_norm_preserving():
    torch.manual_seed(0)
    p = Projector(500, 2048, seed=1, backend="torch")
    x = torch.randn(64, 500)
    y = p.project(x)
    ratio = (y.norm(dim=1) / x.norm(dim=1)).square()
    assert abs(ratio.mean().item() - 1) < 0.02 and ratio.std().item() < 0.1
    direct = x @ (kernel.sign_tile(1, 0, 500, 2048).float() / 2048**0.5)
    torch.testing.assert_close(y, direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.project(2 * x[:3] + x[3:6]), 2 * y[:3] + y[3:6], rtol=1e-4, atol=1e-4)


def test_cache_and_tiles_do_not_change_numbers():
    x = torch.randn(4, 300)
    cached = Projector(300, 64, seed=2, backend="torch").project(x)
    streamed = Projector(300, 64, seed=2, backend="torch", cache_bytes=0, tile_bytes=64 * 4 * 7).project(x)
    torch.testing.assert_close(cached, streamed, rtol=1e-6, atol=1e-5)  # only the summation order differs
    assert torch.equal(cached, Projector(300, 64, seed=2, backend="torch").project(x))  # deterministic
    half = Projector(300, 64, seed=2, backend="torch").project(x.half())
    torch.testing.assert_close(half, Projector(300, 64, seed=2).project(x.half().float()))


def test_bad_shapes():
    with pytest.raises(ValueError, match="expected"):
        Projector(10, 4).project(torch.zeros(2, 11))


TRITON_CHECK = r"""
import torch
from influence.kernels import projection as k
from influence.gradients.projection import Projector
assert torch.equal(k.signs_triton(5, 37, 70), k.sign_tile(5, 0, 37, 70)), "signs differ"
x = torch.randn(19, 130)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    a = Projector(130, 70, 5, backend="triton").project(x.to(dtype))
    b = Projector(130, 70, 5, backend="torch").project(x.to(dtype))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
print("ok")
"""


def test_triton_kernel_matches_torch_bit_for_bit_in_interpreter():
    assert kernel.HAVE_TRITON, "triton is a dependency on Linux"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_fast_tile_equals_reference_bits():
    rows, words = kernel.row_keys(9, 1000, 1300), kernel.word_keys(9, 100)
    reference = 1 - 2 * kernel.sign_bits(rows, words, 100)
    for dtype in (torch.int8, torch.float32):
        assert torch.equal(kernel.sign_tile(9, 1000, 1300, 100, dtype=dtype).to(torch.int64), reference)


def test_cache_budget_and_workers_do_not_change_numbers(monkeypatch):
    monkeypatch.setattr(Projector, "COLUMN_BLOCK", 64)  # 96 outputs: blocks of 64 and 32 columns
    x = torch.randn(3, 400)
    tile = 64 * 4 * 16  # 16 input rows per tile
    full = Projector(400, 96, seed=4, backend="torch", tile_bytes=tile, workers=1)
    partial = Projector(400, 96, seed=4, backend="torch", tile_bytes=tile, cache_bytes=96 * 100, workers=2)
    streamed = Projector(400, 96, seed=4, backend="torch", tile_bytes=tile, cache_bytes=0, workers=3)
    assert full.column_blocks == [(0, 64), (64, 96)]
    assert (full.cached_rows, partial.cached_rows, streamed.cached_rows) == (400, 96, 0)  # whole tiles only
    results = [p.project(x) for p in (full, partial, streamed)]
    assert full._cache[x.device].nbytes == 400 * 96 and partial._cache[x.device].nbytes <= 96 * 100
    # every column summed over the same tiles in the same order, whatever the budget and the workers
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert all(torch.equal(results[0], p.project(x)) for p in (full, partial, streamed))  # second call, from cache
    assert torch.equal(full._cache[x.device], kernel.sign_tile(4, 0, 400, 96))
    direct = x @ (kernel.sign_tile(4, 0, 400, 96).float() / 96**0.5)
    torch.testing.assert_close(results[0], direct, rtol=1e-5, atol=1e-5)


def test_sign_tile_columns_are_slices_of_the_full_tile():
    full = kernel.sign_tile(5, 10, 30, 100)
    assert torch.equal(kernel.sign_tile(5, 10, 30, 100, columns=(32, 100)), full[:, 32:])
    assert torch.equal(kernel.sign_tile(5, 10, 30, 100, columns=(64, 70)), full[:, 64:70])
    with pytest.raises(ValueError, match="multiple of 32"):
        kernel.sign_tile(5, 10, 30, 100, columns=(10, 40))
