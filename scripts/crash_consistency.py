"""Crash consistency: SIGKILL each long step at random moments, resume, compare with an uninterrupted run.

For each trial, every long step (``warmup``, ``project-grads`` with a target, ``forward-scores``, ``rank``,
``subsets train``) is
started as its own process on the tiny model, killed with SIGKILL after a random delay drawn from its
uninterrupted duration, then run again (``warmup --resume``; the others resume by themselves) until it
finishes. The finished run is compared with an uninterrupted one array by array: every adapter and
Adam tensor, the training dynamics, every array of every store in ``grads.zarr``, the ranking's columns and
every subset model's mask and outcomes.

    python scripts/crash_consistency.py --trials 5          # prints kills survived / tried, identical / not
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from safetensors.numpy import load_file

BIN = [sys.executable, "-m", "influence.cli"]


def make_data(folder: Path) -> tuple[Path, Path]:
    pool = folder / "pool.jsonl"
    pool.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Add {i} and {i % 9 + 1}."},
        {"role": "assistant", "content": f"The sum of {i} and {i % 9 + 1} is {i + i % 9 + 1}."}]}) + "\n"
        for i in range(160)))
    target = folder / "target.jsonl"
    target.write_text("".join(json.dumps({"prompt": f"What is {i} plus 3?", "completion": str(i + 3),
                                          "task": "ab"[i % 2]}) + "\n" for i in range(8)))
    return pool, target


def steps(run: Path, pool: Path, target: Path) -> list[tuple[str, list[str], list[str]]]:
    """(name, command, resume command) of every long step."""
    warm = [*BIN, "warmup", "--model", "tiny-llama", "--train", str(pool), "--out", str(run), "--fraction", "0.5",
            "--epochs", "3", "--batch-size", "2", "--grad-accum", "2", "--lr", "5e-3", "--lora-r", "4",
            "--lora-alpha", "16", "--lora-dropout", "0.1", "--max-length", "64", "--track-all"]
    grads = [*BIN, "project-grads", "--run", str(run), "--target", str(target), "--proj-dim", "32,64",
             "--batch-size", "4", "--chunk-size", "8"]
    forward = [*BIN, "forward-scores", "--run", str(run), "--batch-size", "4", "--chunk-size", "8"]
    ranking = [*BIN, "rank", "--run", str(run), "--target", str(target), "--method", "less", "--proj-dim", "32",
               "--fraction", "0.2", "--space", "none"]
    models = [*BIN, "subsets", "train", "--run", str(run), "--k", "3", "--target", str(target), "--epochs", "1"]
    return [("warmup", warm, [*warm, "--resume"]), ("project-grads", grads, grads), ("forward-scores", forward, forward),
            ("rank", ranking, ranking), ("subsets train", models, models)]


def run_step(command: list[str], kill_after: float | None = None) -> tuple[bool, float]:
    """Run a command; with ``kill_after``, SIGKILL its process group then. Returns (killed, seconds)."""
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True, time.time() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:4])} failed:\n{process.stderr.read()[-3000:]}")
    return False, time.time() - started


def arrays(run: Path) -> dict[str, np.ndarray]:
    """Every number a run's outputs hold, by name."""
    found: dict[str, np.ndarray] = {}
    for checkpoint in sorted((run / "checkpoints").iterdir()):
        for file in ("adapter_model.safetensors", "optimizer.safetensors"):
            for key, value in load_file(str(checkpoint / file)).items():
                found[f"{checkpoint.name}/{file}/{key}"] = value
    dynamics = pd.read_parquet(run / "dynamics.parquet")
    for column in dynamics.columns:
        found[f"dynamics/{column}"] = dynamics[column].to_numpy()
    root = run / "grads.zarr"
    for meta in sorted(root.rglob("zarr.json")):
        node = meta.parent
        if node == root:
            continue
        item = zarr.open(store=str(root), path=str(node.relative_to(root)), mode="r")
        if isinstance(item, zarr.Array):
            found[f"grads.zarr/{node.relative_to(root)}"] = item[:]
    for ranking in sorted(run.glob("rank-*")):
        table = pd.read_parquet(ranking / "scores.parquet")
        for column in table.columns:
            found[f"{ranking.name}/{column}"] = table[column].to_numpy()
        found[f"{ranking.name}/selected"] = np.array(json.loads((ranking / "summary.json").read_text())["selected_ids"])
    models = run / "subsets.zarr"
    for meta in sorted(models.rglob("units/*/*/zarr.json")):
        node = meta.parent
        item = zarr.open(store=str(models), path=str(node.relative_to(models)), mode="r")
        if isinstance(item, zarr.Array):
            found[f"subsets.zarr/{node.relative_to(models)}"] = item[:]
    return found


def compare(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> list[str]:
    problems = sorted(set(reference) ^ set(other))
    for name in sorted(set(reference) & set(other)):
        a, b = reference[name], other[name]
        same_nan = a.dtype.kind == "f" and b.dtype.kind == "f"  # outcomes hold NaN where a measure does not apply
        if a.shape != b.shape or not np.array_equal(a, b, equal_nan=same_nan):
            problems.append(name)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="crash-"))
    pool, target = make_data(folder)

    reference_run = folder / "reference"
    durations = {}
    for name, command, _ in steps(reference_run, pool, target):
        durations[name] = run_step(command)[1]
    print("uninterrupted:", ", ".join(f"{k} {v:.1f} s" for k, v in durations.items()))
    reference = arrays(reference_run)

    tried = survived = identical = 0
    for trial in range(args.trials):
        run = folder / f"trial-{trial}"
        kills = []
        for name, command, resume in steps(run, pool, target):
            delay = rng.uniform(0.5, max(1.0, durations[name]))
            killed, _ = run_step(command, kill_after=delay)
            if killed:
                tried += 1
                kills.append(f"{name}@{delay:.1f}s")
                try:
                    run_step(resume)
                    survived += 1
                except RuntimeError as err:
                    print(f"trial {trial}: resume of {name} failed: {err}")
                    break
        else:
            problems = compare(reference, arrays(run))
            identical += not problems
            print(f"trial {trial}: killed {', '.join(kills) or 'nothing (finished first)'} -> "
                  + ("identical" if not problems else f"DIFFERENT in {len(problems)} arrays, e.g. {problems[:3]}"))
    print(f"kills survived: {survived}/{tried}; final outputs identical to the uninterrupted run: "
          f"{identical}/{args.trials} trials ({len(reference)} arrays compared each)")
    if not args.keep:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
