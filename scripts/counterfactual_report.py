"""The counterfactual engine end to end on SmolLM2-135M and a small real pool, sized to a time budget.

Pool and targets come from the vendored demo data (FLAN-CoT + P3 samples, Apache-2.0): ``--pool``
examples form the pool; ``--heldin`` other examples of the same files form an in-domain target
(subtask = source), and four MMLU subjects form ``mmlu_val`` (multiple choice: margins too). Steps:
warm-up, gradients (LESS's Adam feature, plain gradients for TracIn, TRAK's margin gradients),
forward scores, then the number of subset models is chosen from the measured cost of one model so
that everything fits ``--budget-minutes``: ``K`` fit models (memorization, influence estimates,
datamodels) and ``K_heldout`` held-out models (the LDS). Prints the settings, the LDS of every method
for both targets with bootstrap intervals, the memorization distribution, the top-10% agreement
between methods, and the wall time of each step.

    python scripts/counterfactual_report.py --budget-minutes 60 --out runs/counterfactual
    (resumable: rerun the same command after an interruption)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from influence.core.units import UnitSettings
from influence.data.formats import demo_pool_files, load_pool
from influence.evaluate.lds import evaluate_lds
from influence.gradients.collect import project_grads
from influence.models.loading import LoraSettings
from influence.scoring import get_method
from influence.scoring.forward import compute_forward_scores
from influence.selection.compare import overlap
from influence.selection.rank import rank
from influence.train.subsets import train_subsets
from influence.train.warmup import WarmupConfig, warmup

SUBJECTS = ["elementary_mathematics", "high_school_biology", "world_religions", "marketing"]
LDS_METHODS = ["less", "trak", "tracin", "datamodel", "fz_influence", "dsdm", "grand", "nll", "random"]


def write_data(out: Path, n_pool: int, n_heldin: int, seed: int) -> tuple[Path, Path]:
    """Pool and in-domain target files drawn from the vendored demo samples (disjoint)."""
    examples = load_pool(demo_pool_files())
    order = np.random.default_rng(seed).permutation(len(examples))
    pool, heldin = order[:n_pool], order[n_pool : n_pool + n_heldin]
    pool_file, target_file = out / "pool.jsonl", out / "heldin.jsonl"
    if not pool_file.exists():
        with open(pool_file, "w", encoding="utf-8") as fh:
            for i in sorted(pool):
                fh.write(json.dumps({"messages": examples[i].messages, "origin": examples[i].id}, ensure_ascii=False) + "\n")
        with open(target_file, "w", encoding="utf-8") as fh:
            for i in sorted(heldin):
                task = examples[i].source.split("_sample")[0]
                fh.write(json.dumps({"messages": examples[i].messages, "task": task, "origin": examples[i].id},
                                    ensure_ascii=False) + "\n")
    return pool_file, target_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/counterfactual")
    parser.add_argument("--budget-minutes", type=float, default=60)
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument("--heldin", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--heldout-share", type=float, default=0.3, help="share of the subset models held out for the LDS")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def step(name: str, since: float) -> None:
        timings[name] = round(time.time() - since, 1)
        print(f"== {name}: {timings[name]} s", flush=True)

    pool_file, heldin_file = write_data(out, args.pool, args.heldin, args.seed)
    run_dir = out / "run"
    config = WarmupConfig(model="smollm2-135m", train_files=[str(pool_file)], out=str(run_dir),
                          lora=LoraSettings(8, 32, 0.05, ["q_proj", "v_proj"]), fraction=args.alpha, epochs=args.epochs,
                          learning_rate=args.lr, warmup_ratio=0.0, batch_size=8, grad_accum=1,
                          max_length=args.max_length, seed=args.seed)
    targets = [("heldin", str(heldin_file), None), ("mmlu_val", "mmlu_val", SUBJECTS)]
    since = time.time()
    warmup(config, resume=(run_dir / "manifest.json").exists())
    step("warm-up", since)
    since = time.time()
    for _, target, tasks in targets:
        project_grads(run_dir, target, proj_dim=args.proj_dim, batch_size=8, chunk_size=32, target_tasks=tasks,
                      train_gradients=["adam", "sgd", "margin"])
    compute_forward_scores(run_dir, batch_size=8)
    step("gradients and forward scores", since)

    since = time.time()
    target_specs = [(target, tasks) for _, target, tasks in targets]
    estimate = train_subsets(run_dir, k=2, alpha=args.alpha, targets=target_specs, units=UnitSettings(dry_run=True),
                             say=print).estimate_seconds
    remaining = args.budget_minutes * 60 - (time.time() - started) - 120  # ranking, LDS and reporting
    total = max(8, int(remaining / max(estimate, 1e-3)))
    k_heldout = max(6, int(round(total * args.heldout_share)))
    k_fit = max(6, total - k_heldout)
    print(f"== one subset model ~{estimate:.1f} s here: K = {k_fit} fit + {k_heldout} held-out models", flush=True)
    train_subsets(run_dir, k=k_fit, alpha=args.alpha, targets=target_specs, name="fit", seed=args.seed, say=print)
    step(f"{k_fit} fit subset models", since)

    since = time.time()
    reports = {}
    for label, target, tasks in targets:
        report = evaluate_lds(run_dir, target, LDS_METHODS, k=k_heldout, target_tasks=tasks, say=print)
        reports[label] = report.table.set_index("method")
    step(f"{k_heldout} held-out subset models and the LDS", since)

    since = time.time()
    rankings = {}
    for label, target, tasks in targets:
        for method in LDS_METHODS:
            targeted = get_method(method).needs_target
            rankings[(label, method)] = rank(run_dir, target if targeted else None, method=method, fraction=0.1,
                                             out=run_dir / f"rank-{method}-{label}",
                                             **({"target_tasks": tasks} if targeted else {}))
    memorization = rank(run_dir, None, method="memorization", fraction=0.1, out=run_dir / "rank-memorization")
    step("rankings", since)

    print("\n## Settings")
    settings = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, fp32)", "pool": f"{args.pool} examples (FLAN-CoT + P3 demo)",
                "targets": f"heldin ({args.heldin} held-out demo examples, 2 subtasks), mmlu_val ({', '.join(SUBJECTS)})",
                "max_length": args.max_length, "lora": "r=8 alpha=32 dropout 0.05 q,v", "epochs": args.epochs,
                "lr": args.lr, "batch": 8, "alpha": args.alpha, "K_fit": k_fit, "K_heldout": k_heldout,
                "proj_dim": args.proj_dim, "unit_seconds_estimate": round(estimate, 1)}
    for key, value in settings.items():
        print(f"- {key}: {value}")
    for label, table in reports.items():
        print(f"\n## LDS on {label} (loss; Spearman per target example, mean; 95% bootstrap over {k_heldout} subsets)")
        print("| method | LDS | 95% interval | effects |\n|---|---|---|---|")
        for method, row in table.iterrows():
            print(f"| {method} | {row['lds']:+.3f} | [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}] | {row['effects']} |")
    scores = memorization["score"][memorization["finite"]]
    q = scores.quantile([0.1, 0.5, 0.9])
    print(f"\n## Memorization (accuracy; {k_fit} models, n_in median {memorization['n_in'].median():.0f})")
    print(f"mean {scores.mean():+.3f}, p10 {q[0.1]:+.3f}, median {q[0.5]:+.3f}, p90 {q[0.9]:+.3f}, "
          f"share > 0.05: {(scores > 0.05).mean():.2f}")
    for _, row in memorization.head(3).iterrows():
        print(f"  {row['score']:+.3f}  {row['id']}")
    for label, _, _ in targets:
        print(f"\n## Top-10% overlap between methods on {label}")
        names = LDS_METHODS
        matrix = pd.DataFrame([[overlap(rankings[(label, a)], rankings[(label, b)], 0.1) for b in names] for a in names],
                              index=names, columns=names)
        print(matrix.to_string(float_format=lambda v: f"{v:.2f}"))
    wall = time.time() - started
    print(f"\n## Wall time: {wall / 60:.1f} min ({json.dumps(timings)})")
    (out / "report.json").write_text(json.dumps({
        "settings": settings, "timings": timings, "wall_minutes": round(wall / 60, 1),
        "lds": {label: json.loads(table.reset_index().to_json(orient="records")) for label, table in reports.items()},
        "memorization": {"mean": float(scores.mean()), "median": float(q[0.5]), "p90": float(q[0.9])},
    }, indent=2))


if __name__ == "__main__":
    main()
