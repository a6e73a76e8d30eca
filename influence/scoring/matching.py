"""Gradient matching: a weighted subset whose gradients sum to what training on the whole pool (or the target) asks.

On the pool's plain loss gradients at the warm-up's last checkpoint (``influence project-grads --train-gradient sgd``;
projected, so distances and dot products are preserved in expectation):

* ``gradmatch`` (GRAD-MATCH; Killamsetty et al., ICML 2021, their ``cords`` code the reference): orthogonal matching
  pursuit with non-negative weights of ``b``, the sum of the pool's gradients (with ``--target``: the sum of the
  target's, the reference's ``valid=True``), on the regularised objective ``|sum_{i in S} w_i g_i - b|^2 +
  lambda |w|^2``: ``--budget`` iterations each add the example most aligned with the residual (``argmax g_i .
  r``), then solve ``(G_S + lambda I) w = A_S b`` and, while a weight is negative, drop the most negative example
  and solve again (cords' ``OrthogonalMP_REG_Parallel_V1``, ``positive=True``; ``--lam`` 0.5 as its configurations;
  one difference: cords weighs its very first pick without ``lambda``, here every solve has it); it stops early when
  ``|r| / |b| < 1e-4``, an example is picked twice or none is aligned with the residual, and the budget is then
  filled with random examples of weight 1, as cords does. Cost: one product of the pool with the residual per
  iteration (on a float32 copy of the pool's gradients up to 4 GB, 0.8 GB at 100k x 2048; beyond, float16 blocks
  converted per product) and a growing Cholesky factor (``budget^2`` floats).
* ``craig`` (CRAIG; Mirzasoleiman et al., ICML 2020): lazy greedy facility location ``F(S) = sum_v max_{s in S}
  (C - |g_v - g_s|)`` (``C`` any bound on the distances: the picks do not depend on it) over the pool, or over a
  random sample of ``--clients`` of it on larger pools; each pick's weight is the number of pool examples whose
  nearest pick it is (CRAIG's ``gamma``).

Sign and scale: higher = selected first: ``1 + w / (1 + max w)`` in (1, 2) for the selection (``w`` its weight,
kept in the ``weight`` column: how many pool examples it stands for, which ``evaluate select`` trains with), and
``h`` in [0, 1) for the others (the rank of their alignment with the last residual for gradmatch, of their distance to
the nearest pick for craig: what would be added next). ``rank --fraction`` equal to ``--budget`` returns the
selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import cho_solve, solve_triangular
from scipy.stats import rankdata

from ..config import setting
from ..core.naming import TRAIN, gradient_dataset
from ..errors import InfluenceError
from ..gradients.geometry import BLOCK, lazy_greedy
from ..gradients.store import find_target_dataset, open_checkpoint_stores, resolve_dim
from ..train.run import Run
from . import options as shared
from .base import PLAIN_GRADIENTS, Method, Scores, Target

MEANING = __doc__.split("Sign and scale: ")[1].strip()


FLOAT32_COPY_GB = 4.0  # the pool's gradients are copied to float32 once when the copy is no larger (100k x 2048: 0.8)


class Rows:
    """``a @ vector`` in float32 for the rows of ``a`` (float16 as stored): from a float32 copy made once when it takes
    at most ``FLOAT32_COPY_GB``, else ``block`` rows converted at a time (slower: every product converts them again)."""

    def __init__(self, a: np.ndarray, block: int = 8 * BLOCK):
        self.a, self.block = a, block
        self.copy = torch.from_numpy(a.astype(np.float32)) if a.size * 4 <= FLOAT32_COPY_GB * 2**30 else None

    def __matmul__(self, vector: torch.Tensor) -> np.ndarray:
        if self.copy is not None:
            return (self.copy @ vector).numpy()
        return np.concatenate([(torch.from_numpy(self.a[s : s + self.block]).float() @ vector).numpy()
                               for s in range(0, len(self.a), self.block)])


def omp_nonnegative(a: np.ndarray, b: np.ndarray, budget: int, lam: float, tol: float = 1e-4
                    ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """GRAD-MATCH's OMP (module docstring) of ``b`` by the rows of ``a`` (n x d): (picked rows in order, their
    weights, the last residual's products with every row)."""
    n = len(a)
    budget = min(budget, n)
    target = torch.from_numpy(np.asarray(b, dtype=np.float32))
    residual = target.clone()
    norm_b = float(target.norm())
    picks: list[int] = []
    if norm_b == 0:
        return picks, np.zeros(0), np.zeros(n)
    rows = np.zeros((budget, a.shape[1]), dtype=np.float64)  # the picks' gradients, in float64 for the solves
    gram = np.zeros((budget, budget))  # G_S + lambda I
    factor = np.zeros((budget, budget))  # its Cholesky factor, grown one row at a time
    products = np.zeros(budget)  # A_S b
    weights = np.zeros(0)
    pool = Rows(a)
    projections = pool @ residual
    for _ in range(budget):
        if float(residual.norm()) / norm_b < tol:
            break
        index = int(np.argmax(projections))
        if index in picks or projections[index] <= 0:  # nothing left that a positive weight could match
            break
        k = len(picks)
        row = a[index].astype(np.float64)
        rows[k] = row
        gram[k, :k] = gram[:k, k] = rows[:k] @ row
        gram[k, k] = row @ row + lam
        products[k] = row @ np.asarray(b, dtype=np.float64)
        picks.append(index)
        # Grow the factor: L y = G_S[:k, k], then the new diagonal (O(k^2), not a new O(k^3) factorisation).
        y = solve_triangular(factor[:k, :k], gram[:k, k], lower=True) if k else np.zeros(0)
        if gram[k, k] - y @ y <= 0:
            raise InfluenceError("gradmatch: the picked gradients are linearly dependent and --lam is 0: give --lam > 0")
        factor[k, :k], factor[k, k] = y, np.sqrt(gram[k, k] - y @ y)
        weights = cho_solve((factor[: k + 1, : k + 1], True), products[: k + 1])
        while len(picks) and weights.min() < 0:  # drop the most negative and solve again (cords' V1)
            drop = int(np.argmin(weights))
            keep = [j for j in range(len(picks)) if j != drop]
            picks = [picks[j] for j in keep]
            rows[: len(keep)] = rows[keep]
            gram[: len(keep), : len(keep)] = gram[np.ix_(keep, keep)]
            products[: len(keep)] = products[keep]
            size = len(keep)
            try:
                factor[:size, :size] = np.linalg.cholesky(gram[:size, :size]) if size else factor[:0, :0]
            except np.linalg.LinAlgError:
                raise InfluenceError("gradmatch: the picked gradients are linearly dependent and --lam is 0: give "
                                     "--lam > 0") from None
            weights = cho_solve((factor[:size, :size], True), products[:size]) if size else np.zeros(0)
        residual = target - torch.from_numpy((weights @ rows[: len(picks)]).astype(np.float32))
        projections = pool @ residual
    return picks, weights, projections


