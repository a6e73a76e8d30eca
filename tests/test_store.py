import shutil

import numpy as np
import pytest
import zarr

from influence.errors import InfluenceError, StoreCorruptError, StoreMismatchError
from influence.gradients.collect import project_grads
from influence.gradients.projection import Projector
from influence.gradients.store import GradientStore
from influence.train.run import Run

from .conftest import group


def _copy_run(tiny_run, tmp_path, name):
    dest = tmp_path / name
    shutil.copytree(tiny_run["run"], dest, ignore=shutil.ignore_patterns("grads.zarr"))
    return dest


def test_store_contents_and_metadata(tiny_run):
    run = Run(tiny_run["run"])
    store = GradientStore.open(run.store_path, group("train", "epoch-1"))
    m = store.metadata
    assert m["gradient_type"] == "adam" and m["dtype"] == "float16" and m["projector"]["output_dim"] == 64
    assert m["checkpoint"] == "epoch-1" and m["adapter_sha256"] == run.checkpoints()[0].adapter_sha256()
    assert m["model"].startswith("tiny-llama@")
    grads = store.array("grads")
    assert grads.dtype == np.float16 and grads.shape == (23, 64)
    assert store.complete and store.array("finite").all()
    assert (store.array("norms") > 0).all() and (store.array("n_tokens") > 0).all()
    assert store.ids[0] == "chat.jsonl#0" and store.ids[-1] == "p3.jsonl#8"
    target = GradientStore.open(run.store_path, group(tiny_run["target_dataset"], "epoch-1"))
    assert target.metadata["gradient_type"] == "sgd" and set(target.tasks) == {"math", "words"}
    assert zarr.open_array(str(run.path / "grads.zarr" / "dim64" / "train" / "epoch-1" / "grads")).chunks == (5, 64)


def test_resume_after_crash_is_identical(tiny_run, tmp_path, monkeypatch):
    crashed = _copy_run(tiny_run, tmp_path, "crashed")
    calls = {"n": 0}
    original = Projector.project

    def flaky(self, grads):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash")
        return original(self, grads)

    monkeypatch.setattr(Projector, "project", flaky)
    with pytest.raises(KeyboardInterrupt):
        project_grads(crashed, tiny_run["target"], proj_dim=64, batch_size=4, chunk_size=5, progress=False)
    store = GradientStore.open(crashed / "grads.zarr", group("train", "epoch-1"))
    assert 0 < len(store.pending_chunks()) < store.n_chunks
    with pytest.raises(InfluenceError, match="incomplete"):
        next(store.iter_chunks())
    monkeypatch.setattr(Projector, "project", original)
    reports = project_grads(crashed, tiny_run["target"], proj_dim=64, batch_size=4, chunk_size=5, progress=False)
    assert reports[0].resumed_chunks > 0
    reference = Run(tiny_run["run"]).store_path
    for path in [group(d, c) for d in ("train", tiny_run["target_dataset"]) for c in ("epoch-1", "epoch-2")]:
        for array in ("grads", "norms", "loss", "n_tokens", "finite"):
            a = GradientStore.open(crashed / "grads.zarr", path).array(array)
            b = GradientStore.open(reference, path).array(array)
            np.testing.assert_array_equal(a, b, err_msg=f"{path}/{array}")


def test_projection_buffer_size_does_not_change_the_store(tiny_run, tmp_path, monkeypatch):
    """The default buffers a whole chunk per projection call here; a 1-byte budget projects each batch."""
    import influence.gradients.collect

    calls = {"n": 0}
    original = Projector.project

    def counting(self, grads):
        calls["n"] += 1
        return original(self, grads)

    monkeypatch.setattr(Projector, "project", counting)
    monkeypatch.setattr(influence.gradients.collect, "PROJECTION_BUFFER_BYTES", 1)
    per_batch = _copy_run(tiny_run, tmp_path, "per-batch")
    project_grads(per_batch, tiny_run["target"], proj_dim=64, batch_size=4, chunk_size=5, progress=False)
    train = GradientStore.open(per_batch / "grads.zarr", group("train", "epoch-1"))
    assert calls["n"] > 2 * 2 * train.n_chunks  # two batches per chunk of 5, two checkpoints, plus targets
    for path in (group("train", "epoch-1"), group(tiny_run["target_dataset"], "epoch-2")):
        a = GradientStore.open(per_batch / "grads.zarr", path).array("grads").astype(np.float32)
        b = GradientStore.open(Run(tiny_run["run"]).store_path, path).array("grads").astype(np.float32)
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-4, err_msg=path)


