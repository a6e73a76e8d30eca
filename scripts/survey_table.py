"""The data-assessment survey's comparison (its Tables 2-4) with our numbers: every quality, diversity and importance
method that runs on the LESS-vs-random example selects 5% of the pool, and each selection is retrained and evaluated
as `evaluate select` does, against a random 5% (issue #24, part 8).

The run is ``select_less_vs_random.py``'s (SmolLM2-135M, the 194-example demo pool, target mmlu_val's 4 subjects,
held-out MMLU test questions, answer-letter NLL), with plain and TRAK gradients added. A local model stands in for
GPT as the rater (``--rater``, default the same SmolLM2-135M: a base model this small rarely writes a usable rating,
which the table shows as unscorable rather than hides). Each method selects by its own convention (``METHODS``:
perplexity keeps the middle, redundancy scores keep the least redundant...). The grid is ``--grid-*`` (default one
setting, lr 5e-4 x 3 epochs x batch 8 x linear, where the example's differences are largest) with ``--seeds`` seeds.

Prints the table (method, family, selected, held-out NLL mean +- sd over seeds and settings, win/tie/loss against
random over the settings) and each stage's wall time; writes ``--doc`` (markdown). Resumable: rerun after a stop.

    python scripts/survey_table.py --out runs/less-vs-random --doc docs/survey_table.md
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _bench import add_grid_arguments, grid_from  # noqa: E402
from select_less_vs_random import SUBJECTS, example_run  # noqa: E402 - the same run

from influence.errors import InfluenceError  # noqa: E402
from influence.evaluate.select import evaluate_select  # noqa: E402
from influence.selection.rank import rank  # noqa: E402

# name -> (family as the survey groups it, rank settings beyond --method and --fraction)
METHODS: dict[str, tuple[str, dict]] = {
    "ifd": ("quality", {}),
    "ppl": ("quality", {"mode": "middle"}),
    "nll": ("quality", {}),
    "alpagasus": ("quality", {"rater": None}),
    "autods": ("quality", {"rater": None}),
    "mem": ("quality", {"mode": "bottom"}),
    "dropout_ppl": ("quality", {"mode": "middle"}),
    "readability": ("quality", {}),
    "knn_distance": ("diversity", {}),
    "semdedup": ("diversity", {"mode": "bottom"}),
    "near_dup": ("diversity", {"mode": "bottom"}),
    "craig": ("diversity", {"budget": None}),
    "dq": ("diversity", {"method": "random", "diversify": "dq"}),
    "clusterclip": ("diversity", {"method": "random", "diversify": "clusterclip"}),
    "qdit": ("diversity", {"method": "nll", "diversify": "fl"}),
    "el2n": ("importance", {}),
    "grand": ("importance", {}),
    "forgetting": ("importance", {}),
    "prompt_uncertainty": ("importance", {"max_new_tokens": 64, "perturbations": 5}),
    "less": ("importance", {"target": True}),
    "tracin": ("importance", {"target": True}),
    "trak": ("importance", {"target": True}),
    "gradmatch": ("importance", {"budget": None, "target": True}),
}


def select_all(run: Path, folder: Path, fraction: float, rater: str, say) -> tuple[dict[str, Path], dict[str, str]]:
    """Each method's selection copied to ``folder/<name>.jsonl`` (done ones kept), and why the others have none."""
    folder.mkdir(parents=True, exist_ok=True)
    files, failed = {}, {}
    for name, (_, extra) in METHODS.items():
        file = folder / f"{name}.jsonl"
        if not file.is_file():
            settings = {k: v for k, v in extra.items() if k not in ("target", "rater", "budget")}
            method = settings.pop("method", name)
            options = {**({"rater": rater} if "rater" in extra else {}),
                       **({"budget": fraction} if "budget" in extra else {})}
            if settings.get("mode") == "middle":  # the middle band of the score's quantiles, of the same size
                settings["band"] = (0.5 - fraction / 2, 0.5 + fraction / 2)
            started = time.time()
            try:
                rank(run, "mmlu_val" if extra.get("target") else None, method=method,
                     fraction=None if "band" in settings else fraction,
                     target_tasks=SUBJECTS if extra.get("target") else None, out=str(folder / f"rank-{name}"),
                     overwrite=True, **settings, **options)
            except InfluenceError as err:
                failed[name] = str(err).splitlines()[0][:160]
                say(f"   {name}: no selection ({failed[name]})")
                continue
            selected = folder / f"rank-{name}" / "selected.jsonl"
            if not selected.read_text().strip():
                failed[name] = "empty selection (nothing scorable)"
                say(f"   {name}: empty selection")
                continue
            shutil.copy(selected, file)
            say(f"   {name}: selected in {time.time() - started:.0f} s")
        files[name] = file
    return files, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/less-vs-random")
    parser.add_argument("--doc", default=None)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--rater", default="smollm2-135m")
    add_grid_arguments(parser)
    parser.set_defaults(grid_lr="5e-4", grid_epochs="3", grid_scheduler="linear")
    args = parser.parse_args()
    timings, started = {}, time.time()
    run = example_run(args.out, train_gradients=("adam", "sgd", "margin"))
    timings["run and gradients"] = time.time() - started
    folder = Path(args.out) / "survey"
    files, failed = select_all(run, folder / "selections", args.fraction, args.rater, print)
    timings["selections"] = time.time() - started - sum(timings.values())
    grid = grid_from(args)
    report = evaluate_select([str(f) for f in files.values()] + ["random"], run_dir=run, target="mmlu_val",
                             target_tasks=SUBJECTS, fraction=args.fraction, grid=grid, baselines=["random"],
                             out=str(folder / "select"), say=print)
    timings["retraining"] = time.time() - started - sum(timings.values())
    results = report.results[report.results["eval"].str.contains("heldout")]
    rows = []
    for name, (family, _) in METHODS.items():
        if name not in files:
            rows.append({"method": name, "family": family, "selected": "-", "nll": f"none: {failed.get(name, '')}",
                         "vs random (w/t/l)": "-"})
            continue
        here = results[results["subset"] == name]["nll"]
        wins = report.wins[(report.wins["subset"] == name) & (report.wins["baseline"] == "random")].iloc[0]
        selected = sum(1 for line in files[name].read_text().splitlines() if line.strip())
        rows.append({"method": name, "family": family, "selected": selected,
                     "nll": f"{here.mean():.4f} +- {here.std():.4f}",
                     "vs random (w/t/l)": f"{wins['wins']}/{wins['ties']}/{wins['losses']}"})
    randoms = results[results["subset"] == "random"]["nll"]
    rows.append({"method": "random", "family": "baseline", "selected": max(1, int(args.fraction * 194)),
                 "nll": f"{randoms.mean():.4f} +- {randoms.std():.4f}", "vs random (w/t/l)": "-"})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    wall = {k: f"{v / 60:.1f} min" for k, v in timings.items()}
    print(f"\nwall time: {wall}; grid {grid}")
    if args.doc:
        lines = ["# The survey's table on the LESS-vs-random example", "", __doc__.split("\n\n")[1], "",
                 "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
        lines += ["", f"Grid: {grid}. Wall time per stage: {wall}. NLL: the held-out MMLU test questions' "
                  "answer-letter NLL (lower is better), mean +- sd over seeds and settings; w/t/l against random over "
                  "the settings (a tie: the difference within the larger sd over seeds)."]
        Path(args.doc).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