def craig(a: np.ndarray, budget: int, clients: int, seed: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """CRAIG (module docstring) on the rows of ``a``: (picks in order, their weights, every row's distance to its
    nearest pick)."""
    n = len(a)
    served = np.arange(n) if n <= clients else np.random.default_rng(seed).choice(n, clients, replace=False)
    client_vectors = torch.from_numpy(a[served]).float()
    largest = max(float(torch.from_numpy(a[s : s + BLOCK]).float().norm(dim=1).max()) for s in range(0, n, BLOCK))
    bound = 2 * largest + 1.0  # C >= every distance (blocks: the pool stays in float16)
    nearest = torch.full((len(served),), bound)  # each client's distance to its nearest pick (C: none yet)

    def gain(candidates: np.ndarray) -> np.ndarray:
        distance = torch.cdist(torch.from_numpy(a[candidates]).float(), client_vectors)
        return (nearest[None, :] - distance).clamp(min=0).sum(dim=1).double().numpy()

    def commit(pick: int) -> None:
        torch.minimum(nearest, torch.cdist(torch.from_numpy(a[pick : pick + 1]).float(), client_vectors)[0],
                      out=nearest)

    picks, _ = lazy_greedy(n, budget, gain, commit)
    chosen = torch.from_numpy(a[picks]).float()
    assigned, distance = np.zeros(n, dtype=np.int64), np.zeros(n)
    for start in range(0, n, BLOCK):  # every pool example's nearest pick: CRAIG's gamma
        d = torch.cdist(torch.from_numpy(a[start : start + BLOCK]).float(), chosen)
        value, which = d.min(dim=1)
        assigned[start : start + len(d)], distance[start : start + len(d)] = which.numpy(), value.double().numpy()
    return picks, np.bincount(assigned, minlength=len(picks)).astype(np.float64), distance


def selection_scores(name: str, ids: list[str], picks: list[int], weights: np.ndarray, rest: np.ndarray,
                     description: str, details: dict) -> Scores:
    """The module docstring's scores: ``1 + w / (1 + max w)`` for the picks, ``rest`` ranked into [0, 1) for the others."""
    n = len(ids)
    score = (rankdata(rest, method="ordinal") - 1) / n
    weight = np.zeros(n)
    weight[picks] = weights
    if picks:
        score[picks] = 1 + weights / (1 + weights.max())
    order = np.full(n, -1)
    order[picks] = np.arange(len(picks))
    return Scores(name, ids, score, description, details=details, columns={"weight": weight, "pick": order})


def _pool_gradients(run: Run, options) -> tuple[np.ndarray, list[str], dict, int]:
    """The pool's plain gradients at the last checkpoint (float16, as stored), their ids, what they are, the dim."""
    dim = resolve_dim(run, options.proj_dim)
    store = open_checkpoint_stores(run, gradient_dataset(TRAIN, "sgd"), dim, last_only=True)[0]
    grads = np.asarray(store.array("grads"), dtype=np.float16)
    finite = np.isfinite(grads).all(axis=1)
    if not finite.all():
        raise InfluenceError(f"{run.store_path}: {int((~finite).sum())} pool gradients are not finite (first: "
                             f"{store.ids[np.flatnonzero(~finite)[0]]}); rerun `influence project-grads` for them")
    return grads, store.ids.tolist(), {"checkpoint": store.metadata["checkpoint"], "dim": dim,
                                       "projector": store.metadata["projector"]}, dim


def _budget(run_size: int, budget: float) -> int:
    return max(1, int(budget * run_size))  # as rank counts --fraction


@dataclass(kw_only=True)
class GradMatchOptions(shared.Projected, shared.Seeded):
    budget: float = shared.budget()
    lam: float = setting(0.5, "Ridge term of GRAD-MATCH's weights (cords' lam).", min=0)


@dataclass(kw_only=True)
class CraigOptions(shared.Projected, shared.Seeded):
    budget: float = shared.budget()
    clients: int = setting(10000, "Pool examples the facility location covers (a random sample of larger pools).",
                           min=1)


class GradMatch(Method):
    name = "gradmatch"
    family = "diversity"
    summary = ("GRAD-MATCH: a weighted subset whose gradients match the pool's sum (or the target's with --target) by "
               "non-negative OMP (Killamsetty et al. 2021)")
    meaning = MEANING
    needs = (PLAIN_GRADIENTS,)
    Options = GradMatchOptions

    def scores(self, run: Run, target: Target | None, options: GradMatchOptions) -> Scores:
        grads, ids, details, dim = _pool_gradients(run, options)
        if target is None:
            b, matched = grads.sum(axis=0, dtype=np.float64), "the pool's summed gradient"
        else:
            store = open_checkpoint_stores(run, find_target_dataset(run.store_path, dim, target.name, target.task_list),
                                           dim, last_only=True)[0]
            b, matched = np.asarray(store.array("grads"), dtype=np.float64).sum(axis=0), f"{target.name}'s summed gradient"
        budget = _budget(len(ids), options.budget)
        picks, weights, projections = omp_nonnegative(grads, b, budget, options.lam)
        found = len(picks)
        if found < budget:  # cords fills the budget with random examples of weight 1
            rest = np.setdiff1d(np.arange(len(ids)), picks)
            extra = np.random.default_rng(options.seed).choice(rest, budget - found, replace=False)
            picks, weights = picks + extra.tolist(), np.concatenate([weights, np.ones(len(extra))])
        return selection_scores(self.name, ids, picks, weights, projections,
                                f"GRAD-MATCH weights matching {matched} (selected: 1 + w / (1 + max w))",
                                {**details, "matched": matched, "budget": budget, "omp_picks": found,
                                 "random_fill": budget - found, "lam": options.lam})


class Craig(Method):
    name = "craig"
    family = "diversity"
    summary = "CRAIG: weighted medoids of the pool's gradients by facility location (Mirzasoleiman et al. 2020)"
    meaning = MEANING
    needs = (PLAIN_GRADIENTS,)
    Options = CraigOptions

    def scores(self, run: Run, target: Target | None, options: CraigOptions) -> Scores:
        grads, ids, details, _ = _pool_gradients(run, options)
        budget = _budget(len(ids), options.budget)
        picks, weights, distance = craig(grads, budget, options.clients, options.seed)
        return selection_scores(self.name, ids, picks, weights, distance,
                                "CRAIG medoids of the pool's gradients (selected: 1 + w / (1 + max w), w the pool "
                                "examples each stands for)",
                                {**details, "budget": budget, "clients": min(options.clients, len(ids))})
