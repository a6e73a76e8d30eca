"""How ``rank`` orders and selects the pool: :class:`RankSettings`, the one source of ``rank``'s flags, its
``--config`` keys, the API's keywords and their validation (the method's own options come from the method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import click

from ..config import setting
from ..scoring import options as shared
from ..scoring.base import MethodChoice

SelectMode = Literal["top", "bottom", "middle", "below", "above"]
DEFAULT_FRACTION = 0.05  # LESS's 5%
DEFAULT_BAND = (0.25, 0.75)  # the middle half
Algorithm = Literal["kcenter", "fl", "filter", "clusters", "quota", "dq", "clusterclip"]


class QuantileBand(click.ParamType):
    """``LOW,HIGH`` quantiles with 0 <= LOW < HIGH <= 1, as a pair of floats."""

    name = "LOW,HIGH"

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)) and len(value) == 2:
            low, high = (float(x) for x in value)
        else:
            try:
                low, high = (float(x) for x in str(value).split(","))
            except ValueError:
                self.fail(f"{value!r} is not two quantiles LOW,HIGH (e.g. 0.25,0.75)", param, ctx)
        if not 0 <= low < high <= 1:
            self.fail(f"{value!r}: needs 0 <= LOW < HIGH <= 1", param, ctx)
        return low, high


def fraction(default: float = 0.05, help: str = "Fraction of the pool to select (top / bottom), counted as LESS's "
                                                "--percentage: floor(fraction x pool).") -> Any:
    """The share of the pool a selection keeps (``rank``, ``compare``, ``evaluate select``), defined once."""
    return setting(default, help, min=0, min_open=True, max=1)


@dataclass
class Diversify:
    """Diversity-aware selection of the top (see :mod:`.diversify`): ``algorithm`` one of kcenter, fl (with
    ``weight``, the diversity weight), filter (with ``min_distance``), clusters (with ``clusters`` and
    ``balance``), quota; None = plain selection."""

    algorithm: Algorithm | None = setting(
        None, "Diversity-aware selection of the top: k-center greedy, facility location with the score as quality "
              "(QDIT), the redundancy filter (DEITA), the best of each k-means cluster, per-subtask quotas, Dataset "
              "Quantization's bins (dq) or ClusterClip's cluster-balanced sampling with repeats (clusterclip).",
        flag="diversify")
    weight: float = setting(0.3, "--diversify fl: weight w of facility location against the score (quality).",
                            flag="diversity-weight", min=0, max=1)
    min_distance: float = setting(0.1, "--diversify filter: keep an example only if every kept one is farther "
                                       "(cosine distance).", min=0, max=2)
    clusters: int | None = shared.clusters()
    balance: Literal["proportional", "equal"] = setting("proportional", "--diversify clusters: each cluster's "
                                                                        "share of the budget.")
    bins: int = setting(10, "--diversify dq: Dataset Quantization's bins.", flag="dq-bins", min=1)
    clip: int = setting(4, "--diversify clusterclip: the most times one example may be drawn.", flag="clip", min=1)


@dataclass(kw_only=True)
class RankSettings:
    """How ``rank`` scores, orders and selects the pool, and where it writes (see :mod:`.outputs`)."""

    method: str = setting("less", "The scoring method (`influence methods` lists them, with each score's sign and "
                                  "scale).", type=MethodChoice())
    target_tasks: list[str] | None = setting(None, "Comma-separated subtasks of the target(s) to keep.", list=True)
    fraction: float | None = fraction(None, "Fraction of the pool to select (--select top / bottom), counted as LESS's "
                                            "--percentage: floor(fraction x pool) [default: 0.05].")
    top_k: int | None = setting(None, "Select this many instead (--select top / bottom; LESS's --max_samples).", min=1)
    mode: SelectMode = setting("top", "Which examples to keep: highest/lowest scores, a middle quantile band, or a "
                                      "threshold.", flag="select", aliases=("mode",))
    band: tuple[float, float] | None = setting(None, "Quantile band for --select middle [default: 0.25,0.75].",
                                               type=QuantileBand())
    threshold: float | None = setting(None, "Threshold for --select below/above (e.g. IFD 1).")
    diversify: Diversify = setting(default_factory=Diversify, prefix="")
    space: str | None = setting(None, "Space of diversity (and of knn_distance, prototypicality, semdedup): grads, "
                                      "grads:<checkpoint>, reps, embed:<model>, or none [default: grads when the run "
                                      "has gradient stores].")
    out: str | None = setting(None, "Output folder [default: RUN/rank-<method>-<target>].",
                              path={"file_okay": False})
    overwrite: bool = setting(False, "Replace another method's or target's ranking in --out.")
    hf_dataset: bool = setting(False, "Also write the selection as a Hugging Face dataset folder "
                                      "(OUT/selected_dataset, for datasets.load_from_disk).")
    write: bool = setting(True, "Write the outputs (False: only return the rankings).", cli=False)

    def extra_problems(self) -> list[str]:
        """Every selection option is honoured or refused, never ignored."""
        problems = []
        counted = self.mode in ("top", "bottom")
        if self.mode in ("below", "above") and self.threshold is None:
            problems.append(f"--select {self.mode} needs --threshold")
        if self.threshold is not None and self.mode not in ("below", "above"):
            problems.append(f"--threshold applies to --select below / above, not --select {self.mode}")
        if self.top_k is not None and not counted:
            problems.append(f"--top-k applies to --select top / bottom, not --select {self.mode}")
        if self.fraction is not None and not counted:
            problems.append(f"--fraction applies to --select top / bottom, not --select {self.mode} (it keeps "
                            f"{'the --band quantiles' if self.mode == 'middle' else 'the scores ' + self.mode + ' --threshold'})")
        if self.fraction is not None and self.top_k is not None:
            problems.append("give --fraction or --top-k, not both")
        if self.band is not None and self.mode != "middle":
            problems.append(f"--band applies to --select middle, not --select {self.mode}")
        if self.diversify.algorithm is not None and self.mode != "top":
            problems.append(f"--diversify picks from the top, not --select {self.mode}")
        return problems