@pytest.mark.parametrize(
    "kwargs,field",
    [({"proj_dim": 64, "seed": 7}, "projector"), ({"proj_dim": 64, "chunk_size": 4}, "chunk_size")],
)
def test_reopening_with_other_settings_is_refused(tiny_run, kwargs, field):
    with pytest.raises(StoreMismatchError) as info:
        project_grads(tiny_run["run"], None, progress=False, **{"batch_size": 4, "chunk_size": 5, **kwargs})
    assert info.value.field == field and field in str(info.value)


def test_overwrite_replaces_incompatible_store(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "over")
    project_grads(run_dir, None, proj_dim=64, chunk_size=5, progress=False)
    project_grads(run_dir, None, proj_dim=64, seed=7, chunk_size=5, overwrite=True, progress=False)
    assert GradientStore.open(run_dir / "grads.zarr", group("train", "epoch-1")).metadata["projector"]["seed"] == 7


def test_several_dimensions_in_one_pass_equal_separate_passes(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path, "dims")
    project_grads(run_dir, tiny_run["target"], proj_dim=[32, 64], batch_size=4, chunk_size=5, progress=False)
    single = _copy_run(tiny_run, tmp_path, "dim32")
    project_grads(single, tiny_run["target"], proj_dim=32, batch_size=4, chunk_size=5, progress=False)
    for dim, reference in ((64, Run(tiny_run["run"]).store_path), (32, single / "grads.zarr")):
        for dataset in ("train", tiny_run["target_dataset"]):
            path = group(dataset, "epoch-2", dim)
            a = GradientStore.open(run_dir / "grads.zarr", path)
            assert a.metadata["projector"]["output_dim"] == dim
            np.testing.assert_array_equal(a.array("grads"), GradientStore.open(reference, path).array("grads"))


def test_nonfinite_rows_are_flagged(tmp_path):
    meta = {"model": "m", "checkpoint": "c", "adapter_sha256": "h", "gradient_type": "sgd", "feature": "g",
            "projector": {"output_dim": 3}, "dtype": "float16", "dataset": "d", "n_examples": 4,
            "examples_sha256": "x", "max_length": 8, "chunk_size": 2}
    store = GradientStore.open_or_create(tmp_path / "s.zarr", "d/c", meta, ["a", "b", "c", "d"], [""] * 4)
    grads = np.array([[1, 2, 3], [np.nan, 0, 0]], dtype=np.float32)
    store.write_chunk(0, grads, np.array([1.0, np.inf]), np.array([0.5, 0.5]), np.array([3, 3]))
    assert store.pending_chunks() == [1]
    assert store.array("finite")[:2].tolist() == [True, False]
    with pytest.raises(ValueError, match="chunk 1 of 'grads' expects"):
        store.write_chunk(1, grads[:1], np.ones(1), np.ones(1), np.ones(1))


def test_map_in_order_keeps_order_bounds_the_work_and_raises_where_an_item_fails():
    import threading
    import time

    import torch

    from influence.core.threads import map_in_order, torch_threads

    assert list(map_in_order(lambda i: i * i, range(7), 3)) == [0, 1, 4, 9, 16, 25, 36]
    assert list(map_in_order(lambda i: i, [], 2)) == []
    started, lock = [], threading.Lock()

    def slow_then_fail(i):
        with lock:
            started.append(i)
        time.sleep(0.01 * (3 - i % 3))  # later items finish first: the order is still the items'
        if i == 4:
            raise OSError("chunk 4 unreadable")
        return i

    results = map_in_order(slow_then_fail, range(100), 2)
    assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
    assert max(started) <= 6  # at most `workers` items ahead of the one handed back
    with pytest.raises(OSError, match="chunk 4 unreadable"):
        next(results)
    before = torch.get_num_threads()
    with torch_threads(1) as threads:
        assert threads == before and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def _small_store(tmp_path, rows: int, dim: int, chunk: int, checksums: bool = True) -> GradientStore:
    meta = {"model": "m", "checkpoint": "c", "adapter_sha256": "-", "gradient_type": "sgd", "feature": "f",
            "projector": {"output_dim": dim}, "dtype": "float16", "dataset": "train", "n_examples": rows,
            "examples_sha256": "x", "max_length": 0, "chunk_size": chunk}
    return GradientStore.open_or_create(tmp_path / "g.zarr", "train/c", meta, [str(i) for i in range(rows)],
                                        [""] * rows, checksums=checksums)


