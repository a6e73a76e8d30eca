from pathlib import Path

import nbformat
from nbclient import NotebookClient

from influence.selection import rank

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_rankings.ipynb"


def test_notebook_runs_on_a_tiny_run(tiny_run, tmp_path, monkeypatch):
    out = Path(tiny_run["run"]) / "rank-less-tgt"
    rank(tiny_run["run"], tiny_run["target"], fraction=0.2, out=out)
    rank(tiny_run["run"], tiny_run["target"], method="random", fraction=0.2)  # another ranking to compare with
    monkeypatch.setenv("INFLUENCE_RUN", tiny_run["run"])
    monkeypatch.setenv("INFLUENCE_RANKING", str(out))
    monkeypatch.setenv("INFLUENCE_TASKS", "math,words")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
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
    rank(tiny_run["run"], None, method="el2n", fraction=0.2, out=out)
    monkeypatch.setenv("INFLUENCE_RUN", tiny_run["run"])
    monkeypatch.setenv("INFLUENCE_RANKING", str(out))
    monkeypatch.delenv("INFLUENCE_TASKS", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "=== top 5" in text and "nothing to compare" in text
