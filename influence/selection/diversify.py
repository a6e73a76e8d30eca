"""Diversity of a selection and diversity-aware selection, in a space of unit vectors (:mod:`influence.gradients.spaces`).

Similarity is the cosine ``x . y`` and distance the cosine distance ``1 - x . y``. Everything works on
blocks of rows (``block`` at a time against the whole set), so memory grows with the number of
examples times the dimension, never with its square. The greedy loops run on the GPU when there is one.

Subset-level diversity (reported for every selection): the **Vendi score** (Friedman & Dieng, 2023:
``exp`` of the entropy of the eigenvalues of ``K / n``, ``K`` the cosine kernel; from 1 = all alike to
n = all orthogonal), the **mean nearest-neighbour distance** inside the set, and the **cluster
coverage** (share of the pool's k-means clusters the set touches).

Selection algorithms, each usable with any score of ``rank``:

* ``kcenter``: k-center greedy (Sener & Savarese, 2018; Gonzalez's farthest-first traversal, a
  2-approximation of the minimax facility location), started from the best-scored example;
* ``fl``: facility location with a quality term, QDIT's objective (Bukharin et al., 2023), here
  ``f(S) = (1 - w) * mean_{s in S} q(s) + w * mean_{v} max(0, max_{s in S} sim(v, s))`` with ``q`` the
  score min-max scaled to [0, 1] and ``w`` the diversity weight (both terms in [0, 1]; for a fixed
  budget the first is modular and the second monotone submodular, so lazy greedy applies). The
  facility-location term is measured over a random sample of ``sample`` pool examples (exact when the
  pool is no larger);
* ``filter``: DEITA's representation filter (Liu et al., 2024): walk the ranking and keep an example
  only if its nearest already-kept example is farther than ``min_distance``;
* ``clusters``: k-means clusters, then the best of each cluster, in proportion to the cluster's size
  or equally;
* ``quota``: per-subtask quotas for targets with subtasks: the best of each subtask's column in turn
  (LESS's max over subtasks can starve a subtask);
* ``dq``: Dataset Quantization (Zhou et al., 2023): bins filled by GraphCut's submodular gain, then an equal random
  share of the budget from each bin (:func:`dataset_quantization`);
* ``clusterclip``: ClusterClip sampling (Shao et al., 2024): training slots drawn cluster-balanced with a cap
  ``clip`` on repeats; the repeats become the examples' weights (:func:`cluster_clip`).

Hand-written rather than ``apricot-select``: apricot builds the dense (or k-NN sparse) similarity
matrix of the whole pool and has no quality term; these stream blocks against the pool.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..errors import InfluenceError
from ..gradients.geometry import BLOCK, _tensor, default_clusters, device, kmeans, lazy_greedy, mean_nn_distance, vendi_score
from ..gradients.spaces import Space, load_space
from ..scoring import Scores
from ..train.run import Run
from .outputs import TASK_PREFIX
from .settings import Diversify


def subset_diversity(x: np.ndarray, selected: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Vendi score, mean nearest-neighbour distance and cluster coverage of the selection, of a
    random subset of the same size, and of the whole pool (rows of ``x``; ``labels`` the pool's
    k-means clusters)."""
    selected = np.asarray(selected, dtype=int)
    random = np.random.default_rng(seed).choice(len(x), size=len(selected), replace=False) if len(selected) else selected
    n_clusters = len(np.unique(labels))

    def describe(rows: np.ndarray) -> dict:
        return {"n": int(len(rows)), "vendi": vendi_score(x[rows]), "mean_nn_distance": mean_nn_distance(x[rows], seed=seed),
                "cluster_coverage": float(len(np.unique(labels[rows])) / n_clusters) if len(rows) else 0.0}

    return {"selection": describe(selected), "random": describe(random), "pool": describe(np.arange(len(x))),
            "clusters": n_clusters}


