"""LIMA vs Alpaca-1k on SmolLM2-135M, scaled down: does "LIMA's 1k beats Alpaca" survive a grid?

Samples ``--n`` examples from each of ``../shared/data/pools/lima.json`` and ``alpaca_1k.json`` (research
licences: written under ``--out`` at run time, never vendored), retrains on each over the grid with
several seeds and evaluates instruction following by reference-answer NLL on Self-Instruct's 252
user-oriented instructions. Prints the per-setting table, each subset's best setting, the verdict and
the wall time; resumable (rerun the same command).

    python scripts/select_lima_vs_alpaca.py --data ../shared/data --out runs/lima-vs-alpaca
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _bench import add_grid_arguments, grid_from

from influence.evaluate.select import evaluate_select


def sample(source: Path, n: int, seed: int, target: Path) -> Path:
    records = json.loads(source.read_text(encoding="utf-8"))
    chosen = np.random.default_rng(seed).choice(len(records), size=n, replace=False)
    target.write_text("".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in sorted(chosen)), encoding="utf-8")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default="runs/lima-vs-alpaca")
    parser.add_argument("--n", type=int, default=32, help="examples drawn from each dataset")
    parser.add_argument("--max-length", type=int, default=256)
    add_grid_arguments(parser)
    args = parser.parse_args()
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pools = Path(args.data) / "pools"
    lima = sample(pools / "lima.json", args.n, 0, out / "lima.jsonl")
    alpaca = sample(pools / "alpaca_1k.json", args.n, 0, out / "alpaca.jsonl")
    grid = grid_from(args)
    settings = {"lora": {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
                "batch_size": 8, "max_length": args.max_length, "warmup_ratio": 0.03}
    report = evaluate_select([str(lima), str(alpaca)], model="smollm2-135m", instruction=True, grid=grid,
                             training=settings, out=out / "select", say=print)
    print("\n" + report.text())
    print(f"\nsettings: {args.n} LIMA vs {args.n} Alpaca examples, SmolLM2-135M, LoRA r=8 q/v, max length {args.max_length}, "
          f"grid {grid}; wall time {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
