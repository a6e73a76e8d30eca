"""Selection you can trust: retrain on selected subsets across a hyperparameter grid and report a
verdict that survives it (Moon et al., 2024: the verdict of one training setup can flip with the
learning rate, batch size, epochs or scheduler).

For every subset (a method's top fraction, a random draw, the full pool, or a data file) and every
setting of the grid (learning rates x epochs x effective batch sizes x schedulers, each with several
seeds), a LoRA model is fine-tuned from the base model (the one training primitive, each model one
unit of work: resumable, shareable between workers, capped) and measured on **held-out** data of the
target (``mmlu_val``: MMLU test questions of the same subjects; ``bbh``: BBH test examples; or
``--eval`` files; ``self_instruct`` for instruction following): the mean NLL of the answer and, where
the data is multiple choice, the accuracy by answer log-likelihood. The held-out data is checked to
share no prompt with the examples the selection looked at (the target) or trained on.

Per subset and setting the metric's mean and standard deviation over seeds; per pair (subset,
baseline) the wins, ties and losses over the grid, a tie being a difference of means no larger than
the larger of the two standard deviations over seeds; the best setting of each subset (the "locally
optimal" setting the paper recommends reporting); and one verdict line per pair: the ordering holds in
every setting, in most, or flips.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ..config import setting, settings_from
from ..core.storage import check_writable
from ..core.units import UnitSettings
from ..data.formats import Example, examples_sha256, load_examples
from ..data.targets import TARGETS, load_heldout, load_target, target_name
from ..errors import InfluenceError
from ..models.loading import ModelLoading, check_model_name, load_base_model, model_fingerprint, parse_device
from ..scoring.base import Target, get_method, registry
from ..selection.modes import select
from ..selection.outputs import ranking_table
from ..selection.rank import score_targets
from ..selection.settings import fraction
from ..train.loop import Scheduler, TrainSettings
from ..train.run import Run
from ..train.subset_store import SubsetStore, stored_subsets
from ..train.subsets import EvalSet, Universe, train_settings, train_units
from .judge import make_judge, preference

METRICS = {"nll": False, "accuracy": True}  # name -> higher is better
BUILTIN = ("full", "random")


@dataclass
class Grid:
    """The hyperparameter grid every subset is retrained over (effective batch = batch size x
    accumulation steps; the micro batch stays the base settings' ``batch_size``)."""

    learning_rates: list[float] = setting(default_factory=lambda: [1e-4, 5e-4], help="Learning rates of the grid.",
                                          flag="grid-lr", list=True, nonempty=True, min=0, min_open=True)
    epochs: list[int] = setting(default_factory=lambda: [1, 3], help="Epoch counts of the grid.", flag="grid-epochs",
                                list=True, nonempty=True, min=1)
    batch_sizes: list[int] = setting(default_factory=lambda: [8, 32], flag="grid-batch", list=True, nonempty=True, min=1,
                                     help="Effective batch sizes of the grid (multiples of --batch-size, by gradient "
                                          "accumulation).")
    schedulers: list[Scheduler] = setting(default_factory=lambda: ["linear", "cosine"], flag="grid-scheduler",
                                          list=True, nonempty=True, help="Schedulers of the grid.")
    seeds: int = setting(2, "Seeds per setting.", min=1)

    def settings(self, base: TrainSettings) -> list[tuple[str, TrainSettings]]:
        """(label, settings) of every point of the grid."""
        points = []
        for lr, epochs, batch, scheduler in itertools.product(self.learning_rates, self.epochs, self.batch_sizes,
                                                             self.schedulers):
            if batch % base.batch_size:
                raise InfluenceError(f"--batch {batch} is not a multiple of the micro batch --batch-size {base.batch_size}")
            label = f"lr={lr:g} epochs={epochs} batch={batch} {scheduler}"
            points.append((label, replace(base, learning_rate=lr, epochs=epochs, grad_accum=batch // base.batch_size,
                                          scheduler=scheduler)))
        return points


@dataclass(kw_only=True)
class JudgeSettings:
    """A pairwise judge of the models' answers to Self-Instruct's instructions."""

    judge: str | None = setting(None, "Pairwise judge of the models' answers to Self-Instruct instructions: a local "
                                      "model (hub id, folder, smollm2-135m) or an OpenAI-compatible URL (with "
                                      "--judge-model; key from OPENAI_API_KEY). Needs --instruction.")
    model: str | None = setting(None, "The endpoint's model name, for --judge URL.", flag="judge-model")
    n: int = setting(32, "Instructions each model answers for the judge.", flag="judge-n", min=1)
    max_new_tokens: int = setting(128, "Tokens each answer may have.", flag="judge-max-new-tokens", min=1)


@dataclass(kw_only=True)
class SelectSettings:
    """What ``evaluate select`` retrains on, over which grid, evaluated on what (see the module docstring)."""

    specs: list[str] = setting(help="Comma-separated subsets to retrain on: full, random, a method of `rank` (its top "
                                    "--fraction), or data files (e.g. a selected.jsonl, or LIMA / Alpaca files).",
                               flag="subsets", list=True, nonempty=True)
    model: str | None = setting(None, "Base model when there is no run (subsets are then data files).")
    target: str | None = setting(None, "The selection's target: its held-out data is the evaluation (mmlu_val: MMLU "
                                       "test; bbh: BBH test examples), and evaluation may never share its prompts.")
    target_tasks: list[str] | None = setting(None, "Comma-separated subtasks of the target to keep.", list=True)
    eval_files: list[str] = setting(default_factory=list, flag="eval", multiple=True,
                                    path={"dir_okay": False, "exists": True},
                                    help="Held-out evaluation file (answer NLL; accuracy too where records have "
                                         "'choices'); repeatable.")
    instruction: bool = setting(False, "Also evaluate instruction following: reference-answer NLL on Self-Instruct's "
                                       "252 instructions.")
    fraction: float = fraction(help="Size of method and random subsets, as a fraction of the pool.")
    grid: Grid = setting(default_factory=Grid, prefix="")
    baselines: list[str] | None = setting(None, "Subsets to compare the others with [default: random and full where "
                                                "given, else the last subset].", list=True)
    metric: Literal["nll", "accuracy"] = setting("nll", "The verdict's metric on the first evaluation set (nll: lower "
                                                        "is better).")
    out: str | None = setting(None, "Output folder [default: RUN/select-<target>].", path={"file_okay": False})
    judge: JudgeSettings = setting(default_factory=JudgeSettings, prefix="")

    def extra_problems(self) -> list[str]:
        if self.judge.judge is not None and not self.instruction:
            return ["--judge compares answers to Self-Instruct's instructions: add --instruction"]
        return []


@dataclass
class Subset:
    name: str
    examples: list[Example] | None = None  # a fixed subset
    random_fraction: float | None = None  # a random draw of the pool per seed
    weights: np.ndarray | None = None  # the fixed subset's loss weights (gradmatch, craig): trained with, mean 1


def selection_weights(path: str | Path) -> np.ndarray | None:
    """The ``weight`` of every line of a ``selected.jsonl`` (written by ``rank`` for methods that weigh their
    selection), or None when the file has none."""
    if not str(path).endswith(".jsonl"):
        return None
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records or not all({"weight", "rank", "score"} <= set(r) for r in records):  # only rank's own output
        return None
    values = np.array([r["weight"] for r in records], dtype=np.float64)
    if not (values > 0).all():
        raise InfluenceError(f"--subsets {path}: {int((values <= 0).sum())} selected example(s) have weight 0; select "
                             "no more than the method's --budget (its weighted selection)")
    return values


@dataclass
class SelectReport:
    results: pd.DataFrame  # one row per trained model and evaluation set
    summary: pd.DataFrame  # mean / sd over seeds per subset, setting and evaluation set
    wins: pd.DataFrame  # win / tie / loss of each subset against each baseline
    verdicts: list[str]
    best: pd.DataFrame  # each subset's best setting
    folder: Path
    notes: list[str] = field(default_factory=list)
    metric: str = "nll"

    def text(self) -> str:
        """The per-setting tables of every evaluation set, each subset's best setting and the verdicts."""
        parts = []
        for evaluation, table in self.summary.groupby("eval", sort=False):
            metrics = [m for m in METRICS if table[f"{m}_mean"].notna().any()]
            columns = ["subset", "setting", *(f"{m}_{k}" for m in metrics for k in ("mean", "sd")), "seeds"]
            parts.append(f"== {evaluation}\n" + table[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        best = ["subset", "setting", f"{self.metric}_mean", f"{self.metric}_sd", "seeds"]
        parts.append("best setting per subset:\n" + self.best[best].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return "\n\n".join(parts + ["\n".join(self.verdicts)])


def resolve_subsets(specs: list[str], run: Run | None, target: str | None, target_tasks: list[str] | None,
                    fraction: float, method_options: dict | None = None) -> list[Subset]:
    """Each ``--subsets`` entry: ``full``, ``random``, a ``rank`` method (its top ``fraction`` for the
    target) or a data file (e.g. a ``selected.jsonl``)."""
    subsets = []
    for spec in specs:
        if spec in BUILTIN or spec in registry():
            if run is None:
                raise InfluenceError(f"--subsets {spec} needs --run (it is drawn from the run's pool)")
            pool = run.pool()
            if spec == "full":
                subsets.append(Subset("full", pool))
            elif spec == "random":
                subsets.append(Subset("random", random_fraction=fraction))
            else:
                method = get_method(spec)
                if method.needs_target and target is None:
                    raise InfluenceError(f"--subsets {spec} needs --target")
                wanted = Target.of(target, target_tasks) if method.needs_target else None
                given = dict(method_options or {})
                if "budget" in {f.name for f in fields(method.Options)}:  # a selecting method selects --fraction
                    if given.get("budget") not in (None, fraction):
                        raise InfluenceError(f"--subsets {spec}: its --budget {given['budget']:g} differs from "
                                             f"--fraction {fraction:g}; leave --budget out (it follows --fraction)")
                    given["budget"] = fraction
                scores = score_targets(run, method, [wanted], method.options(given, others_allowed=True))[0]
                table = select(ranking_table(scores, pool), "top", fraction)
                weights = table["weight"].to_numpy(dtype=np.float64) if "weight" in table else None
                subsets.append(Subset(spec, [pool[int(i)] for i in table["pool_index"]], weights=weights))
        elif Path(spec).is_file():
            subsets.append(Subset(Path(spec).stem, load_examples(spec), weights=selection_weights(spec)))
        else:
            raise InfluenceError(f"--subsets {spec}: neither full, random, a method of `rank`, nor a data file")
    names = [s.name for s in subsets]
    if len(set(names)) < len(names):
        raise InfluenceError(f"--subsets: two subsets are named alike ({', '.join(names)}); rename a file")
    return subsets


def _prompt(example: Example) -> str:
    return " ".join(m["content"].strip() for m in example.messages if m["role"] != "assistant")


def check_held_out(eval_sets: list[EvalSet], looked_at: dict[str, list[Example]]) -> None:
    """Refuse evaluation data that shares a prompt with what the selection looked at or trains on."""
    for label, examples in looked_at.items():
        prompts = {_prompt(e): e for e in examples}
        for evaluation in eval_sets:
            for example in evaluation.examples:
                if _prompt(example) in prompts:
                    seen = prompts[_prompt(example)]
                    raise InfluenceError(
                        f"held-out example {example.id} ({evaluation.target}) has the same prompt as {seen.id} in "
                        f"{label}: held-out data must be new to the selection and to the models, or the comparison "
                        "flatters what saw it; choose other --eval data")


def _eval_sets(target: str | None, target_tasks: list[str] | None, eval_files: list[str],
               instruction: bool) -> list[EvalSet]:
    sets = []
    if target in TARGETS:
        sets.append(EvalSet.of(f"{target}:heldout", load_heldout(target, target_tasks), target_tasks))
    for path in eval_files:
        sets.append(EvalSet.of(path, load_target(path)))
    if instruction:
        sets.append(EvalSet.of("self_instruct", load_heldout("self_instruct")))
    if not sets:
        raise InfluenceError(f"no held-out data for target '{target}': give --eval FILE (built-in held-out data exists "
                             "for mmlu_val and bbh; --instruction adds Self-Instruct's instructions)")
    return sets


def evaluate_select(specs: list[str] | None = None, settings: SelectSettings | None = None, *,
                    run_dir: str | Path | None = None, loading: ModelLoading | None = None,
                    training: dict | TrainSettings | None = None, method_options: dict | None = None,
                    units: UnitSettings | None = None, device: str | None = None, progress: bool = True,
                    say: Callable[[str], None] | None = None, **values) -> SelectReport | None:
    """Retrain on every subset of ``specs`` over the grid and report how each compares with the
    ``baselines`` (default: ``random`` and ``full`` where given) on held-out data (module docstring).
    ``settings`` (a :class:`SelectSettings`) and ``values`` (its fields by keyword; ``grid`` a :class:`Grid`)
    say what; ``run_dir`` gives the model, pool and training settings (or ``model`` a base model alone, with
    ``loading``); ``training`` overrides the training settings; ``method_options`` go to the methods of
    ``specs``; ``units`` how the models are run. With a judge (a model, or an OpenAI-compatible URL with its
    model name; needs ``instruction``), every model also answers the first ``n`` Self-Instruct instructions
    and the judge compares each subset's answers with each baseline's, per setting and seed."""
    say = say or (lambda message: None)
    if specs is not None:
        values["specs"] = list(specs)
    if isinstance(values.get("judge"), str):  # a judge by its name alone
        values["judge"] = JudgeSettings(judge=values["judge"])
    settings = settings_from(SelectSettings, settings, where="evaluate select", **values)
    units = units or UnitSettings()
    grid, target, target_tasks, judge = settings.grid, settings.target, settings.target_tasks, settings.judge
    if (run_dir is None) == (settings.model is None):
        raise InfluenceError("give --run (model, pool and training settings of a run) or --model, not both")
    run = Run(run_dir) if run_dir is not None else None
    if run is not None:
        run.check_data_unchanged()
    else:
        check_model_name(settings.model)
    base = train_settings(run, training) if run is not None else _standalone_settings(training)
    points = grid.settings(base)
    eval_sets = _eval_sets(target, target_tasks, list(settings.eval_files), settings.instruction)
    generate = None
    if judge.judge is not None:
        generate = {"dataset": eval_sets[-1].dataset, "n": judge.n, "max_new_tokens": judge.max_new_tokens}
    subsets = resolve_subsets(settings.specs, run, target, target_tasks, settings.fraction, method_options)
    if len(subsets) < 2:
        raise InfluenceError("--subsets needs at least two subsets to compare")
    baselines = settings.baselines or [s.name for s in subsets if s.name in BUILTIN] or [subsets[-1].name]
    unknown = sorted(set(baselines) - {s.name for s in subsets})
    if unknown:
        raise InfluenceError(f"--baselines {', '.join(unknown)} are not among --subsets")
    looked_at = {"the selection's target": load_target(target, target_tasks)} if target is not None else {}
    pool = run.pool() if run is not None else []
    universe_examples = _universe(pool, subsets)
    looked_at["the training subsets"] = universe_examples
    check_held_out(eval_sets, looked_at)
    masks, names, weights = _masks(universe_examples, pool, subsets, grid.seeds)
    folder = Path(settings.out) if settings.out is not None else (run.path if run is not None else Path(".")) / \
        f"select-{target_name(target) if target else 'eval'}"
    check_writable(folder)
    universe = Universe(folder / "models.zarr", run.model_name if run is not None else settings.model,
                        universe_examples, run.manifest.get("model_fingerprint") if run is not None else None,
                        run.model_loading if run is not None else loading)
    # Everything above is checked before the model is loaded.
    base_model, tokenizer = load_base_model(universe.model, universe.loading, parse_device(device))
    loaded = (base_model, tokenizer, model_fingerprint(universe.model, base_model))
    stores = []
    started_hours = 0.0
    estimates = []
    speed = None  # measured once, scaled to each setting
    for index, (label, point) in enumerate(points):
        name = f"setting-{index:02d}-{hashlib.sha256(json.dumps(asdict(point), sort_keys=True).encode()).hexdigest()[:8]}"
        estimate = train_units(universe, name, {"kind": "explicit", "names": names, "seed": 0, "setting": label},
                               masks, list(range(len(masks))), eval_sets, point, weights=weights, measure_pool=False,
                               running=replace(units, dry_run=True), device=device, progress=False, loaded=loaded,
                               generate=generate, speed=speed)
        speed = estimate.speed
        estimates.append(estimate.estimate_seconds * estimate.todo)
        stores.append((label, point, name))
    say(f"{len(points)} settings x {len(subsets)} subsets x {grid.seeds} seeds = {len(points) * len(masks)} fine-tunes "
        f"({sum(e > 0 for e in estimates)} settings with models left to train), ~{sum(estimates) / 3600:.2f} h for "
        "one process (measured on this machine)")
    if units.dry_run:
        return None
    notes = []
    for label, point, name in stores:
        left = None if units.max_hours is None else units.max_hours - started_hours
        if left is not None and left <= 0:
            notes.append(f"--max-hours reached before {label}; rerun to continue")
            break
        report = train_units(universe, name, {"kind": "explicit", "names": names, "seed": 0, "setting": label}, masks,
                             list(range(len(masks))), eval_sets, point, weights=weights, measure_pool=False,
                             running=replace(units, max_hours=left), device=device, progress=progress, say=say,
                             loaded=loaded, generate=generate, speed=speed)
        started_hours += sum(report.run.seconds) / 3600 if report.run else 0.0
        notes += report.notes
    results = _results(universe.root, stores, names, eval_sets)
    report = _report(results, [s.name for s in subsets], baselines, settings.metric, eval_sets, folder, notes, grid,
                     base)
    if judge.judge is not None:
        _judge(report, make_judge(judge.judge, judge.model, device), universe.root, stores, names, eval_sets[-1],
               generate, baselines)
    return report


def _judge(report: SelectReport, judge, root: Path, stores: list, names: list[str], instructions: EvalSet,
           generate: dict, baselines: list[str]) -> None:
    """Judge each subset's answers against each baseline's, per setting and seed; adds ``judge.csv``,
    a ``judge`` entry in ``report.json`` and one verdict line per pair."""
    prompts = [" ".join(m["content"] for m in e.messages if m["role"] == "user") for e in instructions.examples]
    rows = []
    unit_of = {name: unit for unit, name in enumerate(names)}
    subsets = list(dict.fromkeys(name.rsplit(" #", 1)[0] for name in names))
    for label, _, name in stores:
        store = SubsetStore.open(root, name)
        done = set(store.done_units())
        for subset, baseline in comparison_pairs(subsets, baselines):
            seeds = sorted({int(n.rsplit(" #", 1)[1]) for n in names if n.startswith(subset + " #")})
            for seed in seeds:
                mine, theirs = unit_of[f"{subset} #{seed}"], unit_of[f"{baseline} #{seed}"]
                if mine not in done or theirs not in done:
                    continue
                ours, others = store.texts(mine, generate["dataset"]), store.texts(theirs, generate["dataset"])
                wins = [preference(judge, p, a, b) for p, a, b in zip(prompts, ours, others)]
                rows.append({"subset": subset, "baseline": baseline, "setting": label, "seed": seed,
                             "win_rate": float(np.mean(wins)), "n": len(wins)})
    table = pd.DataFrame(rows)
    if table.empty:
        return
    table.to_csv(report.folder / "judge.csv", index=False)
    for (subset, baseline), group in table.groupby(["subset", "baseline"], sort=False):
        per_setting = group.groupby("setting")["win_rate"].mean()
        report.verdicts.append(f"judge: {subset}'s answers preferred to {baseline}'s {group['win_rate'].mean():.0%} of the "
                               f"time (> 50% in {int((per_setting > 0.5).sum())} of {len(per_setting)} settings)")
    saved = json.loads((report.folder / "report.json").read_text())
    saved["verdicts"] = report.verdicts
    saved["judge"] = json.loads(table.to_json(orient="records"))
    (report.folder / "report.json").write_text(json.dumps(saved, indent=2))


def _standalone_settings(settings: dict | TrainSettings | None) -> TrainSettings:
    from ..config import from_dict

    if isinstance(settings, TrainSettings):
        return settings
    return from_dict(TrainSettings, settings or {}, where="training settings")


def _universe(pool: list[Example], subsets: list[Subset]) -> list[Example]:
    """The pool, then every example of a file subset that is not in the pool (by content)."""
    universe = list(pool)
    known = {examples_sha256([_content(e)]) for e in pool}
    for subset in subsets:
        for example in subset.examples or []:
            key = examples_sha256([_content(example)])
            if key not in known:
                known.add(key)
                universe.append(example)
    return universe


def _content(example: Example) -> Example:
    """The example with a neutral id, so that equal conversations from two files compare equal."""
    return replace(example, id="")


def _masks(universe: list[Example], pool: list[Example], subsets: list[Subset], seeds: int
           ) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """One mask per (subset, seed) over the universe (a random subset is drawn from the pool per seed), and the loss
    weights of each when a subset has its own (scaled to mean 1 over the subset, so that the loss keeps its scale and
    only the balance between the examples changes; 1 for the others), else None."""
    index = {examples_sha256([_content(e)]): i for i, e in enumerate(universe)}
    masks, names, weights = [], [], []
    for subset in subsets:
        for seed in range(seeds):
            mask, weight = np.zeros(len(universe), dtype=bool), np.zeros(len(universe))
            if subset.random_fraction is not None:
                count = max(1, int(subset.random_fraction * len(pool)))
                mask[np.random.default_rng([seed, 7]).choice(len(pool), size=count, replace=False)] = True
                weight[mask] = 1
            else:
                rows = [index[examples_sha256([_content(e)])] for e in subset.examples]
                mask[rows] = True
                weight[rows] = 1 if subset.weights is None else subset.weights / subset.weights.mean()
            masks.append(mask)
            weights.append(weight)
            names.append(f"{subset.name} #{seed}")
    weighted = any(s.weights is not None for s in subsets)
    return np.array(masks), names, np.array(weights) if weighted else None


def _results(root: Path, stores: list, names: list[str], eval_sets: list[EvalSet]) -> pd.DataFrame:
    rows = []
    trained = set(stored_subsets(root))
    for label, point, name in stores:
        if name not in trained:
            continue
        store = SubsetStore.open(root, name)
        for evaluation in eval_sets:
            units, _, loss = store.outcomes(evaluation.dataset, "loss")
            _, _, correct = store.outcomes(evaluation.dataset, "choice_correct", units)
            for unit, unit_loss, unit_correct in zip(units, loss, correct):
                subset, seed = names[unit].rsplit(" #", 1)
                rows.append({"subset": subset, "seed": int(seed), "setting": label, "lr": point.learning_rate,
                             "epochs": point.epochs, "batch": point.batch_size * point.grad_accum,
                             "scheduler": point.scheduler, "eval": evaluation.target,
                             "nll": float(np.mean(unit_loss)),
                             "accuracy": float(np.nanmean(unit_correct)) if np.isfinite(unit_correct).any() else np.nan})
    return pd.DataFrame(rows)


def comparison_pairs(subsets: list[str], baselines: list[str]) -> list[tuple[str, str]]:
    """(subset, baseline) for every subset against every baseline, each unordered pair once."""
    pairs: list[tuple[str, str]] = []
    for baseline in baselines:
        for subset in subsets:
            if subset != baseline and (baseline, subset) not in pairs:
                pairs.append((subset, baseline))
    return pairs


def win_tie_loss(summary: pd.DataFrame, subset: str, baseline: str, metric: str) -> dict:
    """Over the settings where both were trained: wins, ties, losses of ``subset`` against ``baseline``
    (a tie: the difference of means is no larger than the larger standard deviation over seeds)."""
    higher = METRICS[metric]
    a = summary[summary["subset"] == subset].set_index("setting")
    b = summary[summary["subset"] == baseline].set_index("setting")
    counts = {"wins": 0, "ties": 0, "losses": 0}
    for point in a.index.intersection(b.index):
        difference = a.loc[point, f"{metric}_mean"] - b.loc[point, f"{metric}_mean"]
        if not higher:
            difference = -difference
        spread = max(np.nan_to_num(a.loc[point, f"{metric}_sd"]), np.nan_to_num(b.loc[point, f"{metric}_sd"]))
        if abs(difference) <= spread:
            counts["ties"] += 1
        elif difference > 0:
            counts["wins"] += 1
        else:
            counts["losses"] += 1
    return counts


def verdict(subset: str, baseline: str, counts: dict) -> str:
    """One line: does the ordering hold in every setting, in most, or flip?"""
    wins, ties, losses = counts["wins"], counts["ties"], counts["losses"]
    total = wins + ties + losses
    tally = f"({subset} against {baseline}: {wins} wins, {ties} ties, {losses} losses over {total} settings)"
    if total == 0:
        return f"{subset} vs {baseline}: no setting trained for both"
    if wins == total:
        return f"{subset} beats {baseline} in every setting {tally}"
    if losses == total:
        return f"{baseline} beats {subset} in every setting {tally}"
    if ties == total:
        return f"{subset} and {baseline} tie in every setting (within the seed spread) {tally}"
    if wins and losses:
        return f"the ordering of {subset} and {baseline} flips with the setting {tally}"
    better, worse = (subset, baseline) if wins else (baseline, subset)
    return f"{better} beats {worse} in most settings, never the other way {tally}"


def _report(results: pd.DataFrame, subsets: list[str], baselines: list[str], metric: str, eval_sets: list[EvalSet],
            folder: Path, notes: list[str], grid: Grid, base: TrainSettings) -> SelectReport:
    folder.mkdir(parents=True, exist_ok=True)
    if results.empty:
        raise InfluenceError(f"{folder}: no model finished yet; rerun to train them")
    keys = ["subset", "setting", "lr", "epochs", "batch", "scheduler", "eval"]
    summary = results.groupby(keys, sort=False).agg(nll_mean=("nll", "mean"), nll_sd=("nll", "std"),
                                                    accuracy_mean=("accuracy", "mean"), accuracy_sd=("accuracy", "std"),
                                                    seeds=("seed", "count")).reset_index()
    primary = eval_sets[0].target
    main = summary[summary["eval"] == primary]
    wins, verdicts = [], []
    for subset, baseline in comparison_pairs(subsets, baselines):
        counts = win_tie_loss(main, subset, baseline, metric)
        wins.append({"subset": subset, "baseline": baseline, **counts})
        verdicts.append(verdict(subset, baseline, counts))
    higher = METRICS[metric]
    best = main.loc[main.groupby("subset", sort=False)[f"{metric}_mean"].idxmax() if higher
                    else main.groupby("subset", sort=False)[f"{metric}_mean"].idxmin()]
    report = SelectReport(results, summary, pd.DataFrame(wins), verdicts, best.reset_index(drop=True), folder, notes,
                          metric)
    results.to_csv(folder / "results.csv", index=False)
    summary.to_csv(folder / "summary.csv", index=False)
    report.wins.to_csv(folder / "wins.csv", index=False)
    (folder / "report.json").write_text(json.dumps({
        "metric": metric, "higher_is_better": higher, "primary_eval": primary,
        "eval_sets": [{"name": e.target, "n_examples": len(e.examples)} for e in eval_sets],
        "grid": asdict(grid), "base_settings": asdict(base), "verdicts": verdicts,
        "wins": json.loads(report.wins.to_json(orient="records")),
        "best_setting": json.loads(report.best.to_json(orient="records")),
        "summary": json.loads(summary.to_json(orient="records")), "notes": notes,
        "tie_rule": "a difference of means no larger than the larger standard deviation over seeds",
    }, indent=2))
    _plot(main, metric, folder / "report.png")
    return report


def _plot(summary: pd.DataFrame, metric: str, path: Path) -> None:
    """Each subset's metric per setting, with the seed spread as error bars (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional: the tables say the same
        return
    settings = list(dict.fromkeys(summary["setting"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(settings) + 3), 4))
    subsets = list(dict.fromkeys(summary["subset"]))
    width = 0.8 / max(1, len(subsets))
    for j, subset in enumerate(subsets):
        rows = summary[summary["subset"] == subset].set_index("setting").reindex(settings)
        x = np.arange(len(settings)) + j * width
        ax.errorbar(x, rows[f"{metric}_mean"], yerr=rows[f"{metric}_sd"].fillna(0), fmt="o", capsize=3, label=subset)
    ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2)
    ax.set_xticklabels(settings, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"held-out {metric} ({'higher' if METRICS[metric] else 'lower'} is better)")
    ax.set_title(f"{summary['eval'].iloc[0]}: {metric} per setting (mean and sd over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
