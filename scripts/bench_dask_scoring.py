"""LESS scoring on Dask (`rank --dask`) vs the one-process stream, on the same fp16 store.

The stream runs in one process with torch's default threads; Dask runs a LocalCluster of ``--workers``
single-threaded worker processes (start-up included in its time). Both compute the (rows, subtasks)
breakdown block by block with the same function; prints seconds, the ratio, peak memory (the parent's,
and each Dask worker's) and whether the results are identical.

    python scripts/bench_dask_scoring.py --rows 1000000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import numpy as np
import torch
from _bench import measure, report, run_child
from bench_scoring import build_store, targets

CONTENDERS = ("stream", "dask")


def inputs_for(store, dim: int, tasks: int, per_task: int):
    from influence.kernels.scoring import subtask_means
    from influence.scoring.less.core import LessInputs

    target, task_index = targets(dim, tasks, per_task)
    means = subtask_means(target, task_index, tasks)[None]
    return LessInputs([store], np.array([1.0]), means, [], dim, torch.device("cpu"), "torch")


def stream(inputs) -> np.ndarray:
    from influence.scoring.less.stream import per_task_stream

    return per_task_stream(inputs)


def on_dask(inputs, workers: int, worker_peaks: list) -> np.ndarray:
    from influence.scoring.dask import dask_client
    from influence.scoring.less.dask import per_task_array

    with dask_client("local", workers) as client:
        result = client.compute(per_task_array(inputs)).result()
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        worker_peaks.extend(peaks.values())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--tasks", type=int, default=57)
    parser.add_argument("--per-task", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", default="/tmp/influence-bench")
    parser.add_argument("--only", choices=CONTENDERS)
    args = parser.parse_args()
    path = Path(args.folder) / f"full-{args.rows}-{args.dim}.zarr"
    if args.only:
        from influence.gradients.store import GradientStore

        inputs = inputs_for(GradientStore.open(path, "train/c"), args.dim, args.tasks, args.per_task)
        worker_peaks: list = []
        computed: list = []
        if args.only == "stream":
            result = measure(lambda: computed.append(stream(inputs)))
        else:
            result = measure(lambda: computed.append(on_dask(inputs, args.workers, worker_peaks)))
            result["worker_peak_rss_mb"] = [round(p) for p in worker_peaks]
        np.save(Path(args.folder) / f"per_task-{args.only}.npy", computed[0])
        print(json.dumps(result))
        return
    build_store(path, args.rows, args.dim)
    common = [f"--rows={args.rows}", f"--dim={args.dim}", f"--tasks={args.tasks}", f"--per-task={args.per_task}",
              f"--workers={args.workers}", f"--folder={args.folder}"]
    results = {name: run_child(__file__, name, common) for name in CONTENDERS}
    report(f"LESS scoring, {args.rows} x {args.dim} fp16 from Zarr, {args.tasks} subtasks: one process vs Dask "
           f"LocalCluster of {args.workers} one-thread workers", results, "stream")
    if "worker_peak_rss_mb" in results.get("dask", {}):
        print(f"Dask workers' peak RSS (MB): {results['dask']['worker_peak_rss_mb']}")
    a, b = (np.load(Path(args.folder) / f"per_task-{name}.npy") for name in CONTENDERS)
    print(f"identical results: {np.array_equal(a, b, equal_nan=True)} (max abs difference "
          f"{float(np.nanmax(np.abs(a - b))):.2e})")


if __name__ == "__main__":
    main()
