"""The warm-up on several processes: one process with all the threads vs ``torchrun --nproc-per-node N``
(DDP through accelerate, one thread each) vs one process with one thread, on the same pool and settings
(SmolLM2-135M by default). Prints seconds, the ratios and how far the adapters differ.

    python scripts/bench_warmup_processes.py --model smollm2-135m --examples 64 --processes 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from _bench import demo_pool_head
from safetensors.torch import load_file

PACKAGE = Path(__file__).resolve().parents[1]


def arguments(args, pool: Path, out: Path) -> list[str]:
    return ["-m", "influence", "--quiet", "warmup", "--model", args.model, "--train", str(pool), "--out", str(out),
            "--fraction", "1", "--epochs", "1", "--lr", "1e-4", "--batch-size", "4", "--grad-accum", "4",
            "--max-length", str(args.max_length), "--lora-r", "8", "--lora-alpha", "16",
            "--lora-modules", "q_proj,v_proj", "--dtype", "fp32"]


def contender(args, pool: Path, out: Path, threads: int, processes: int) -> float:
    if out.exists():
        shutil.rmtree(out)
    launcher = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(processes)] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    subprocess.run(launcher + arguments(args, pool, out), cwd=PACKAGE, env=env, check=True, capture_output=True)
    return time.perf_counter() - started  # model loading included, as a user sees it


def largest_difference(a: Path, b: Path) -> float:
    first, second = (load_file(str(run / "checkpoints" / "epoch-1" / "adapter_model.safetensors")) for run in (a, b))
    return max(float((first[k] - second[k]).abs().max()) for k in first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--folder", default="/tmp/influence-bench-warmup")
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    pool = demo_pool_head(folder, args.examples)
    cores = max(args.processes, torch.get_num_threads())
    one = contender(args, pool, folder / "one", cores, 1)
    many = contender(args, pool, folder / "many", max(1, cores // args.processes), args.processes)
    single = contender(args, pool, folder / "single", 1, 1)
    print(f"warm-up, {args.model}, {args.examples} examples x {args.max_length} tokens, 1 epoch (model loading included)")
    print(f"  1 process x {cores} threads:              {one:7.1f} s")
    print(f"  {args.processes} processes x {max(1, cores // args.processes)} thread(s) (torchrun, DDP): "
          f"{many:7.1f} s  ({many / one:.2f}x)")
    print(f"  1 process x 1 thread:               {single:7.1f} s  ({single / one:.2f}x)")
    print(f"  largest adapter difference, {args.processes} processes vs 1: "
          f"{largest_difference(folder / 'one', folder / 'many'):.2e}")


if __name__ == "__main__":
    main()