@pytest.mark.parametrize("checksums", [True, False])
def test_chunk_files_read_directly_equal_zarr_reads(tmp_path, checksums):
    """Plain local chunks are read from their files (one copy, the checksum checked); every row range, the short
    last chunk, a reused output buffer and an unwritten chunk read as Zarr reads them; a changed or truncated
    chunk is never read as if whole."""
    rows, dim = 23, 6
    store = _small_store(tmp_path, rows, dim, 5, checksums)
    values = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float16)
    for chunk in store.pending_chunks():
        if chunk != 2:  # chunk 2 is never written: Zarr's fill value
            start, stop = store.chunk_bounds(chunk)
            store.write_chunk(chunk, values[start:stop], np.ones(stop - start), np.ones(stop - start),
                              np.ones(stop - start, dtype=np.int32))
    array = store.group["grads"]
    assert store._chunk_files("grads", array) is not None  # the direct path is the one under test
    for start, stop in [(0, 23), (0, 5), (5, 10), (3, 12), (20, 23), (21, 22), (10, 15)]:
        direct = store._read_files("grads", array, start, stop)
        assert direct.dtype == np.float16 and direct.shape == (stop - start, dim)
        np.testing.assert_array_equal(direct, array[start:stop])
    out = np.full((5, dim), 7, dtype=np.float16)
    assert store.read("grads", 5, 10, out=out) is out and np.array_equal(out, values[5:10])
    short = store.read("grads", 20, 23, out=out)  # a buffer of another length is not used
    assert short is not out and np.array_equal(short, values[20:23]) and np.array_equal(out, values[5:10])
    chunk = tmp_path / "g.zarr" / "train" / "c" / "grads" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0x10
    chunk.write_bytes(bytes(raw))
    if checksums:  # the direct path steps aside and Zarr's read names the chunk
        assert store._read_files("grads", array, 5, 10) is None
        with pytest.raises(StoreCorruptError, match=r"chunk 1 of 'grads' \(rows 5-9\) cannot be read \(checksum"):
            store.read("grads", 5, 10)
    chunk.write_bytes(bytes(raw[:-9]))  # truncated
    assert store._read_files("grads", array, 5, 10) is None
    with pytest.raises(StoreCorruptError, match=r"chunk 1 of 'grads' \(rows 5-9\) cannot be read"):
        store.read("grads", 5, 10)
    assert store._read_files("grads", array, 20, 24) is None  # past the end: Zarr's read decides
    (tmp_path / "g.zarr" / "train" / "c" / "grads" / "c" / "3" / "0").unlink()  # a written chunk's file deleted
    if checksums:  # the direct read fills it as never written; the done flag says it was (chunk files are listed
        # once per store object: a reopened store sees the deletion)
        with pytest.raises(StoreCorruptError, match=r"chunk 3 of 'grads' \(rows 15-19\) is missing"):
            GradientStore.open(tmp_path / "g.zarr", "train/c").read("grads", 12, 18)


def test_map_blocks_gives_the_same_results_with_any_workers_and_restores_torch_threads(tmp_path):
    """The block loop of the streamed scorers: every block once, in order, the same rows whatever the workers (each
    reads into its own reused buffers); torch's thread count is back after the loop, an early stop or an error."""
    import torch

    from influence.gradients.store import map_blocks

    rows, dim = 41, 6
    store = _small_store(tmp_path, rows, dim, 4)
    values = np.random.default_rng(1).standard_normal((rows, dim)).astype(np.float16)
    for chunk in store.pending_chunks():
        start, stop = store.chunk_bounds(chunk)
        store.write_chunk(chunk, values[start:stop], np.ones(stop - start), np.ones(stop - start),
                          np.ones(stop - start, dtype=np.int32))

    def work(start, blocks, finite):
        return start, blocks[0].astype(np.float32).sum(axis=1), finite.copy(), torch.get_num_threads()

    before = torch.get_num_threads()
    for kwargs in ({"workers": 1}, {"workers": 3}, {"parallel": False}, {"workers": 2, "rows_per_block": 7}):
        results = list(map_blocks([store, store], work, **kwargs))
        starts = [r[0] for r in results]
        assert starts == list(range(0, rows, kwargs.get("rows_per_block", 4)))
        np.testing.assert_array_equal(np.concatenate([r[1] for r in results]), values.astype(np.float32).sum(axis=1))
        assert all(r[2].shape == (2, len(r[1])) and r[2].all() for r in results)
        expected = before if kwargs.get("parallel") is False else -(-before // kwargs["workers"])
        assert {r[3] for r in results} == {expected}  # each worker's share of the cores
        assert torch.get_num_threads() == before
    blocks = map_blocks([store], work, workers=2)
    next(blocks)
    blocks.close()  # an early stop
    assert torch.get_num_threads() == before

    def failing(start, blocks, finite):
        if start >= 8:
            raise OSError(f"block at {start} unreadable")
        return start

    with pytest.raises(OSError, match="block at 8 unreadable"):
        list(map_blocks([store], failing, workers=2))
    assert torch.get_num_threads() == before


def test_compressed_columns_are_read_by_zarr(tmp_path):
    store = _small_store(tmp_path, 4, 3, 4)
    assert store._chunk_files("finite", store.group["finite"]) is None  # zstd-compressed: Zarr decodes it
    assert store._chunk_files("grads", store.group["grads"]) is not None