# -- selection --------------------------------------------------------------------------------------------------------
def k_center_greedy(x: np.ndarray, budget: int, first: int = 0, block: int = BLOCK) -> tuple[list[int], float]:
    """Farthest-first traversal from ``first``: (order of the picks, covering radius = the largest
    distance of any row to its nearest pick)."""
    budget = min(budget, len(x))
    on = device()
    vectors = _tensor(x, on)
    nearest = torch.full((len(x),), float("inf"), device=on)  # each row's distance to its nearest pick so far
    picks = [int(first)]
    while True:
        center = vectors[picks[-1]]
        for start in range(0, len(x), block):
            torch.minimum(nearest[start : start + block], 1 - vectors[start : start + block] @ center,
                          out=nearest[start : start + block])
        nearest[picks[-1]] = 0.0
        if len(picks) == budget:
            return picks, float(nearest.max())
        gaps = nearest.clone()
        gaps[picks] = -float("inf")  # duplicates of a pick are at distance 0 too: never pick a row twice
        picks.append(int(torch.argmax(gaps)))


def scaled_quality(score: np.ndarray) -> np.ndarray:
    """Scores min-max scaled to [0, 1] (constant scores -> 1)."""
    score = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=np.nanmin(score) if np.isfinite(score).any() else 0)
    low, high = score.min(), score.max()
    return np.ones_like(score) if high == low else (score - low) / (high - low)


def facility_location(x: np.ndarray, quality: np.ndarray, budget: int, weight: float, sample: int = 10000,
                      seed: int = 0, block: int = BLOCK, lazy_batch: int = 64) -> tuple[list[int], float]:
    """Lazy greedy on QDIT's objective (module docstring): (order of the picks, objective value)."""
    if not 0 <= weight <= 1:
        raise InfluenceError(f"--diversity-weight must be in [0, 1], got {weight}")
    n = len(x)
    budget = min(budget, n)
    clients = np.arange(n) if n <= sample else np.random.default_rng(seed).choice(n, sample, replace=False)
    on = device()
    client_vectors = _tensor(x[clients], on)
    current = torch.zeros(len(clients), device=on)  # each client's best similarity to the picks so far (>= 0)
    q = scaled_quality(quality)

    def gain(candidates: np.ndarray) -> np.ndarray:
        sim = (_tensor(x[candidates], on) @ client_vectors.T).clamp(min=0)
        coverage = (sim - current[None, :]).clamp(min=0).sum(dim=1) / len(clients)
        return (1 - weight) * q[candidates] / budget + weight * coverage.double().cpu().numpy()

    def commit(pick: int) -> None:
        torch.maximum(current, (client_vectors @ _tensor(x[pick], on)).clamp(min=0), out=current)

    return lazy_greedy(n, budget, gain, commit, block, lazy_batch)


def redundancy_filter(x: np.ndarray, order: np.ndarray, budget: int, min_distance: float) -> list[int]:
    """Walk ``order`` (the ranking) and keep a row only if its nearest kept row is farther than
    ``min_distance`` (cosine distance), until ``budget`` are kept."""
    if not 0 <= min_distance <= 2:
        raise InfluenceError(f"--min-distance must be a cosine distance in [0, 2], got {min_distance}")
    kept: list[int] = []
    kept_vectors = torch.empty((0, x.shape[1]))
    for row in order:
        if len(kept) == budget:
            break
        vector = _tensor(x[row])
        if len(kept) and float((1 - kept_vectors @ vector).min()) <= min_distance:
            continue
        kept.append(int(row))
        kept_vectors = torch.cat([kept_vectors, vector[None]])
    return kept


def quantization_bins(x: np.ndarray, bins: int) -> list[np.ndarray]:
    """Dataset Quantization's bins (Zhou et al., ICCV 2023; their ``alpaca_sample.py`` the reference): ``bins`` bins of
    ``n // bins`` rows, each filled greedily from the rows not yet binned by GraphCut's gain ``sum_{v in rest} sim(v,
    x) - 2 sum_{s in bin} sim(s, x)`` (representative of what is left, unlike what the bin holds; cosine similarity).
    Cost: one product of the rest with a row per binned row, ``n^2 d`` in all."""
    on = device()
    vectors = _tensor(x, on)
    remaining = np.arange(len(x))
    size = len(x) // bins
    binned: list[np.ndarray] = []
    for _ in range(bins):
        rest = vectors[torch.from_numpy(remaining).to(on)]
        column_sums = (rest @ rest.sum(dim=0)).double()
        penalty = torch.zeros(len(remaining), dtype=torch.float64, device=on)
        free = torch.ones(len(remaining), dtype=torch.bool, device=on)
        chosen = []
        for _ in range(min(size, len(remaining))):
            gain = torch.where(free, column_sums - 2 * penalty, torch.tensor(-torch.inf, dtype=torch.float64, device=on))
            j = int(torch.argmax(gain))
            chosen.append(j)
            free[j] = False
            penalty += (rest @ rest[j]).double()
        binned.append(remaining[chosen])
        remaining = np.delete(remaining, chosen)
    return binned


