"""EK-FAC influence from the store against the exact path, on a run (the demo's by default): Spearman per target
example between ``rank --method ekfac`` with the pool's exact gradients and with its whitened projected gradients
(``project-grads --train-gradient ekfac``) at each ``--proj-dim``, and the wall time of each, in one run.

    python scripts/bench_curvature_store.py --run runs/demo --target mmlu_val --target-tasks elementary_mathematics,... \\
        --proj-dim 2048,8192
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import spearmanr

from influence.gradients.collect import project_grads
from influence.gradients.curvature import fit_curvature
from influence.scoring.base import Target, get_method
from influence.train.run import Run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--target", default="mmlu_val")
    parser.add_argument("--target-tasks", default="elementary_mathematics,high_school_biology,world_religions,marketing")
    parser.add_argument("--proj-dim", default="2048,8192")
    args = parser.parse_args()
    dims = [int(d) for d in args.proj_dim.split(",")]
    tasks = [t for t in args.target_tasks.split(",") if t] or None
    started = time.time()
    fit_curvature(args.run, checkpoints="all")
    print(f"curvature at every checkpoint: {time.time() - started:.0f} s")
    started = time.time()
    project_grads(args.run, None, proj_dim=dims, train_gradients=["ekfac"], batch_size=8)
    print(f"whitened pool gradients at {dims}: {time.time() - started:.0f} s")
    run, target, method = Run(args.run), Target(args.target, tuple(tasks) if tasks else None), get_method("ekfac")
    started = time.time()
    exact = method.attribution(run, target, method.options()).matrix
    print(f"exact (pool gradients recomputed): {time.time() - started:.1f} s, {exact.shape[0]} x {exact.shape[1]}")
    for dim in dims:
        started = time.time()
        stored = method.attribution(run, target, method.options({"pool_gradients": "store", "proj_dim": dim})).matrix
        seconds = time.time() - started
        rho = np.array([spearmanr(exact[:, j], stored[:, j])[0] for j in range(exact.shape[1])])
        top = np.mean([len(set(np.argsort(-exact[:, j])[:10]) & set(np.argsort(-stored[:, j])[:10])) / 10
                       for j in range(exact.shape[1])])
        print(f"store at {dim}: {seconds:.1f} s; Spearman per target example: mean {rho.mean():.3f}, min {rho.min():.3f}, "
              f"median {np.median(rho):.3f}; top-10 overlap {top:.2f}; mean over targets Spearman "
              f"{spearmanr(exact.mean(1), stored.mean(1))[0]:.3f}")


if __name__ == "__main__":
    main()
