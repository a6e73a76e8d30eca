"""The method contract: what a scoring method declares, what it takes and what it returns.

A method is a subclass of :class:`Method` that names itself; defining it registers it. It declares

* ``name``, ``family`` (what kind of score it is) and a one-line ``summary``;
* ``meaning``: the sign and scale of its score, shown to users (``influence methods``, ``--help``);
* ``needs``: what it reads (a target, the pool's gradients of a feature, subset models, ...), each a
  :class:`Need` that says which command provides it, so a missing prerequisite is refused before any work;
* ``Options``: a settings dataclass, whose fields become ``rank``'s flags for this method (shared options
  come from :mod:`.options`, each defined once);

and implements :meth:`Method.scores` (one score per pool example: a :class:`Scores`) and, where it estimates
the effect of each pool example on each target example, :meth:`Method.attribution` (an
:class:`Attribution`; the LDS check uses it). The registry (:func:`registry`), ``rank``'s method flags, the
``influence methods`` listing, the LDS check and ``status`` all read the registry; nothing else lists
methods. Adding a method is one module (and its tests); ``docs/architecture.md`` walks through one.

Convention for every method: ``rank`` orders by score, highest first (rank 1); selection modes pick the top,
the bottom, a middle band or a threshold of that order.
"""

from __future__ import annotations

import dataclasses
import difflib
from abc import ABC
from dataclasses import dataclass, field
from typing import Any, ClassVar

import click
import numpy as np

from ..config import check, flag_of, options_of
from ..core.naming import TRAIN, gradient_dataset
from ..errors import InfluenceError
from ..gradients.store import stored_datasets, stored_dims
from ..train.run import Run
from ..train.subset_store import stored_subsets


@dataclass
class Scores:
    """Scores of the pool, one per example, in pool order.

    ``score``: higher = ranked first. ``per_task``: optional (n, n_tasks) breakdown by target subtask.
    ``finite``: false where an example could not be scored (non-finite gradient); such examples are
    ranked last. ``details``: what was combined (checkpoints, weights, ...), written to summary.json.
    """

    method: str
    ids: list[str]
    score: np.ndarray
    description: str
    per_task: np.ndarray | None = None
    task_names: list[str] = field(default_factory=list)
    finite: np.ndarray | None = None
    details: dict = field(default_factory=dict)
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)  # name -> a DataFrame, written as <name>.parquet beside it


@dataclass
class Attribution:
    """Effects of each pool example on each target example, ``matrix`` (n_pool, n_target): higher =
    including the pool example helps that target example more (its loss lower, its margin higher).

    The methods that estimate such pairwise effects (LESS's cosines, TRAK, TracIn, datamodels, the
    Feldman & Zhang influence estimate) return one; ``rank`` uses :meth:`scores` (the mean effect over
    the target's examples: a linear estimate of the change of the target's mean outcome), and the LDS
    check predicts a subset's effect on each target example as the sum of its members' rows.
    """

    method: str
    pool_ids: list[str]
    target_ids: list[str]
    target_tasks: list[str]
    matrix: np.ndarray
    description: str
    details: dict = field(default_factory=dict)
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def scores(self) -> Scores:
        """Mean over the target's examples (and per subtask, the ``task:`` columns); an example with
        any non-finite effect is unscorable."""
        tasks = np.asarray(self.target_tasks)
        names, counts = np.unique(tasks, return_counts=True)
        per_task = np.stack([self.matrix[:, tasks == name].mean(axis=1) for name in names], axis=1)
        return subtask_scores(self.method, self.pool_ids, per_task, names.tolist(), counts, self.description, self.details,
                              self.columns)


