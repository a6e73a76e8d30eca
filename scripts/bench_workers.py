"""project-grads on several processes: one process with all the threads vs ``--workers N`` (one thread each)
vs one process with one thread, on the same warmed-up run (SmolLM2-135M by default). Each contender
writes a fresh copy of the stores; prints seconds, the ratio and whether the stores are the same.

    python scripts/bench_workers.py --model smollm2-135m --examples 48 --workers 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from _bench import demo_pool_head


def warm(folder: Path, model: str, examples: int, max_length: int) -> Path:
    """A warmed-up run on the first ``examples`` of the demo pool (made once, reused)."""
    from influence.models.loading import LoraSettings
    from influence.train.warmup import WarmupConfig, warmup

    run = folder / "run"
    if (run / "manifest.json").is_file():
        return run
    pool = demo_pool_head(folder, examples)
    warmup(WarmupConfig(model=model, train_files=[str(pool)], out=str(run), fraction=0.25, epochs=1,
                        learning_rate=1e-4, batch_size=4, grad_accum=1, max_length=max_length,
                        lora=LoraSettings(8, 16, 0.0, ["q_proj", "v_proj"])), progress=False)
    return run


def contender(run: Path, copy: Path, threads: int, workers: int) -> float:
    from influence.gradients.collect import project_grads

    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("grads.zarr"))
    torch.set_num_threads(threads)
    started = time.perf_counter()
    project_grads(copy, None, proj_dim=2048, batch_size=4, chunk_size=4, include_train=True, workers=workers,
                  progress=False)
    return time.perf_counter() - started


def grads(run: Path) -> np.ndarray:
    root = zarr.open_group(str(run / "grads.zarr"), mode="r")
    return np.concatenate([member[:].ravel() for name, member in sorted(root.members(max_depth=None))
                           if isinstance(member, zarr.Array) and name.endswith("/grads")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", default="/tmp/influence-bench-workers")
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    run = warm(folder, args.model, args.examples, args.max_length)
    cores = torch.get_num_threads()
    plan = {f"1 process, {cores} threads": (cores, 1), f"{args.workers} worker processes, "
            f"{max(1, cores // args.workers)} thread(s) each": (cores, args.workers), "1 process, 1 thread": (1, 1)}
    seconds, stores = {}, {}
    for i, (name, (threads, workers)) in enumerate(plan.items()):
        copy = folder / f"copy-{i}"
        seconds[name] = contender(run, copy, threads, workers)
        stores[name] = grads(copy)
    base = next(iter(seconds.values()))
    print(f"\nproject-grads, {args.model}, {args.examples} examples (max {args.max_length} tokens), 2048 dims:")
    for name, value in seconds.items():
        print(f"  {name:<40} {value:8.1f} s   {value / base:5.2f}x the first")
    first = next(iter(stores.values()))
    for name, values in stores.items():
        difference = float(np.max(np.abs(values.astype(np.float32) - first.astype(np.float32))))
        print(f"  {name:<40} max |difference| from the first: {difference:.2e}")
    print(json.dumps({k: round(v, 2) for k, v in seconds.items()}))


if __name__ == "__main__":
    main()