def dataset_quantization(x: np.ndarray, budget: int, bins: int, seed: int = 0) -> list[int]:
    """DQ's selection: :func:`quantization_bins`, then the budget drawn uniformly at random from the bins, an equal
    share each (the remainder to the first bins; the reference drops it)."""
    rng = np.random.default_rng(seed)
    share, extra = divmod(budget, bins)
    picks: list[int] = []
    for k, members in enumerate(quantization_bins(x, bins)):
        picks += rng.choice(members, min(share + (k < extra), len(members)), replace=False).tolist()
    return picks


def cluster_clip(labels: np.ndarray, budget: int, clip: int, seed: int = 0) -> tuple[list[int], np.ndarray]:
    """ClusterClip sampling (Shao et al., ACL Findings 2024) of ``budget`` training slots: each slot draws a cluster
    uniformly among those with rows left, then one of its rows uniformly; a row drawn ``clip`` times leaves (the
    repetition clip). (rows in the order first drawn, how many times each was drawn: its weight in training)."""
    rng = np.random.default_rng(seed)
    left = {int(c): list(np.flatnonzero(labels == c)) for c in np.unique(labels)}
    counts = np.zeros(len(labels), dtype=np.int64)
    order: list[int] = []
    for _ in range(budget):
        live = [c for c, rows in left.items() if rows]
        if not live:
            break
        rows = left[live[rng.integers(len(live))]]
        row = int(rows[rng.integers(len(rows))])
        if counts[row] == 0:
            order.append(row)
        counts[row] += 1
        if counts[row] >= clip:
            rows.remove(row)
    return order, counts[order].astype(np.float64)


def cluster_balanced(labels: np.ndarray, order: np.ndarray, budget: int, balance: str = "proportional") -> list[int]:
    """The best-ranked rows of every cluster (``order`` is the ranking): each cluster's share of the
    budget in proportion to its size (largest remainders), or equal; a cluster with fewer rows than
    its share gives the rest to the others."""
    if balance not in ("proportional", "equal"):
        raise InfluenceError(f"--balance must be proportional or equal, got {balance}")
    clusters, sizes = np.unique(labels[order], return_counts=True)
    wanted = sizes / sizes.sum() * budget if balance == "proportional" else np.full(len(clusters), budget / len(clusters))
    quota = np.floor(wanted).astype(int)
    for i in np.argsort(-(wanted - quota), kind="stable")[: budget - quota.sum()]:
        quota[i] += 1
    quota = np.minimum(quota, sizes)
    while quota.sum() < min(budget, sizes.sum()):  # hand unused shares to clusters with rows left
        room = np.flatnonzero(quota < sizes)
        quota[room[np.argmax(sizes[room] - quota[room])]] += 1
    taken = dict.fromkeys(clusters.tolist(), 0)
    limit = dict(zip(clusters.tolist(), quota.tolist()))
    picks = []
    for row in order:
        cluster = labels[row]
        if taken[cluster] < limit[cluster]:
            taken[cluster] += 1
            picks.append(int(row))
    return picks


def subtask_quota(per_task: np.ndarray, budget: int, finite: np.ndarray | None = None) -> list[int]:
    """Round robin over subtasks: each in turn adds its best-scored example not yet picked."""
    n, tasks = per_task.shape
    finite = np.ones(n, dtype=bool) if finite is None else finite
    orders = [np.argsort(-np.nan_to_num(per_task[:, t], nan=-np.inf), kind="stable") for t in range(tasks)]
    positions = [0] * tasks
    picked: list[int] = []
    chosen = np.zeros(n, dtype=bool)
    while len(picked) < min(budget, int(finite.sum())):
        for t in range(tasks):
            order = orders[t]
            while positions[t] < n and (chosen[order[positions[t]]] or not finite[order[positions[t]]]):
                positions[t] += 1
            if positions[t] < n and len(picked) < budget:
                chosen[order[positions[t]]] = True
                picked.append(int(order[positions[t]]))
    return picked