def subtask_scores(method: str, ids: list[str], per_task: np.ndarray, names: list[str], counts: np.ndarray,
                   description: str, details: dict, columns: dict | None = None) -> Scores:
    """:class:`Scores` from the mean effect on each subtask's target examples (``per_task``, n_pool x subtasks, with
    ``counts`` examples each): the score is the mean over every target example, an example with any non-finite
    effect unscorable. What an :class:`Attribution` aggregates to, and what a method that folds each subtask's
    targets into one vector computes without the whole matrix."""
    score = per_task @ (np.asarray(counts, dtype=np.float64) / np.sum(counts))
    return Scores(method, list(ids), score, description, per_task.astype(np.float32), list(names), np.isfinite(score),
                  {**details, "aggregation": "mean over the target's examples"}, dict(columns or {}))


@dataclass(frozen=True)
class Target:
    """What a method scores against: a registry name or data file (``name``), and, optionally, which of its
    subtasks to keep (``tasks``; None = all)."""

    name: str
    tasks: tuple[str, ...] | None = None

    @classmethod
    def of(cls, name: str | Target | None, tasks: list[str] | tuple[str, ...] | None = None) -> Target | None:
        if name is None or isinstance(name, Target):
            return name
        return cls(name, tuple(tasks) if tasks else None)

    @property
    def task_list(self) -> list[str] | None:
        return list(self.tasks) if self.tasks else None


# --- what a method needs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    """A prerequisite of a method: what it reads, which command provides it, and whether ``rank`` makes it
    itself when it is missing (``made_on_demand``: forward scores, representations, embeddings)."""

    what: str
    provider: str = ""
    made_on_demand: bool = False

    def missing(self, run: Run, target: Target | None, options: Any) -> str | None:
        """Why the run cannot give the method this yet (with the command that would), or None."""
        return None

    def __str__(self) -> str:
        return self.what + (" (made when missing)" if self.made_on_demand else f" ({self.provider})" if self.provider
                            else "")


@dataclass(frozen=True)
class NeedsTarget(Need):
    def missing(self, run, target, options):
        return None if target is not None else "a target: give --target (a registry name or a data file)"


@dataclass(frozen=True)
class NeedsGradients(Need):
    """The pool's projected gradients of one feature (``adam``: LESS's; ``sgd``: plain; ``margin``: TRAK's),
    and the target's where the method needs a target."""

    feature: str = "adam"

    def missing(self, run, target, options):
        hint = "" if self.feature == "adam" else f" --train-gradient {self.feature}"
        command = f"influence project-grads --run {run.path}{hint}" + (f" --target {target.name}" if target else "")
        dims = stored_dims(run.store_path)
        if not dims:
            return f"the pool's gradients: run `{command}` first"
        wanted = getattr(options, "proj_dim", None)
        for dim in [wanted] if wanted is not None else dims:
            if dim in dims and gradient_dataset(TRAIN, self.feature) in stored_datasets(run.store_path, dim):
                return None
        where = f"of dimension {wanted}" if wanted is not None else "at any dimension"
        return f"the pool's {self.feature} gradients {where}: run `{command}`" + (
            f" --proj-dim {wanted}" if wanted is not None else "")


@dataclass(frozen=True)
class NeedsFile(Need):
    """A file of the run (``dynamics.parquet``, which the warm-up writes)."""

    name: str = ""

    def missing(self, run, target, options):
        return None if (run.path / self.name).is_file() else f"{run.path / self.name} ({self.provider})"


@dataclass(frozen=True)
class NeedsSubsets(Need):
    """Models trained on subsets of the pool, named by the method's ``subsets`` option."""

    def missing(self, run, target, options):
        name = getattr(options, "subsets", "fit")
        if name in stored_subsets(run.subsets_path):
            return None
        return f"subset models named '{name}': run `influence subsets train --run {run.path} --name {name}" + (
            f" --target {target.name}" if target else "") + " --k K` first"


@dataclass(frozen=True)
class NeedsSpace(Need):
    """The space named by the method's ``space`` option: the pool's gradients for ``grads`` (representations
    and embeddings are made when missing)."""

    def missing(self, run, target, options):
        space = getattr(options, "space", "grads") or "grads"
        return GRADIENTS.missing(run, None, options) if space.split(":")[0] == "grads" else None


