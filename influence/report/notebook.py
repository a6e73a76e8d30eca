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
from ..selection.outputs import open_ranking
from ..train.run import Run

NOTEBOOK = "explore_rankings.ipynb"


@dataclass(kw_only=True)
class NotebookSettings:
    """Which ranking the notebook opens, and where it is written."""

    ranking: str | None = setting(None, "The ranking folder to explore [default: the run's main ranking: its only "
                                        "one, else its latest LESS ranking, else its latest].",
                                  path={"file_okay": False, "exists": True})
    out: str | None = setting(None, "Where to write it [default: RUN/explore_rankings.ipynb].", path={"dir_okay": False})


def copy_notebook(run_dir: str | Path, ranking: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Write the notebook to ``out`` (default ``RUN/explore_rankings.ipynb``) with its defaults set to the run and
    ``ranking`` (default: the run's main ranking, :func:`~influence.selection.outputs.main_ranking`); a run without a
    ranking, or a ranking of another pool, is refused with what to do."""
    run = Run(run_dir)
    ranking, _, _ = open_ranking(run.path, ranking)
    target = Path(out) if out is not None else run.path / NOTEBOOK
    check_writable(target)
    if target.exists():
        raise InfluenceError(f"{target} exists; give another --out (your edits to it are kept)")
    source = resources.files("influence.resources").joinpath("notebooks", NOTEBOOK).read_text(encoding="utf-8")
    notebook = json.loads(source)
    settings = next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")
    text = "".join(settings["source"])
    text = text.replace("'../runs/demo'", repr(str(run.path.resolve())))
    text = text.replace("os.environ.get('INFLUENCE_RANKING')", f"os.environ.get('INFLUENCE_RANKING', "
                                                               f"{str(ranking.resolve())!r})")
    settings["source"] = text
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(notebook, indent=1, ensure_ascii=False), encoding="utf-8")
    return target
