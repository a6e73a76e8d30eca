from pathlib import Path

import nbformat
from nbclient import NotebookClient

from influence.selection.rank import rank

ROOT = Path(__file__).resolve().parents[1]
# Two copies from one source (scripts/make_notebook.py; test_environment checks they match it): the checkout's
# notebooks/ folder and the one shipped in the package. Each test below executes one of them.
CHECKOUT_NOTEBOOK = ROOT / "notebooks" / "explore_rankings.ipynb"
PACKAGED_NOTEBOOK = ROOT / "influence" / "resources" / "notebooks" / "explore_rankings.ipynb"


def test_notebook_runs_on_a_tiny_run(tiny_run, tmp_path, monkeypatch):
    out = Path(tiny_run["run"]) / "rank-less-tgt"
    rank(tiny_run["run"], tiny_run["target"], fraction=0.2, out=out)
    rank(tiny_run["run"], tiny_run["target"], method="random", fraction=0.2)  # another ranking to compare with
    monkeypatch.setenv("INFLUENCE_RUN", tiny_run["run"])
    monkeypatch.setenv("INFLUENCE_RANKING", str(out))
    monkeypatch.setenv("INFLUENCE_TASKS", "math,words")
    notebook = nbformat.read(CHECKOUT_NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
    )
    assert "=== math: top 5" in outputs and "=== words: bottom 5" in outputs
    assert "4 selected" in outputs  # floor(23 examples x 0.2), as LESS counts --percentage
    assert "Spearman(score, response length) = " in outputs
    assert "rank-random-tgt" in outputs and "rank-less-tgt" in outputs  # the comparison table
    assert "space: grads" in outputs  # the selection's diversity against random and the pool
    assert any(o.get("data", {}).get("image/png") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


def test_notebook_runs_on_a_target_free_ranking(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "el2n"
    rank(tiny_run["run"], None, method="el2n", fraction=0.2, out=out, mode="bottom")
    monkeypatch.setenv("INFLUENCE_RUN", tiny_run["run"])
    monkeypatch.setenv("INFLUENCE_RANKING", str(out))
    monkeypatch.delenv("INFLUENCE_TASKS", raising=False)
    notebook = nbformat.read(PACKAGED_NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "=== top 5" in text and "nothing to compare" in text
    assert "x axis: el2n score (higher = harder)" in text and "more helpful" not in text
    assert "selection bounds: highest selected" in text  # a bottom selection is bounded from above


def test_notebook_command_points_a_copy_at_the_run(tiny_run, tmp_path):
    from click.testing import CliRunner

    from influence.cli import main

    ranking = tmp_path / "ranking"
    rank(tiny_run["run"], tiny_run["target"], fraction=0.2, out=ranking)
    out = tmp_path / "explore.ipynb"
    result = CliRunner().invoke(main, ["notebook", "--run", tiny_run["run"], "--ranking", str(ranking), "--out", str(out)])
    assert result.exit_code == 0, result.output
    first = next(c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code").source
    assert repr(str(Path(tiny_run["run"]).resolve())) in first and repr(str(ranking.resolve())) in first
    result = CliRunner().invoke(main, ["notebook", "--run", tiny_run["run"], "--ranking", str(ranking), "--out", str(out)])
    assert result.exit_code == 2 and "exists" in result.output


def test_the_notebook_opens_the_main_ranking_and_refuses_what_it_cannot_open(tiny_run, tmp_path):
    import json
    import shutil

    import pytest

    from influence.errors import InfluenceError
    from influence.report.notebook import copy_notebook
    from influence.selection.outputs import main_ranking, open_ranking

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run, ignore=shutil.ignore_patterns("rank-*", "*.ipynb"))
    with pytest.raises(InfluenceError, match=f"has no ranking yet: make one with `influence rank --run {run}"):
        copy_notebook(run)
    rank(run, None, method="random", fraction=0.2)
    assert main_ranking(run).name.startswith("rank-random")  # the only one
    rank(run, tiny_run["target"], fraction=0.2)
    rank(run, None, method="el2n", fraction=0.2)
    assert main_ranking(run).name.startswith("rank-less")  # LESS among several, though el2n is newer
    first = next(c for c in nbformat.read(copy_notebook(run), as_version=4).cells if c.cell_type == "code").source
    assert repr(str(main_ranking(run).resolve())) in first
    other = tmp_path / "other-ranking"  # the same pool's ranking, marked as another run's
    shutil.copytree(main_ranking(run), other)
    summary = json.loads((other / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps({**summary, "run_id": "someone-else"}))
    with pytest.raises(InfluenceError, match="a ranking of another run or pool"):
        open_ranking(run, other)
