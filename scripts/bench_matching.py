"""Gradient matching at pool scale: ``gradmatch``'s OMP and ``craig``'s facility location against the reference
formulations on the same synthetic gradients (``--n`` x ``--dim`` float16, as the store holds them: 40 directions plus
noise), each contender in its own process.

* OMP: ours (float16 rows read in blocks, a Cholesky factor grown one row per pick) against cords' V1 as written
  (the rows in float32, a fresh least-squares solve of the k x k normal equations at every pick).
* CRAIG: ours (lazy greedy, the gains streamed against ``--clients`` sampled rows) against cords' CRAIG as written
  (the dense n x n similarity ``max distance - distance``, then greedy), at ``--dense-n`` rows: the dense matrix
  does not fit at pool scale (100k rows: 40 GB in float32).

Prints seconds, peak memory and the ratio to ours, and the picks both agree on.

    python scripts/bench_matching.py --n 100000 --dim 2048 --budget 500
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _bench import measure, report, run_child  # noqa: E402


def gradients(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(40, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float16)
    for start in range(0, n, 8192):
        rows = min(8192, n - start)
        out[start : start + rows] = (rng.normal(size=(rows, 40)).astype(np.float32) @ basis
                                     + rng.normal(size=(rows, dim)).astype(np.float32))
    return out


def reference_omp(a: np.ndarray, b: np.ndarray, budget: int, lam: float) -> list[int]:
    """cords' OrthogonalMP_REG_Parallel_V1 (positive) as written: float32 rows, a fresh solve per pick."""
    import torch

    rows_t = torch.from_numpy(a.astype(np.float32))
    target = torch.from_numpy(b.astype(np.float32))
    residual, indices = target.clone(), []
    for _ in range(budget):
        if float(residual.norm()) / float(target.norm()) < 1e-4:
            break
        index = int(torch.argmax(rows_t @ residual))
        if index in indices:
            break
        indices.append(index)
        chosen = rows_t[indices]
        x = torch.linalg.lstsq(chosen @ chosen.T + lam * torch.eye(len(indices)), (chosen @ target)[:, None]).solution
        while len(indices) and float(x.min()) < 0:
            del indices[int(torch.argmin(x))]
            chosen = rows_t[indices]
            x = torch.linalg.lstsq(chosen @ chosen.T + lam * torch.eye(len(indices)), (chosen @ target)[:, None]).solution
        residual = target - (chosen.T @ x)[:, 0]
    return indices


def reference_craig(a: np.ndarray, budget: int) -> list[int]:
    """cords' CRAIG as written: the dense similarity (max distance - distance), then greedy facility location."""
    import torch

    x = torch.from_numpy(a.astype(np.float32))
    distance = torch.cdist(x, x)
    similarity = distance.max() - distance
    del distance
    current, picks = torch.zeros(len(x)), []
    for _ in range(budget):
        gains = (similarity - current[None, :]).clamp(min=0).sum(dim=1)
        gains[picks] = -1
        picks.append(int(torch.argmax(gains)))
        current = torch.maximum(current, similarity[picks[-1]])
    return picks


def child(name: str, args) -> None:
    from influence.scoring.matching import craig, omp_nonnegative

    a = gradients(args.dense_n if "dense-n" in name else args.n, args.dim)
    b = a.sum(axis=0, dtype=np.float64)
    found: list = []

    def work():
        if name == "omp ours":
            found[:] = omp_nonnegative(a, b, args.budget, 0.5)[0]
        elif name == "omp cords V1":
            found[:] = reference_omp(a, b, args.budget, 0.5)
        elif name == "craig ours (dense-n rows)":
            found[:] = craig(a, args.craig_budget, len(a), 0)[0]
        elif name == "craig cords dense (dense-n rows)":
            found[:] = reference_craig(a, args.craig_budget)
        else:  # ours at pool scale
            found[:] = craig(a, args.craig_budget, args.clients, 0)[0]

    result = measure(work)
    result["picks"] = [int(i) for i in found]
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=500, help="OMP picks")
    parser.add_argument("--craig-budget", type=int, default=200)
    parser.add_argument("--dense-n", type=int, default=8000)
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    if args.only:
        child(args.only, args)
        return
    forward = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "only"]
    omp = {name: run_child(__file__, name, forward) for name in ("omp ours", "omp cords V1")}
    report(f"OMP (gradmatch): {args.n} x {args.dim} float16 gradients, {args.budget} picks, lambda 0.5", omp, "omp ours")
    if "error" not in omp["omp ours"] and "error" not in omp["omp cords V1"]:
        same = len(set(omp["omp ours"]["picks"]) & set(omp["omp cords V1"]["picks"]))
        print(f"picks in common: {same} of {len(omp['omp ours']['picks'])} / {len(omp['omp cords V1']['picks'])}")
    names = ("craig ours (dense-n rows)", "craig cords dense (dense-n rows)")
    dense = {name: run_child(__file__, name, forward) for name in names}
    report(f"CRAIG at {args.dense_n} x {args.dim}, {args.craig_budget} picks, every row a client", dense, names[0])
    if all("error" not in r for r in dense.values()):
        print(f"picks in common: {len(set(dense[names[0]]['picks']) & set(dense[names[1]]['picks']))} of "
              f"{args.craig_budget}")
    scale = {"craig ours at n": run_child(__file__, "craig ours at n", forward)}
    report(f"CRAIG at {args.n} x {args.dim}, {args.craig_budget} picks, {args.clients} sampled clients", scale,
           "craig ours at n")


if __name__ == "__main__":
    main()
