"""Geometry of a space of unit vectors: cosine similarities in blocks, nearest neighbours, k-means, SemDeDup,
the Vendi score, and the lazy greedy that facility-location objectives (QDIT's, CRAIG's) share. Memory grows with the
number of rows times the dimension, never with its square."""

from __future__ import annotations

import heapq
from collections.abc import Callable

import numpy as np
import torch

BLOCK = 4096


def device() -> torch.device:
    """Where the selection loops run: the GPU when there is one (the vectors are copied there once)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _tensor(x: np.ndarray, on: torch.device | None = None) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return tensor if on is None or on.type == "cpu" else tensor.to(on)


def similarities(x: np.ndarray, rows: np.ndarray, block: int = BLOCK):
    """Yield (start, sim) with ``sim = x[start:start+block] @ rows.T`` (float32)."""
    right = _tensor(rows).T
    for start in range(0, len(x), block):
        yield start, (_tensor(x[start : start + block]) @ right).numpy()


def lazy_greedy(n: int, budget: int, gain: Callable[[np.ndarray], np.ndarray], commit: Callable[[int], None],
                block: int = BLOCK, lazy_batch: int = 64) -> tuple[list[int], float]:
    """Lazy greedy (Minoux 1978) maximisation of a monotone submodular set function over ``n`` items: ``gain(items)``
    gives their marginal gains on the picks so far, ``commit(item)`` adds one. (order of the picks, objective value).
    Hand-written: apricot's needs the dense similarity matrix; these gains stream blocks against the pool."""
    heap = []
    for start in range(0, n, block):  # first pass: every candidate's gain on the empty set
        candidates = np.arange(start, min(start + block, n))
        heap += [(-g, int(c)) for g, c in zip(gain(candidates), candidates)]
    heapq.heapify(heap)
    picks: list[int] = []
    value = 0.0
    while len(picks) < min(budget, n) and heap:
        # Re-evaluate the `lazy_batch` best upper bounds at once: one matrix product reads the clients
        # once for all of them (one candidate at a time, each re-evaluation would read them again).
        popped = [heapq.heappop(heap) for _ in range(min(lazy_batch, len(heap)))]
        candidates = np.array([candidate for _, candidate in popped])
        fresh = gain(candidates)
        best = int(np.argmax(fresh))
        if heap and fresh[best] < -heap[0][0] - 1e-12:  # a stale bound may still be higher: not yet
            best = -1
        for i, candidate in enumerate(candidates):
            if i != best:
                heapq.heappush(heap, (-float(fresh[i]), int(candidate)))
        if best < 0:
            continue
        picks.append(int(candidates[best]))
        value += float(fresh[best])
        commit(picks[-1])
    return picks, value


# -- per-example indicators -------------------------------------------------------------------------------------
def knn_distance(x: np.ndarray, k: int = 5) -> np.ndarray:
    """Cosine distance of every row to its ``k``-th nearest other row (exact: scikit-learn's brute-force
    search, which works through the pool in chunks of bounded memory)."""
    from sklearn.neighbors import NearestNeighbors

    if len(x) < 2:
        return np.full(len(x), np.nan)
    k = min(k, len(x) - 1)
    distances, indices = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(x).kneighbors(x)
    rows = np.arange(len(x))[:, None]
    others = np.where(indices == rows, np.inf, distances)  # drop each row itself (a duplicate may come first)
    return np.sort(others, axis=1)[:, k - 1]


def kmeans(x: np.ndarray, clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, unit centroids) of k-means on the unit vectors (scikit-learn's MiniBatchKMeans)."""
    from sklearn.cluster import MiniBatchKMeans

    clusters = max(1, min(clusters, len(x)))
    model = MiniBatchKMeans(n_clusters=clusters, random_state=seed, n_init=3, batch_size=min(4096, max(len(x), 1)))
    labels = model.fit_predict(x)
    centroids = model.cluster_centers_.astype(np.float32)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    return labels, centroids / np.where(norms > 0, norms, 1)


def default_clusters(n: int) -> int:
    """A default number of clusters: about sqrt(n / 2), between 2 and 1000."""
    return int(min(1000, max(2, round(np.sqrt(n / 2)))))


def centroid_distance(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cosine distance of every row to its own cluster's centroid (prototypicality: low = typical)."""
    return 1 - np.einsum("nd,nd->n", x, centroids[labels])


def semdedup(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, eps: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup (Abbas et al., 2023): inside each cluster, examples sorted from the farthest to the
    nearest to the centroid; an example whose cosine similarity to one earlier in that order exceeds
    ``1 - eps`` is a near-duplicate (the farthest of a group is kept). Returns (duplicate flags, each
    example's largest similarity to another member of its cluster)."""
    duplicate = np.zeros(len(x), dtype=bool)
    nearest = np.full(len(x), np.nan)
    distance = centroid_distance(x, labels, centroids)
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        members = members[np.argsort(-distance[members], kind="stable")]
        if len(members) < 2:
            continue
        sim = _tensor(x[members]) @ _tensor(x[members]).T
        sim.fill_diagonal_(-np.inf)
        nearest[members] = sim.max(dim=1).values.numpy()
        earlier = torch.triu(sim, diagonal=1)  # sim[i, j] for i earlier than j
        earlier[torch.tril(torch.ones_like(sim, dtype=torch.bool))] = -np.inf
        duplicate[members] = (earlier.max(dim=0).values > 1 - eps).numpy()
    return duplicate, nearest


# -- subset-level diversity -------------------------------------------------------------------------------------------
def vendi_score(x: np.ndarray) -> float:
    """Vendi score with the cosine kernel: the eigenvalues of ``K / n`` are those of ``X^T X / n``
    (computed in the smaller of the two spaces)."""
    n = len(x)
    if n == 0:
        return float("nan")
    x = x.astype(np.float64)
    gram = x.T @ x / n if x.shape[1] < n else x @ x.T / n
    eigenvalues = np.clip(np.linalg.eigvalsh(gram), 0, None)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(np.exp(-(eigenvalues * np.log(eigenvalues)).sum()))


def mean_nn_distance(x: np.ndarray, sample: int = 2000, seed: int = 0) -> float:
    """Mean cosine distance of each row to its nearest other row (over a random ``sample`` of rows
    when larger, neighbours searched among all rows)."""
    if len(x) < 2:
        return float("nan")
    rows = np.arange(len(x)) if len(x) <= sample else np.random.default_rng(seed).choice(len(x), sample, replace=False)
    best = np.full(len(rows), -np.inf)
    for start, sim in similarities(x, x[rows]):
        block_rows = np.arange(start, start + len(sim))
        sim[block_rows[:, None] == rows[None, :]] = -np.inf
        best = np.maximum(best, sim.max(axis=0))
    return float(np.mean(1 - best))
