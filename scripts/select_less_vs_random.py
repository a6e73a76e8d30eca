"""LESS top-5% vs random-5% vs the full pool on FLAN-CoT + P3 for mmlu_val, across a grid, on SmolLM2-135M.

Warms up and projects gradients as ``make demo`` does (the vendored 194-example FLAN-CoT + P3 pool, four
MMLU subjects), then retrains on LESS's top 5%, a random 5% and the whole pool over the grid with
several seeds and evaluates on held-out MMLU **test** questions of the same subjects (answer-letter
NLL and accuracy). Prints the per-setting table, the best settings, the verdicts and the wall time;
resumable (rerun the same command).

``--subsets mgd,less,random`` puts metagradient descent (``rank --method mgd`` with ``--budget`` equal to
``--fraction`` and ``--mgd-steps`` steps, fitted on the mmlu_val questions, chosen on half of them) through the same
grid (issue #27's part 6b); ``full`` is left out there because it dominates the wall time.

    python scripts/select_less_vs_random.py --out runs/less-vs-random
    python scripts/select_less_vs_random.py --out runs/less-vs-random --subsets mgd,less,random
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _bench import add_grid_arguments, grid_from

from influence.data.formats import demo_pool_files
from influence.evaluate.select import evaluate_select
from influence.gradients.collect import project_grads
from influence.models.loading import LoraSettings
from influence.train.warmup import WarmupConfig, warmup

SUBJECTS = ["elementary_mathematics", "high_school_biology", "world_religions", "marketing"]


def example_run(out: str | Path, train_gradients: tuple[str, ...] = ("adam",)) -> Path:
    """The example's run in ``out/run`` (made or resumed): the warm-up and the gradients ``make demo`` makes."""
    run = Path(out) / "run"
    config = WarmupConfig(model="smollm2-135m", train_files=demo_pool_files(), out=str(run),
                          lora=LoraSettings(8, 32, 0.05, ["q_proj", "v_proj"]), fraction=0.25, epochs=2,
                          learning_rate=2e-4, warmup_ratio=0.0, batch_size=8, grad_accum=1, max_length=256)
    warmup(config, resume=(run / "manifest.json").exists())
    project_grads(run, "mmlu_val", proj_dim=2048, batch_size=8, chunk_size=32, target_tasks=SUBJECTS,
                  train_gradients=list(train_gradients))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/less-vs-random")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--subsets", default="less,random,full", help="comma-separated, as evaluate select's")
    parser.add_argument("--mgd-steps", type=int, default=4, help="metagradient steps, where --subsets has mgd")
    add_grid_arguments(parser)
    args = parser.parse_args()
    started = time.time()
    run = example_run(args.out)
    grid = grid_from(args)
    subsets = args.subsets.split(",")
    out = None if args.subsets == "less,random,full" else str(Path(args.out) / ("select-" + "-".join(subsets)))
    report = evaluate_select(subsets, run_dir=run, target="mmlu_val", target_tasks=SUBJECTS, fraction=args.fraction,
                             grid=grid, method_options={"budget": args.fraction, "steps": args.mgd_steps}, say=print,
                             out=out, baselines=[b for b in ("less", "random") if b in subsets and "mgd" in subsets] or None)
    print("\n" + report.text())
    print(f"\nsettings: pool 194 (FLAN-CoT + P3 demo), mmlu_val {', '.join(SUBJECTS)}, held-out MMLU test (20 per subject), "
          f"SmolLM2-135M, LoRA r=8 q/v, max length 256, grid {grid}; wall time {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
