"""Stage 5, scoring: every method that scores the run's pool, under one contract (:mod:`.base`).

Importing this package imports every module in it, which registers their methods (adding a method is adding
its module); ``influence methods`` lists them with what each score means:

* target-aware influence: ``less`` (gradient cosine), ``trak``, ``tracin`` (gradient attribution on the stored
  projected gradients);
* LESS's baselines: ``random``; ``bm25``, ``dsir`` (lexical); ``rds`` (last-token representation cosine);
* difficulty and noise: ``grand``, ``forgetting`` (training dynamics); ``nll``, ``ppl``, ``nll_full``, ``el2n``,
  ``entropy``, ``least_confidence``, ``mean_margin``, ``min_margin``, ``ifd`` (one forward pass per example per
  checkpoint);
* the counterfactual engine: ``memorization``, ``fz_influence``, ``datamodel``, ``dsdm``;
* diversity: ``ttr``, ``mtld``, ``distinct1``, ``distinct2``, ``knn_distance``, ``prototypicality``, ``semdedup``.

:func:`score` and :func:`attribution` run one method by name with keyword options.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from ..train.run import Run
from .base import Attribution, Method, Scores, Target, get_method, registry

# Every module of the package is imported, so a method is registered by adding its module, and nothing else.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def _run(run: str | Path | Run) -> Run:
    return run if isinstance(run, Run) else Run(run)


def score(method: str, run: str | Path | Run, target: str | Target | None = None,
          target_tasks: list[str] | None = None, **options: Any) -> Scores:
    """The pool's scores by ``method`` (for ``target`` where the method needs one), its options by keyword;
    prerequisites and options are checked first."""
    chosen = get_method(method)
    run, target, settings = _run(run), Target.of(target, target_tasks), chosen.options(options)
    chosen.require(run, target, settings)
    return chosen.scores(run, target, settings)


def score_many(method: str, run: str | Path | Run, targets: list[str | None], target_tasks: list[str] | None = None,
               **options: Any) -> list[Scores]:
    """:func:`score` for several targets (LESS reads the pool's stores once for all of them)."""
    chosen = get_method(method)
    run, settings = _run(run), chosen.options(options)
    wanted = [Target.of(t, target_tasks) for t in targets]
    for target in wanted:
        chosen.require(run, target, settings)
    return chosen.scores_many(run, wanted, settings)


def attribution(method: str, run: str | Path | Run, target: str | Target, target_tasks: list[str] | None = None,
                **options: Any) -> Attribution:
    """The effect of each pool example on each target example by ``method`` (one that has them)."""
    chosen = get_method(method)
    if not chosen.has_attribution:
        raise ValueError(f"{method} gives one score per example, not an effect per target example")
    run, target, settings = _run(run), Target.of(target, target_tasks), chosen.options(options)
    chosen.require(run, target, settings)
    return chosen.attribution(run, target, settings)


__all__ = ["Attribution", "Method", "Scores", "Target", "attribution", "get_method", "registry", "score", "score_many"]
