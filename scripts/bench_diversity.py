"""Diversity-aware selection at scale: k-center greedy and facility location (QDIT) on clustered unit vectors.

Ours (blocked against the pool, lazy greedy for facility location over a sample of clients) against a
naive dense implementation that forms the whole N x N similarity matrix, at a size where that fits,
then ours alone at the large size. Each contender runs in its own process, so peak memory is its own;
prints seconds, peak RSS and the ratio.

    python scripts/bench_diversity.py --small 20000 --large 100000 --dim 2048 --budget 1000 --small-budget 200
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _bench import measure, report, run_child  # noqa: E402


def vectors(n: int, dim: int, clusters: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def naive_k_center(x: np.ndarray, budget: int) -> list[int]:
    distance = 1 - x @ x.T  # the whole N x N matrix
    picks = [0]
    nearest = distance[0].copy()
    while len(picks) < budget:
        picks.append(int(np.argmax(nearest)))
        np.minimum(nearest, distance[picks[-1]], out=nearest)
    return picks


def naive_facility_location(x: np.ndarray, quality: np.ndarray, budget: int, weight: float) -> list[int]:
    sim = np.clip(x @ x.T, 0, None)  # the whole N x N matrix
    q = (quality - quality.min()) / (quality.max() - quality.min())
    current = np.zeros(len(x), dtype=np.float32)
    picks: list[int] = []
    for _ in range(budget):
        gains = (1 - weight) * q / budget + weight * np.maximum(sim - current[:, None], 0).mean(axis=0)
        gains[picks] = -np.inf
        picks.append(int(np.argmax(gains)))
        np.maximum(current, sim[:, picks[-1]], out=current)
    return picks


def run(contender: str, n: int, dim: int, budget: int) -> dict:
    from influence.selection.diversify import facility_location, k_center_greedy

    x = vectors(n, dim)
    quality = np.random.default_rng(1).random(n)
    functions = {
        "ours-kcenter": lambda: k_center_greedy(x, budget, first=0)[0],
        "naive-kcenter": lambda: naive_k_center(x, budget),
        "ours-fl": lambda: facility_location(x, quality, budget, 0.5, sample=n)[0],
        "ours-fl-sampled": lambda: facility_location(x, quality, budget, 0.5, sample=10000)[0],
        "naive-fl": lambda: naive_facility_location(x, quality, budget, 0.5),
    }
    return measure(functions[contender])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=20000)
    parser.add_argument("--large", type=int, default=100000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=1000, help="picks at the large size")
    parser.add_argument("--small-budget", type=int, default=200, help="picks at the small size (the naive loops are slow)")
    parser.add_argument("--only", default=None)
    parser.add_argument("--n", type=int, default=None)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run(args.only, args.n, args.dim, args.budget)))
        return
    small = ["--dim", str(args.dim), "--budget", str(args.small_budget), "--n", str(args.small)]
    for algorithm, contenders in (("kcenter", ("ours-kcenter", "naive-kcenter")), ("fl", ("ours-fl", "naive-fl"))):
        results = {name: run_child(__file__, name, small) for name in contenders}
        report(f"{algorithm}: {args.small} x {args.dim}, budget {args.small_budget} (naive forms the N x N matrix)",
               results, contenders[0])
    large = ["--dim", str(args.dim), "--budget", str(args.budget), "--n", str(args.large)]
    results = {name: run_child(__file__, name, large) for name in ("ours-kcenter", "ours-fl-sampled")}
    report(f"ours at {args.large} x {args.dim}, budget {args.budget} (naive would need "
           f"{args.large ** 2 * 4 / 2**30:.0f} GiB for the matrix)", results, "ours-kcenter")


if __name__ == "__main__":
    main()
