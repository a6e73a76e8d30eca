"""The notebook shipped with the package (``influence notebook --run RUN``): a copy next to the run, its
first cell pointing at the run and at one of its rankings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..config import setting
from ..core.storage import check_writable
from ..errors import InfluenceError
from ..selection.outputs import load_rankings, ranking_belongs
from ..train.run import Run

NOTEBOOK = "explore_rankings.ipynb"


@dataclass(kw_only=True)
class NotebookSettings:
    """Which ranking the notebook opens, and where it is written."""

    ranking: str | None = setting(None, "The ranking folder to explore [default: the run's first rank-* folder].",
                                  path={"file_okay": False, "exists": True})
    out: str | None = setting(None, "Where to write it [default: RUN/explore_rankings.ipynb].", path={"dir_okay": False})


def copy_notebook(run_dir: str | Path, ranking: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Write the notebook to ``out`` (default ``RUN/explore_rankings.ipynb``) with its defaults set to
    the run and ``ranking`` (default: the run's first ``rank-*`` folder)."""
    run = Run(run_dir)
    if ranking is None:
        rankings = sorted(p for p in run.path.glob("rank-*") if (p / "summary.json").is_file())
        ranking = rankings[0] if rankings else run.path / "rank-less-mmlu_val"
    elif not (Path(ranking) / "summary.json").is_file():
        raise InfluenceError(f"--ranking {ranking}: not a folder written by `influence rank` (no summary.json)")
    else:
        summary = json.loads((Path(ranking) / "summary.json").read_text(encoding="utf-8"))
        if not ranking_belongs(run, summary, load_rankings(ranking)):
            raise InfluenceError(f"--ranking {ranking}: a ranking of another run or pool (run id "
                                 f"{summary.get('run_id')}), not of {run.path} (id {run.run_id}): its scores would sit "
                                 "beside other examples' texts")
    target = Path(out) if out is not None else run.path / NOTEBOOK
    check_writable(target)
    if target.exists():
        raise InfluenceError(f"{target} exists; give another --out (your edits to it are kept)")
    source = resources.files("influence.resources").joinpath("notebooks", NOTEBOOK).read_text(encoding="utf-8")
    notebook = json.loads(source)
    settings = next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")
    text = "".join(settings["source"])
    text = text.replace("'../runs/demo'", repr(str(run.path.resolve())))
    text = text.replace("RUN / 'rank-less-mmlu_val'", repr(str(Path(ranking).resolve())))
    settings["source"] = text
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(notebook, indent=1, ensure_ascii=False), encoding="utf-8")
    return target
