"""Shared benchmark plumbing: run each contender in its own process so peak memory is its own."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import psutil


def measure(fn, *args, repeat: int = 1, **kwargs) -> dict:
    """Run ``fn`` (after a warm-up call when repeat > 1) and report seconds per call and memory."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = psutil.Process().memory_info().rss
    if repeat > 1:
        fn(*args, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(max(1, repeat - 1) if repeat > 1 else 1):
        fn(*args, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / (max(1, repeat - 1) if repeat > 1 else 1)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": seconds,
        "peak_rss_mb": peak_rss / 2**20,
        "peak_rss_over_setup_mb": max(0, peak_rss - base_rss) / 2**20,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def demo_pool_head(folder, examples: int):
    """``folder/pool.jsonl``: the first ``examples`` records of the embedded demo pool (FLAN-CoT + P3)."""
    from pathlib import Path

    from influence.data.formats import demo_pool_files

    pool = Path(folder) / "pool.jsonl"
    records = [line for line in Path(demo_pool_files()[1]).read_text(encoding="utf-8").splitlines() if line.strip()]
    pool.write_text("\n".join(records[:examples]) + "\n", encoding="utf-8")
    return pool


def run_child(script: str, contender: str, args: list[str]) -> dict:
    """Run ``script --only contender`` and parse the JSON line it prints last."""
    out = subprocess.run([sys.executable, script, "--only", contender, *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(title: str, results: dict[str, dict], ours: str) -> None:
    print(f"\n{title}")
    print(f"{'contender':<28}{'seconds':>12}{'ratio to ' + ours:>26}{'peak RSS MB':>14}{'over setup MB':>15}{'peak GPU MB':>13}")
    base = results[ours].get("seconds")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<28}  failed: {r['error']}")
            continue
        ratio = r["seconds"] / base if base else float("nan")
        gpu = f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") is not None else "-"
        print(f"{name:<28}{r['seconds']:>12.4f}{ratio:>25.2f}x{r['peak_rss_mb']:>14.0f}{r['peak_rss_over_setup_mb']:>15.0f}{gpu:>13}")


def add_grid_arguments(parser) -> None:
    """The hyperparameter-grid options of the evaluate-select examples (batch 8 only: CPU-sized)."""
    parser.add_argument("--grid-lr", default="1e-4,5e-4")
    parser.add_argument("--grid-epochs", default="1,3")
    parser.add_argument("--grid-batch", default="8")
    parser.add_argument("--grid-scheduler", default="linear,cosine")
    parser.add_argument("--seeds", type=int, default=2)


def grid_from(args):
    """The :class:`~influence.evaluate.select.Grid` of :func:`add_grid_arguments`' options."""
    from influence.config import check
    from influence.evaluate.select import Grid

    def numbers(text: str, kind: type) -> list:
        return [kind(part) for part in text.split(",") if part.strip()]

    return check(Grid(numbers(args.grid_lr, float), numbers(args.grid_epochs, int), numbers(args.grid_batch, int),
                      args.grid_scheduler.split(","), args.seeds))