@dataclass(frozen=True)
class NeedsOption(Need):
    """A model the method calls, named by one of its options (``rater``, ``reward_model``)."""

    option: str = ""

    def missing(self, run, target, options):
        return None if getattr(options, self.option, None) else f"{self.what}: give {self.provider}"


TARGET = NeedsTarget("a target", "--target")
RATER = NeedsOption("a rating model", "--rater (a local model, or an OpenAI-compatible URL with --rater-model)",
                    option="rater")
REWARD_MODEL = NeedsOption("a reward model", "--reward-model (a sequence-classification model with one output)",
                           option="reward_model")
GRADIENTS = NeedsGradients("the pool's Adam gradient features (LESS's)", "influence project-grads")
GRADIENT_NORMS = NeedsGradients("the gradient norms project-grads stores", "influence project-grads")
PLAIN_GRADIENTS = NeedsGradients("the pool's plain loss gradients", "influence project-grads --train-gradient sgd",
                                 feature="sgd")
MARGIN_GRADIENTS = NeedsGradients("the pool's and target's gradients of TRAK's margin",
                                  "influence project-grads --train-gradient margin", feature="margin")
DYNAMICS = NeedsFile("the warm-up's training dynamics", "written by influence warmup; --track-all for every example",
                     name="dynamics.parquet")
SUBSETS = NeedsSubsets("models trained on random subsets of the pool", "influence subsets train")
FORWARD_SCORES = Need("a forward pass per example and checkpoint", "influence forward-scores", made_on_demand=True)
REPRESENTATIONS = Need("last-token representations at the last checkpoint", made_on_demand=True)
SPACE = NeedsSpace("vectors in the --space (grads: the gradient stores; reps and embed:<model> are made)")


# --- the contract ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class NoOptions:
    """A method without options."""


class Method(ABC):
    """A scoring method (see the module docstring). Subclasses that set ``name`` are registered."""

    name: ClassVar[str]
    family: ClassVar[str]  # one of FAMILIES
    summary: ClassVar[str]
    meaning: ClassVar[str]
    needs: ClassVar[tuple[Need, ...]] = ()
    Options: ClassVar[type] = NoOptions

    def __init_subclass__(cls, register: bool = True, **kwargs):
        """Register a subclass that names itself (``register=False``: a method made for a test or a notebook, kept
        out of the registry)."""
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.scores is Method.scores and cls.attribution is Method.attribution:
            raise TypeError(f"method {cls.name!r}: define scores(), attribution() or both")
        if "name" in cls.__dict__ and register:
            if cls.name in _REGISTRY:
                raise TypeError(f"two scoring methods are named {cls.name!r}")
            missing = [a for a in ("family", "summary", "meaning") if not hasattr(cls, a)]
            if missing or cls.family not in FAMILIES:
                raise TypeError(f"method {cls.name!r}: declare {', '.join(missing) or 'a family of ' + str(FAMILIES)}")
            _REGISTRY[cls.name] = cls()

    @property
    def needs_target(self) -> bool:
        return TARGET in self.needs

    @property
    def has_attribution(self) -> bool:
        """Whether the method gives the effect of each pool example on each target example."""
        return type(self).attribution is not Method.attribution

    def scores(self, run: Run, target: Target | None, options: Any) -> Scores:
        """One score per pool example (default: the mean of :meth:`attribution` over the target's examples)."""
        attribution = self.attribution(run, target, options)  # defined: __init_subclass__ checks
        scores = attribution.scores()
        scores.method = self.name
        return scores

    def scores_many(self, run: Run, targets: list[Target | None], options: Any) -> list[Scores]:
        """:meth:`scores` for several targets (a method may share the work between them, as LESS does)."""
        return [self.scores(run, target, options) for target in targets]

    def attribution(self, run: Run, target: Target, options: Any) -> Attribution | None:
        """The effect of each pool example on each target example, for the LDS; None where the method has none."""
        return None

    # -- used by every caller: options and prerequisites, checked before any work -------------------------------
    def options(self, given: dict | Any | None = None, others_allowed: bool = False) -> Any:
        """The method's options from ``given`` (an ``Options`` instance, or a dict whose None values mean "not
        given"), checked; refuses an option the method does not take, naming its flag (with ``others_allowed``,
        takes those it has from options meant for several methods)."""
        if isinstance(given, self.Options):
            return check(given)
        given = {k: v for k, v in (given or {}).items() if v is not None}
        names = {f.name for f in dataclasses.fields(self.Options) if f.init}
        unknown = sorted(set(given) - names)
        if others_allowed:
            given = {k: v for k, v in given.items() if k in names}
        elif unknown:
            flags = ", ".join(option_flag(k) for k in unknown)
            own = sorted(option.flag for option in options_of(self.Options))
            raise InfluenceError(f"{flags} does not apply to --method {self.name}"
                                 + (f" (its options: {', '.join(own)})" if own else ""))
        return check(self.Options(**given))

    def attribution_missing(self, run: Run, target: Target, options: Any) -> str | None:
        """What the run lacks for :meth:`attribution` beyond what :attr:`needs` checks (with the command that would
        provide it), or None."""
        return None

    def require(self, run: Run, target: Target | None, options: Any, attribution: bool = False) -> None:
        """Refuse, before any work, what the run cannot give the method yet (for its :meth:`attribution` too, with
        ``attribution``), saying which command provides it."""
        missing = [why for need in self.needs if (why := need.missing(run, target, options))]
        if attribution and not missing and (why := self.attribution_missing(run, target, options)):
            missing.append(why)
        if missing:
            raise InfluenceError(f"--method {self.name} needs {'; '.join(missing)}")


