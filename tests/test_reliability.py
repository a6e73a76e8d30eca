"""Nothing shared is destroyed or silently wrong: the reliability sweep of issue 26 as a suite. Corrupted, deleted and
truncated chunks are found (and repaired); no run writes into another run's stores or rankings; rankings that select
differently never share a folder and are published whole; resources are checked before work; the environment's
refusals are one line."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from influence.cli import main
from influence.core.locks import writer_lock
from influence.errors import InfluenceError, RunError, StoreCorruptError
from influence.gradients.collect import project_grads
from influence.report.notebook import copy_notebook
from influence.scoring import score
from influence.selection.rank import rank

GRADS = Path("grads.zarr") / "dim64" / "train" / "epoch-1"


def whole_copy(tiny_run, tmp_path, name: str) -> Path:
    """The tiny run with its stores (the same run: the same id)."""
    return Path(shutil.copytree(tiny_run["run"], tmp_path / name))


def another_run(tiny_run, tmp_path, name: str, stores: bool = False) -> Path:
    """A copy of the tiny run made another run (its own id), with or without the gradient stores."""
    ignore = None if stores else shutil.ignore_patterns("grads.zarr")
    folder = Path(shutil.copytree(tiny_run["run"], tmp_path / name, ignore=ignore))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["run_id"] = "0" * 32
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if stores:
        shutil.rmtree(folder / "grads.zarr")
    return folder


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1. corrupted, deleted and truncated chunks --------------------------------------------------------------------------
def test_a_flipped_byte_is_found_by_rank_and_verify_and_repaired(tiny_run, tmp_path):
    run = whole_copy(tiny_run, tmp_path, "flipped")
    reference = rank(run, tiny_run["target"], write=False, space="none")
    chunk = run / GRADS / "grads" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0x10
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match=r"chunk 1 of 'grads' \(rows 5-9\) cannot be read \(checksum mismatch\)"):
        rank(run, tiny_run["target"], write=False, space="none")
    runner = CliRunner()
    result = runner.invoke(main, ["verify", "--run", str(run)])
    assert result.exit_code == 4 and "corrupt:" in result.output and "chunk 1 of 'grads'" in result.output
    assert "1 problem(s)" in runner.invoke(main, ["status", "--run", str(run)]).output
    assert runner.invoke(main, ["verify", "--run", str(run), "--repair"]).exit_code == 0
    project_grads(run, tiny_run["target"], proj_dim=64, chunk_size=5, progress=False)  # recomputes that chunk alone
    assert runner.invoke(main, ["verify", "--run", str(run)]).exit_code == 0
    repaired = rank(run, tiny_run["target"], write=False, space="none")
    pd.testing.assert_frame_equal(repaired, reference)


def test_verify_repairs_only_when_no_other_command_writes_the_run(tiny_run, tmp_path):
    run = whole_copy(tiny_run, tmp_path, "busy")
    with writer_lock(run, "project-grads", shared=True):  # a project-grads at work
        result = CliRunner().invoke(main, ["verify", "--run", str(run), "--repair"])
        assert result.exit_code == 2 and "another influence process is writing" in result.output
        assert CliRunner().invoke(main, ["verify", "--run", str(run)]).exit_code == 0  # checking alone reads
    assert CliRunner().invoke(main, ["verify", "--run", str(run), "--repair"]).exit_code == 0


def test_a_deleted_chunk_file_is_an_error_not_a_zero(tiny_run, tmp_path):
    run = whole_copy(tiny_run, tmp_path, "deleted")
    (run / GRADS / "norms" / "c" / "2").unlink()
    with pytest.raises(StoreCorruptError, match=r"chunk 2 of 'norms' \(rows 10-14\) is missing"):
        score("grand", run)
    result = CliRunner().invoke(main, ["verify", "--run", str(run)])
    assert result.exit_code == 4 and "is missing" in result.output


def test_a_truncated_chunk_names_the_store_chunk_and_rows(tiny_run, tmp_path):
    run = whole_copy(tiny_run, tmp_path, "truncated")
    chunk = run / GRADS / "grads" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(StoreCorruptError, match=r"dim64/train/epoch-1: chunk 0 of 'grads' \(rows 0-4\)") as refused:
        score("less", run, tiny_run["target"])
    assert "influence verify --run RUN --repair" in str(refused.value) and "influence project-grads" in str(refused.value)


# 2. a run owns its stores and rankings --------------------------------------------------------------------------------
def test_another_runs_store_is_never_taken(tiny_run, tmp_path):
    a = whole_copy(tiny_run, tmp_path, "a")
    before = files(a / "grads.zarr")
    b = another_run(tiny_run, tmp_path, "b")
    with pytest.raises(RunError, match=r"holds the stores of run .*\(id [0-9a-f]{32}\), not of .*b \(id 0{32}\)"):
        project_grads(b, tiny_run["target"], proj_dim=64, chunk_size=5, progress=False, store=f"file://{a / 'grads.zarr'}")
    assert not (b / "stores.json").exists() and files(a / "grads.zarr") == before
    for overwrite in (False, True):  # a store of A copied into B's folder is refused too, --overwrite or not
        c = another_run(tiny_run, tmp_path, f"c{overwrite}")
        shutil.copytree(a / "grads.zarr", c / "grads.zarr")
        with pytest.raises(RunError, match="another run|holds the stores of run"):
            project_grads(c, None, proj_dim=64, chunk_size=5, progress=False, overwrite=overwrite)
        with pytest.raises(RunError):
            score("less", c, tiny_run["target"])


def test_another_runs_ranking_is_never_replaced(tiny_run, tmp_path):
    a = whole_copy(tiny_run, tmp_path, "a")
    rank(a, tiny_run["target"], method="random", out=a / "mine", space="none")
    before = files(a / "mine")
    b = another_run(tiny_run, tmp_path, "b", stores=True)
    for overwrite in (False, True):
        with pytest.raises(RunError, match=r"the ranking in .*mine belongs to another run"):
            rank(b, tiny_run["target"], method="random", out=a / "mine", overwrite=overwrite, space="none")
    assert files(a / "mine") == before
    with pytest.raises(InfluenceError, match="another run or pool"):
        copy_notebook(b, a / "mine", tmp_path / "explore.ipynb")
    assert not (tmp_path / "explore.ipynb").exists()


# 3. one folder per distinct ranking, every selection option honoured or refused ----------------------------------------
def test_rankings_that_select_differently_never_share_a_folder(tiny_run, tmp_path):
    run = whole_copy(tiny_run, tmp_path, "distinct")
    for earlier in run.glob("rank-*"):  # rankings other tests wrote into the shared tiny run
        shutil.rmtree(earlier)
    plain = rank(run, None, method="nll", space="none")
    middle = rank(run, None, method="nll", mode="middle", space="none")
    diverse = rank(run, tiny_run["target"], diversify="kcenter", fraction=0.3)
    assert {p.name for p in run.glob("rank-*")} == {"rank-nll", "rank-nll-middle", "rank-less-tgt-kcenter"}
    assert plain["selected"].sum() != middle["selected"].sum() and diverse["selected"].sum() == 6
    with pytest.raises(InfluenceError, match=r"made with other settings \(fraction differ"):
        rank(run, None, method="nll", fraction=0.5, space="none")
    rank(run, None, method="nll", fraction=0.5, space="none", overwrite=True)  # replacing one's own: asked for
    with pytest.raises(InfluenceError, match="--top-k applies to --select top / bottom, not --select middle"):
        rank(run, None, method="nll", mode="middle", top_k=10, space="none")
    rank(run, tiny_run["target"], method="dsir", fraction=0.2, space="none")
    mine = files(run / "rank-dsir-tgt")
    CliRunner().invoke(main, ["compare", "--run", str(run), "--target", tiny_run["target"], "--methods", "less,dsir",
                              "--fraction", "0.1"])
    assert files(run / "rank-dsir-tgt") == mine and (run / "compare-tgt" / "dsir" / "summary.json").is_file()


# 4. outputs published whole ------------------------------------------------------------------------------------------
def test_a_rank_killed_while_writing_leaves_the_previous_ranking_whole(tiny_run, tmp_path, monkeypatch):
    run = whole_copy(tiny_run, tmp_path, "killed")
    rank(run, None, method="random", out=run / "r", space="none")
    before = files(run / "r")
    original = pd.DataFrame.to_parquet

    def dies(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", dies)
    with pytest.raises(KeyboardInterrupt):
        rank(run, None, method="random", seed=1, out=run / "r", space="none", overwrite=True)
    assert files(run / "r") == before and list(run.glob(".r.partial-*"))  # the torn copy is beside, not in place
    monkeypatch.setattr(pd.DataFrame, "to_parquet", original)
    rank(run, None, method="random", seed=1, out=run / "r", space="none", overwrite=True)
    assert not list(run.glob(".r.*")) and json.loads((run / "r" / "summary.json").read_text())["seed"] == 1


def test_a_full_disk_while_ranking_is_one_line_and_keeps_the_ranking(tiny_run, tmp_path, monkeypatch):
    run = whole_copy(tiny_run, tmp_path, "full")
    rank(run, None, method="random", out=run / "r", space="none")
    before = files(run / "r")

    def full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    result = CliRunner().invoke(main, ["rank", "--run", str(run), "--method", "random", "--seed", "2", "--out",
                                       str(run / "r"), "--space", "none", "--overwrite"])
    assert result.exit_code == 2 and "no space left on the device" in result.output
    assert "Traceback" not in result.output and files(run / "r") == before


# 5. resources checked before work ------------------------------------------------------------------------------------
def test_an_absurd_projection_is_refused_before_any_allocation(tiny_run, tmp_path, monkeypatch, capsys):
    import influence.gradients.collect as collect

    run = whole_copy(tiny_run, tmp_path, "absurd")
    monkeypatch.setattr(collect, "available_memory", lambda: 8 << 30)
    with pytest.raises(InfluenceError, match=r"to 100000000 dimensions needs ~\d+\.\d\d GiB of memory, and 8\.00 GiB"):
        project_grads(run, None, proj_dim=100_000_000, progress=False)
    assert not (run / "grads.zarr" / "dim100000000").exists()
    assert score("less", run, tiny_run["target"]).score.shape == (23,)  # the existing dimension still serves
    project_grads(run, None, proj_dim=100_000, dry_run=True)
    assert "is larger than the gradient itself" in capsys.readouterr().err
    monkeypatch.setattr(collect, "free_disk", lambda path: 1024)
    with pytest.raises(InfluenceError, match=r"project-grads' stores needs ~\d+\.\d\d GiB of disk"):
        project_grads(run, None, proj_dim=32, chunk_size=5, progress=False)
    assert not (run / "grads.zarr" / "dim32").exists()


def test_an_unfinished_dimension_never_blocks_the_complete_one(tiny_run, tmp_path):
    run = whole_copy(tiny_run, tmp_path, "unfinished")
    shutil.copytree(run / "grads.zarr" / "dim64", run / "grads.zarr" / "dim48")
    for done in (run / "grads.zarr" / "dim48").rglob("done"):
        shutil.rmtree(done / "c")  # no chunk written yet: an interrupted new dimension
    assert score("less", run, tiny_run["target"]).details["projector"]["output_dim"] == 64


# 7. the environment's refusals -----------------------------------------------------------------------------------------
def test_refusals_of_the_file_system_are_one_line(tiny_run, tmp_path):
    runner = CliRunner()
    run = str(whole_copy(tiny_run, tmp_path, "file-system"))
    assert runner.invoke(main, ["rank", "--run", run, "--method", "random"]).exit_code == 0  # the notebook needs one
    for args in (["rank", "--run", run, "--method", "random", "--out", "/proc/nope/x"],
                 ["notebook", "--run", run, "--out", "/proc/nope/x.ipynb"],
                 ["warmup", "--model", "tiny-llama", "--out", "/proc/nope/run"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2 and result.output.startswith("error: /proc/nope"), result.output
        assert "Traceback" not in result.output and result.output.count("\n") == 1


def test_no_lock_file_is_left_in_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    result = CliRunner().invoke(main, ["project-grads", "--run", str(folder)])
    assert result.exit_code == 2 and "no manifest.json" in result.output and not list(folder.iterdir())


def test_what_killed_writers_left_is_cleaned_by_the_next_one(tiny_run, tmp_path):
    run = whole_copy(tiny_run, tmp_path, "leftovers")
    stray = run / "grads.zarr" / "dim64" / "train" / "epoch-1.partial-999-deadbeef"
    stray.mkdir()
    (stray / "zarr.json").write_text("{}")
    project_grads(run, tiny_run["target"], proj_dim=64, chunk_size=5, progress=False)  # complete: nothing to redo
    assert not stray.exists()
    assert "being created" not in CliRunner().invoke(main, ["status", "--run", str(run)]).output