def selection_space(run: Run, space: str | None, proj_dim: int | None) -> Space | None:
    """The space diversity is measured in: ``space``, or by default the run's gradient features when
    it has some (None when there is nothing to measure in, or ``space = "none"``)."""
    if space == "none":
        return None
    if space is None:
        try:
            return load_space(run.path, "grads", proj_dim)
        except InfluenceError:
            return None
    return load_space(run.path, space, proj_dim)


def diversify_selection(table: pd.DataFrame, scores: Scores, diversify: Diversify, space: Space | None,
                        budget: int, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """The ``budget`` rows a diversity-aware algorithm picks from the scorable ones of a ranking, in
    the order it picked them, and what it reports (objective, radius...)."""
    candidates = table[table["finite"]]
    if diversify.algorithm == "quota":
        if scores.per_task is None or len(scores.task_names) < 2:
            raise InfluenceError("--diversify quota needs a method with per-subtask scores and a target with subtasks")
        per_task = candidates[[TASK_PREFIX + name for name in scores.task_names]].to_numpy(dtype=np.float64)
        return candidates.iloc[subtask_quota(per_task, budget)], {"algorithm": "quota", "subtasks": scores.task_names}
    if space is None:
        raise InfluenceError(f"--diversify {diversify.algorithm} needs a space: the run has no gradient stores; "
                             "give --space reps or --space embed:<model>")
    candidates = candidates[space.finite[candidates["pool_index"].to_numpy()]]
    vectors = space.vectors[candidates["pool_index"].to_numpy()]
    details: dict = {"algorithm": diversify.algorithm, "space": space.name, "candidates": len(candidates)}
    if diversify.algorithm == "kcenter":
        picks, details["covering_radius"] = k_center_greedy(vectors, budget, first=0)
    elif diversify.algorithm == "fl":
        picks, details["objective"] = facility_location(vectors, candidates["score"].to_numpy(), budget,
                                                        diversify.weight, seed=seed)
        details["diversity_weight"] = diversify.weight
    elif diversify.algorithm == "filter":
        picks = redundancy_filter(vectors, np.arange(len(vectors)), budget, diversify.min_distance)
        details["min_distance"] = diversify.min_distance
        if len(picks) < budget:
            details["note"] = (f"only {len(picks)} examples are farther than {diversify.min_distance} from every other "
                               "kept one")
    elif diversify.algorithm == "dq":
        picks = dataset_quantization(vectors, budget, diversify.bins, seed)
        details.update(bins=diversify.bins, note="DQ draws at random inside its bins: the score only decides which "
                                                 "examples are candidates (--method random: DQ as published)")
    elif diversify.algorithm == "clusterclip":
        clusters = diversify.clusters or default_clusters(len(vectors))
        labels, _ = kmeans(vectors, clusters, seed)
        picks, repeats = cluster_clip(labels, budget, diversify.clip, seed)
        chosen = candidates.iloc[picks].copy()
        chosen["weight"] = repeats  # times drawn: selected.jsonl carries it, evaluate select trains with it
        details.update(clusters=clusters, clip=diversify.clip, training_slots=int(repeats.sum()),
                       distinct=len(picks), note="ClusterClip fills --fraction of the pool in training slots; an "
                                                 "example drawn k times has weight k")
        return chosen, details
    else:
        clusters = diversify.clusters or default_clusters(len(vectors))
        labels, _ = kmeans(vectors, clusters, seed)
        picks = cluster_balanced(labels, np.arange(len(vectors)), budget, diversify.balance)
        details.update(clusters=clusters, balance=diversify.balance)
    return candidates.iloc[picks], details


def _pool_clusters(space: Space | None) -> np.ndarray | None:
    """k-means clusters of the pool's usable rows in ``space`` (for cluster coverage)."""
    if space is None or space.finite.sum() < 2:
        return None
    rows = np.flatnonzero(space.finite)
    return kmeans(space.vectors[rows], default_clusters(len(rows)))[0]


def _diversity(space: Space, labels: np.ndarray | None, selected: pd.DataFrame) -> dict | None:
    """Subset-level diversity of a selection against a random subset of its size and the pool."""
    if labels is None:
        return None
    rows = np.flatnonzero(space.finite)
    position = np.full(len(space.finite), -1)
    position[rows] = np.arange(len(rows))
    chosen = position[selected["pool_index"].to_numpy()]
    report = subset_diversity(space.vectors[rows], chosen[chosen >= 0], labels)
    return {"space": space.name, **report}