FAMILIES = ("influence", "baseline", "difficulty", "quality", "counterfactual", "diversity")
FAMILY_TITLES = {
    "influence": "target-aware influence (how much an example helps the target)",
    "baseline": "LESS's baselines",
    "difficulty": "difficulty, uncertainty and noise (target-free)",
    "quality": "model-rated quality: an LLM or a reward model grades each example (target-free)",
    "counterfactual": "the counterfactual engine (models trained on subsets)",
    "diversity": "diversity and redundancy (target-free)",
}
_REGISTRY: dict[str, Method] = {}


def registry() -> dict[str, Method]:
    """Every registered method by name. The package's methods are registered by then: importing this module
    imports :mod:`influence.scoring` first, which imports every method module."""
    return _REGISTRY


def get_method(name: str) -> Method:
    """The method named ``name`` (in any case); an unknown name is refused with the closest names."""
    methods = registry()
    if name not in methods and name.lower() in methods:  # --method TRAK is trak
        name = name.lower()
    if name not in methods:
        close = difflib.get_close_matches(name.lower(), methods, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise InfluenceError(f"unknown method '{name}'{hint} (`influence methods` lists them: "
                             f"{', '.join(sorted(methods))})")
    return methods[name]


def option_flag(name: str) -> str:
    """The flag of a method option, as ``rank`` shows it."""
    for method in _REGISTRY.values():
        if any(f.name == name for f in dataclasses.fields(method.Options)):
            return flag_of(method.Options, name)
    return "--" + name.replace("_", "-")


def method_options() -> dict[str, tuple[Any, dict[str, Any]]]:
    """Every option some method takes: name -> (the click option's definition, {method: its default})."""
    found: dict[str, tuple[Any, dict[str, Any]]] = {}
    for name, method in sorted(registry().items()):
        for option in options_of(method.Options):
            key = option.path[-1]
            definition, defaults = found.setdefault(key, (option, {}))
            defaults[name] = option.default
    return found


class MethodChoice(click.ParamType):
    """A method of ``rank``, checked when parsed (``did you mean`` for a near miss); the registry is imported
    only then, so that ``--help`` stays fast."""

    name = "METHOD"

    def convert(self, value, param, ctx):
        try:
            return get_method(value).name
        except InfluenceError as err:
            self.fail(str(err), param, ctx)
