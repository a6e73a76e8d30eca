"""Stores beyond the local disk: a run's gradient stores at an fsspec URL (``memory://`` and ``file://``
here; ``s3://`` and ``gs://`` through the same code) hold the same numbers and score the same."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from influence.core.chunks import PARTIAL
from influence.core.naming import grads_group
from influence.core.storage import StoreRoot
from influence.errors import InfluenceError, RunError
from influence.gradients.collect import project_grads
from influence.gradients.store import GradientStore, stored_dims
from influence.scoring import score_many
from influence.train.run import Run

SETTINGS = dict(proj_dim=16, chunk_size=3, batch_size=2)


def _copy(tiny_run, folder: Path) -> Path:
    shutil.copytree(tiny_run["run"], folder, ignore=shutil.ignore_patterns("grads.zarr", "subsets.zarr", "lds", "rank-*",
                                                                           ".locks", ".claims"))
    return folder


def _arrays(root: StoreRoot) -> dict:
    group = root.open_group("", mode="r")
    return {name: (member[:] if isinstance(member, zarr.Array) else dict(member.attrs))
            for name, member in group.members(max_depth=None)}


@pytest.fixture(scope="module")
def local_run(tiny_run, tmp_path_factory):
    """The same stores in the run folder."""
    run_dir = _copy(tiny_run, tmp_path_factory.mktemp("local") / "run")
    project_grads(run_dir, tiny_run["target"], progress=False, **SETTINGS)
    return run_dir


@pytest.fixture(scope="module")
def local_arrays(local_run):
    return _arrays(StoreRoot(local_run / "grads.zarr"))


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_stores_at_a_url_equal_the_local_ones(tiny_run, local_run, local_arrays, tmp_path, scheme):
    run_dir = _copy(tiny_run, tmp_path / "run")
    url = f"memory://{tmp_path.name}/grads.zarr" if scheme == "memory" else (tmp_path / "elsewhere" / "grads.zarr").as_uri()
    project_grads(run_dir, tiny_run["target"], progress=False, store=url, **SETTINGS)
    run = Run(run_dir)
    assert str(run.store_path) == url.removeprefix("file://") and not (run_dir / "grads.zarr").exists()
    found = _arrays(run.store_path)
    assert found.keys() == local_arrays.keys()
    for name, value in local_arrays.items():
        if isinstance(value, dict):
            assert found[name] == value, name
        else:
            np.testing.assert_array_equal(found[name], value, err_msg=name)
    # every later command follows the run to its stores, without the URL
    here = score_many("less", run_dir, [tiny_run["target"]])[0]
    there = score_many("less", local_run, [tiny_run["target"]])[0]
    np.testing.assert_array_equal(here.score, there.score)
    assert project_grads(run_dir, tiny_run["target"], progress=False, **SETTINGS)[0].resumed_chunks > 0
    from influence.report.status import run_status

    stores = run_status(run_dir)["stores"]
    assert len(stores) == 4 and all(s["state"] == "complete" and s["bytes"] > 0 for s in stores)
    if scheme == "memory":
        assert all(s["store"].startswith(url + "/dim16/") for s in stores)


def test_a_cut_publication_on_an_object_store_is_no_store(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path / "run")
    url = f"memory://{tmp_path.name}/grads.zarr"
    project_grads(run_dir, None, progress=False, store=url, **SETTINGS)
    root = Run(run_dir).store_path
    path = grads_group(16, "train", "epoch-1")
    # a crash while members were moved in: the group's zarr.json (moved last) never arrived
    root.fs.rm(f"{root.base}/{path}/zarr.json")
    root.fs.pipe(f"{root.base}/{path}{PARTIAL}123-abc/zarr.json", b"{}")  # and a build left behind
    assert not root.has_group(path)
    with pytest.raises(InfluenceError, match="no store at"):
        GradientStore.open(root, path)
    project_grads(run_dir, None, progress=False, **SETTINGS)  # rebuilt whole
    assert GradientStore.open(root, path).complete
    assert [c for c in root.children("dim16/train") if PARTIAL in c] == []
    assert stored_dims(root) == [16]


def test_a_run_keeps_its_stores_in_one_place(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path / "run")
    project_grads(run_dir, None, progress=False, **SETTINGS)
    with pytest.raises(RunError, match="cannot move"):
        project_grads(run_dir, None, progress=False, store=f"memory://{tmp_path.name}/grads.zarr", **SETTINGS)
    project_grads(run_dir, None, progress=False, store=str(run_dir / "grads.zarr"), **SETTINGS)  # where they are
    with pytest.raises(InfluenceError, match="nosuchprotocol://x"):
        project_grads(run_dir, None, progress=False, store="nosuchprotocol://x/grads.zarr", **SETTINGS)
    (run_dir / "stores.json").write_text("{oops")
    with pytest.raises(RunError, match="stores.json: not readable"):
        Run(run_dir).store_path
