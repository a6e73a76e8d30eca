"""The options several methods take, each defined once: a method's ``Options`` dataclass declares a field with
one of these, and ``rank`` (and ``evaluate lds``) generate one flag per option name from every method's fields.
A default may differ between methods (``outcome``: accuracy for memorization, the loss elsewhere)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import setting


def proj_dim() -> Any:
    return setting(None, "Which projected dimension of the stored gradients to read [default: the only one stored].",
                   min=1)


def seed(default: int = 0) -> Any:
    return setting(default, "Seed of the method's random draw.")


def subsets() -> Any:
    return setting("fit", "Which subset models (`influence subsets train --name`).")


def outcome(default: str = "loss") -> Any:
    return setting(default, "The outcome the subset models were measured on (loss: lower is better; the others: "
                            "higher).")


def regression() -> Any:
    return setting("lasso", "The datamodels' regression: scikit-learn LassoCV or RidgeCV (regularisation chosen by "
                            "cross-validation).")


def lambda_reg() -> Any:
    return setting(None, "Ridge term of TRAK's kernel [default: 1e-2 x its mean diagonal; 0 = traker's].", min=0)


def dask() -> Any:
    return setting(None, "Score on Dask, on a LocalCluster (--dask alone: one worker process per core) or on the "
                         "scheduler at ADDRESS (e.g. tcp://host:8786; workers must see the run's folder).",
                   flag_value="local")


def budget() -> Any:
    return setting(0.1, "Fraction of the pool the method selects (rank --fraction equal to it returns the selection).",
                   min=0, max=1, min_open=True, max_open=True)


def space() -> Any:
    return setting("grads", "Where vectors come from: grads, grads:<checkpoint>, reps, or embed:<model>.")


def clusters() -> Any:
    return setting(None, "k-means clusters [default: about sqrt(n/2)].", min=1)


@dataclass(kw_only=True)
class Projected:
    """The options of a method that reads the stored projected gradients."""

    proj_dim: int | None = proj_dim()


@dataclass(kw_only=True)
class Seeded:
    """The options of a method with a random draw."""

    seed: int = seed()
