"""MAGIC's single-model LDS and MGD on SmolLM2-135M: does the exact metagradient predict what dropping a few training
examples does, better than the approximations?

Set-up (as ``lds_peers.py``, which follows ``counterfactual_report.py``): SmolLM2-135M, LoRA r=8 on q/v, a pool of
``--pool`` vendored FLAN-CoT + P3 examples, max ``--max-length`` tokens, 3 epochs at lr 5e-4, batch 8, trained on the
whole pool, with LoRA dropout ``--dropout`` (default 0: with dropout the effect of dropping examples is far from
linear; see the README). The target is ``--heldin`` other demo examples.

(a) ``influence metagrad --per-target-example``, then ``evaluate lds --design drop --drop 0.01,0.05,0.1 --k K``:
per fraction K replays of the run with that fraction of the pool's weights at 0 (same order, seed and masks), and
the LDS of magic, ekfac, trak, tracin and less on them, with bootstrap intervals.
(b) ``rank --method mgd`` on the same run (budget ``--budget``, ``--mgd-steps`` steps): the held-out target loss of
each step's model, against the models trained on LESS's and on a random selection of the same size (one seed each,
the run's settings). The full ``evaluate select`` grid is not run here (hours on this CPU).

Prints the sizes and each stage's wall time; writes ``--doc`` (markdown). Resumable: rerun after a stop.

    python scripts/magic_evidence.py --out runs/magic --doc docs/magic.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from counterfactual_report import write_data  # noqa: E402 - the same pool and targets

METHODS = ["magic", "ekfac", "trak", "tracin", "less"]


def stage(name: str, timings: dict):
    """Print a stage's start and record its wall time."""
    class Timer:
        def __enter__(self):
            print(f"== {name}", flush=True)
            self.start = time.time()

        def __exit__(self, *exc):
            timings[name] = round(time.time() - self.start, 1)
            print(f"   {name}: {timings[name]} s", flush=True)

    return Timer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/magic")
    parser.add_argument("--doc", default=None)
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument("--heldin", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--k", type=int, default=8, help="replays per drop fraction")
    parser.add_argument("--drop", default="0.01,0.05,0.1")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--mgd-steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from influence.evaluate.lds import evaluate_lds
    from influence.gradients.collect import project_grads
    from influence.gradients.curvature import fit_curvature
    from influence.models.loading import LoraSettings
    from influence.scoring.base import Target, get_method
    from influence.train.metagrad import load_metagradients, metagrad
    from influence.train.run import Run
    from influence.train.subsets import train_masks
    from influence.train.warmup import WarmupConfig, warmup

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool_file, target_file = write_data(out, args.pool, args.heldin, args.seed)
    run_dir = out / "run"
    timings: dict[str, float] = {}
    print(f"sizes: pool {args.pool} (all trained), target {args.heldin} examples, max {args.max_length} tokens, "
          f"LoRA r=8 q/v dropout {args.dropout:g}, 3 epochs, batch 8; drops {args.drop} x {args.k} replays; "
          f"MGD budget {args.budget:g} x {args.mgd_steps} steps", flush=True)
    with stage("warm-up", timings):
        config = WarmupConfig(model="smollm2-135m", train_files=[str(pool_file)], out=str(run_dir),
                              lora=LoraSettings(8, 32, args.dropout, ["q_proj", "v_proj"]), fraction=1.0, epochs=3,
                              learning_rate=5e-4, warmup_ratio=0.0, batch_size=8, grad_accum=1,
                              max_length=args.max_length, seed=args.seed)
        warmup(config, resume=(run_dir / "manifest.json").exists(), progress=False)
    run = Run(run_dir)
    target = Target(str(target_file))
    with stage("metagrad (per target example)", timings):
        metagrad(run_dir, str(target_file), per_target_example=True, progress=False)
    meta = load_metagradients(run, str(target_file)).meta
    with stage("project-grads (less, trak, tracin)", timings):
        project_grads(run_dir, str(target_file), proj_dim=[1024], train_gradients=["adam", "sgd", "margin"],
                      progress=False)
    with stage("curvature (ekfac)", timings):
        fit_curvature(run_dir, progress=False)
    with stage("single-model LDS (drop replays)", timings):
        report = evaluate_lds(run_dir, str(target_file), METHODS, design="drop",
                              drop=[float(f) for f in args.drop.split(",")], k=args.k, progress=False,
                              say=lambda m: print("  ", m, flush=True))
    lds = report.table
    print(lds.to_string(index=False), flush=True)

    with stage("mgd", timings):
        mgd = get_method("mgd")
        scores = mgd.scores(run, target, mgd.options({"budget": args.budget, "steps": args.mgd_steps}))
    steps = scores.tables["iterations"]
    size = scores.details["budget"]
    with stage("less and random selections of the same size", timings):
        less = get_method("less").scores(run, target, get_method("less").options({"proj_dim": 1024}))
        ids = np.array(less.ids)
        order = np.argsort(-np.nan_to_num(less.score, nan=-np.inf), kind="stable")
        masks = np.zeros((2, len(ids)), dtype=bool)
        masks[0, order[:size]] = True
        masks[1, np.random.default_rng(args.seed).choice(len(ids), size, replace=False)] = True
        train_masks(run_dir, masks, ["less", "random"], [str(target_file)], name="magic-evidence-selections",
                    progress=False)
        from influence.scoring.counterfactual import open_subsets, target_columns

        store = open_subsets(run, "magic-evidence-selections")
        dataset, keep = target_columns(store, str(target_file), None)
        _, _, losses = store.outcomes(dataset, "loss")
        # the held-out split MGD chose its step on (the same seeded split)
        from influence.scoring.mgd import MetagradientDescent

        split = MetagradientDescent(run, target, mgd.options({"budget": args.budget, "steps": args.mgd_steps}),
                                    progress=False)
        held = {e.id for e in split.holdout}
        target_ids = store.target_labels(dataset)[0][keep]
        held_columns = [j for j, i in enumerate(target_ids) if i in held]
        baseline = {name: float(losses[n][keep][held_columns].mean()) for n, name in enumerate(["less", "random"])}
    print(steps.to_string(index=False), flush=True)
    print(baseline, flush=True)

    summary = {"sizes": vars(args), "timings": timings, "metagrad": {k: meta.get(k) for k in (
        "seconds", "training_seconds", "peak_rss_gb", "steps", "segments", "replay_relative_difference")},
        "lds": json.loads(lds.to_json(orient="records")), "mgd": json.loads(steps.to_json(orient="records")),
        "mgd_budget": size, "baselines_holdout_loss": baseline}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.doc:
        write_doc(Path(args.doc), summary)


def write_doc(path: Path, summary: dict) -> None:
    lds = pd.DataFrame(summary["lds"])
    table = lds.pivot(index="method", columns="drop", values="lds")
    low = lds.pivot(index="method", columns="drop", values="ci_low")
    high = lds.pivot(index="method", columns="drop", values="ci_high")
    rows = ["| method | " + " | ".join(f"LDS at {c:g} [95%]" for c in table.columns) + " |",
            "|---|" + "---|" * len(table.columns)]
    for method in table.index:
        rows.append(f"| {method} | " + " | ".join(
            f"{table.loc[method, c]:+.3f} [{low.loc[method, c]:+.2f}, {high.loc[method, c]:+.2f}]"
            for c in table.columns) + " |")
    mgd = pd.DataFrame(summary["mgd"])
    m = summary["metagrad"]
    text = [
        "# MAGIC and MGD on SmolLM2-135M (`scripts/magic_evidence.py`)", "",
        f"Sizes: {json.dumps(summary['sizes'])}.", "",
        "Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings"].items()) + ".", "",
        f"Metagradients: {m['steps']} optimizer steps, {m['seconds']} s against {m['training_seconds']} s of training "
        f"(all target examples), peak {m['peak_rss_gb']} GB, replay within {m['replay_relative_difference']:.1g} of "
        "the checkpoints.", "",
        "## (a) Single-model LDS (`evaluate lds --design drop`)", "", *rows, "",
        "## (b) MGD against LESS and random (held-out split of the target, one model each)", "",
        "| " + " | ".join(mgd.columns) + " |", "|" + "---|" * len(mgd.columns),
        *["| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |"
          for row in mgd.itertuples(index=False)], "",
        f"Selections of {summary['mgd_budget']} examples; held-out loss of LESS's: "
        f"{summary['baselines_holdout_loss']['less']:.4f}, random: {summary['baselines_holdout_loss']['random']:.4f}.",
        ""]
    path.write_text("\n".join(text))


if __name__ == "__main__":
    main()
