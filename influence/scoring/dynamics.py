"""Training-dynamics scores: forgetting events (Toneva et al. 2019) and GraNd (Paul et al. 2021).

**Forgetting events.** At every presentation during ``warmup`` an example is *learned* when its
response-token accuracy under argmax decoding reaches ``learned_threshold`` (default 1.0: the whole
response is reproduced exactly; long LLM responses rarely are, so 0.5-0.9 gives more signal). A forgetting event is a
transition learned -> not learned between consecutive presentations. Examples never learned get the
largest possible count (the number of presentations), as in the original where they count as
infinitely forgettable. Score: the count; higher = more forgettable (harder); ``unforgettable``
examples (learned at some point, never forgotten) score 0. Examples never presented are unscorable.
With ``warmup --track-all`` the whole pool is evaluated after every epoch and those evaluations are
the presentations, so every example gets a count.

**GraNd.** The expected L2 norm of the example's full (unprojected) loss gradient over the warm-up
checkpoints, from the norms ``project-grads`` stores. Higher = larger expected gradient = more
important for training (Paul et al. keep the highest).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config import setting
from ..core.naming import TRAIN
from ..gradients.store import open_checkpoint_stores, resolve_dim
from ..train.run import Run
from .base import DYNAMICS, GRADIENT_NORMS, Method, Scores, Target
from .options import Projected


def count_forgetting(learned: list[bool] | np.ndarray) -> int:
    """Forgetting events in one example's sequence of learned flags (never learned -> len)."""
    learned = np.asarray(learned, dtype=bool)
    if not learned.any():
        return len(learned)
    return int(np.sum(learned[:-1] & ~learned[1:]))


def forgetting_table(dynamics: pd.DataFrame, learned_threshold: float = 1.0) -> pd.DataFrame:
    """Per example: presentations, forgetting events, ever learned, unforgettable."""
    source = dynamics
    if "phase" in dynamics and (dynamics["phase"] == "eval").any():
        source = dynamics[dynamics["phase"] == "eval"]
    ordered = source.sort_values(["id", "epoch", "step"], kind="stable")
    rows = []
    for example_id, group in ordered.groupby("id", sort=False):
        learned = group["token_accuracy"].to_numpy() >= learned_threshold
        events = count_forgetting(learned)
        rows.append({"id": example_id, "presentations": len(learned), "forgetting_events": events,
                     "ever_learned": bool(learned.any()), "unforgettable": bool(learned.any()) and events == 0})
    return pd.DataFrame(rows)


@dataclass(kw_only=True)
class ForgettingOptions:
    learned_threshold: float = setting(1.0, "Token accuracy at which an example counts as learned (1.0 = exact "
                                            "match).", min=0, min_open=True, max=1)


class Forgetting(Method):
    name = "forgetting"
    family = "difficulty"
    summary = "forgetting events during the warm-up (Toneva et al. 2019)"
    meaning = __doc__.split("**GraNd.**")[0].split("**Forgetting events.** ")[1].strip()
    needs = (DYNAMICS,)
    Options = ForgettingOptions

    def scores(self, run: Run, target: Target | None, options: ForgettingOptions) -> Scores:
        table = forgetting_table(pd.read_parquet(run.path / "dynamics.parquet"), options.learned_threshold).set_index("id")
        ids = [e.id for e in run.pool()]
        counts = table["forgetting_events"].reindex(ids).to_numpy(dtype=np.float64)
        finite = np.isfinite(counts)
        return Scores(
            method="forgetting",
            ids=ids,
            score=counts,
            description=self.meaning,
            finite=finite,
            details={"learned_threshold": options.learned_threshold, "presented": int(finite.sum()),
                     "unforgettable": int(table["unforgettable"].sum()),
                     "never_learned": int((~table["ever_learned"]).sum())},
        )


class Grand(Method):
    name = "grand"
    family = "difficulty"
    summary = "GraNd: expected norm of the example's loss gradient over the checkpoints (Paul et al. 2021)"
    meaning = "GraNd: " + __doc__.split("**GraNd.**")[1].strip()
    needs = (GRADIENT_NORMS,)
    Options = Projected

    def scores(self, run: Run, target: Target | None, options: Projected) -> Scores:
        stores = open_checkpoint_stores(run, TRAIN, resolve_dim(run, options.proj_dim, any_dim=True))
        norms = np.stack([s.array("norms").astype(np.float64) for s in stores])
        finite = np.logical_and.reduce([s.array("finite") for s in stores])
        score = np.where(finite, norms.mean(axis=0), np.nan)
        return Scores(
            method="grand",
            ids=stores[0].ids.tolist(),
            score=score,
            description=self.meaning,
            finite=finite,
            details={"checkpoints": [s.metadata["checkpoint"] for s in stores]},
        )
