"""Head to head: the LDS of our attribution methods and of the peers' own code, on the same held-out subset models.

SmolLM2-135M with LoRA as in ``counterfactual_report.py`` (r=8 on q/v, 3 epochs at lr 5e-4, pool of 64 vendored
FLAN-CoT + P3 examples, max 128 tokens), except that the warm-up trains on the whole pool: its last checkpoint is
the attributed model, as in Kronfluence's and Bergson's LDS set-ups. Every method writes its attribution matrix (pool
x target examples, higher = helps the target example more) in a process of its own, which measures its wall time
and peak memory (resident set); ``evaluate lds --attribution`` then scores all of them on the same ``--k-heldout``
subset models (random halves, other seeds), with bootstrap intervals, for both targets (``heldin``: 16 other demo
examples; ``mmlu_val``: four MMLU subjects).

Ours: ekfac, kfac, identity (``influence curvature`` on the pool, then exact pool gradients), less, trak, tracin
(stored projected gradients), datamodel and fz_influence (``--k-fit`` subset models). Peers: Kronfluence's EK-FAC
(its own ``Analyzer`` through :func:`influence.evaluate.peers.kronfluence_scores`, its defaults: sampled labels,
the loss summed over tokens, damping 1e-8; and with its damping heuristic), and Bergson where ``--bergson-python`` names a Python that runs ``--bergson-script``.

    python scripts/lds_peers.py --out runs/lds_peers --doc docs/lds_peers.md   (resumable: rerun after a stop)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from counterfactual_report import SUBJECTS, write_data  # noqa: E402 - the same pool and targets

OURS = ["ekfac", "kfac", "identity", "less", "trak", "tracin", "datamodel", "fz_influence"]


def targets_of(out: Path) -> list[tuple[str, str, list[str] | None]]:
    return [("heldin", str(out / "heldin.jsonl"), None), ("mmlu_val", "mmlu_val", SUBJECTS)]


def save(path: Path, matrix: np.ndarray, pool_ids: list[str], target_ids: list[str]) -> None:
    np.savez(path, matrix=np.asarray(matrix, dtype=np.float64), pool_ids=np.asarray(pool_ids, dtype=str),
             target_ids=np.asarray(target_ids, dtype=str))


def our_method(run_dir: str, method: str, out: str) -> None:
    """Our method's attribution for both targets (the curvature fitted first, and timed with it)."""
    from influence.gradients.curvature import fit_curvature
    from influence.scoring.base import Target, get_method
    from influence.train.run import Run

    if method in ("ekfac", "kfac"):
        fit_curvature(run_dir, progress=False)
    run = Run(run_dir)
    chosen = get_method(method)
    for label, target, tasks in targets_of(Path(out).parent.parent):
        effects = chosen.attribution(run, Target(target, tuple(tasks) if tasks else None), chosen.options())
        save(Path(out) / f"{label}.npz", effects.matrix, effects.pool_ids, effects.target_ids)


def kronfluence(run_dir: str, method: str, out: str) -> None:
    """Kronfluence's EK-FAC fitted on the pool with its own defaults (``kronfluence_ekfac``: sampled labels, damping
    1e-8) or its damping heuristic (``kronfluence_ekfac_heuristic``), the loss summed over response tokens as its
    language-model examples do."""
    from influence.data.targets import load_target
    from influence.evaluate.peers import kronfluence_scores
    from influence.train.run import Run

    run = Run(run_dir)
    pool = run.pool()
    targets = {label: load_target(target, tasks) for label, target, tasks in targets_of(Path(out).parent.parent)}
    scores = kronfluence_scores(run, pool, pool, targets, Path(out) / "work", "ekfac",
                                damping=None if method.endswith("heuristic") else 1e-8)
    for label, examples in targets.items():
        save(Path(out) / f"{label}.npz", scores[label], [e.id for e in pool], [e.id for e in examples])


def bergson(run_dir: str, method: str, out: str, python: str, script: str) -> None:
    """Bergson's own code, in its own environment: the model and adapter saved as Hugging Face folders, the
    examples tokenized here."""
    from influence.data.targets import load_target
    from influence.data.templates import encode_example
    from influence.train.run import Run

    run = Run(run_dir)
    base, tokenizer, _ = run.load_base_model()
    folder = Path(out)
    if not (folder / "model" / "config.json").exists():
        base.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
    adapter = run.checkpoints()[-1].path
    pool = run.pool()

    def write(path: Path, examples) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            for e in examples:
                encoded = encode_example(e, tokenizer, run.max_length)
                fh.write(json.dumps({"input_ids": encoded.input_ids, "labels": encoded.labels}) + "\n")

    write(folder / "train.jsonl", pool)
    for label, target, tasks in targets_of(folder.parent.parent):
        examples = load_target(target, tasks)
        write(folder / f"query-{label}.jsonl", examples)
        subprocess.run([python, script, "--model", str(folder / "model"), "--adapter", str(adapter), "--train",
                        str(folder / "train.jsonl"), "--query", str(folder / f"query-{label}.jsonl"), "--method",
                        method.removeprefix("bergson_"), "--out", str(folder / f"raw-{label}.npz")], check=True)
        raw = np.load(folder / f"raw-{label}.npz")
        save(folder / f"{label}.npz", raw["matrix"], [e.id for e in pool], [e.id for e in examples])


def measured(function, *args) -> None:
    """Run ``function`` here (a child process) and record its wall time and peak resident memory (the kernel's
    high-water mark of this process image, VmHWM: ``getrusage``'s maxrss would carry the parent's over)."""
    import torch

    torch.set_num_threads(2)
    started = time.time()
    function(*args)
    status = Path("/proc/self/status").read_text()
    own_kb = int(status.split("VmHWM:")[1].split()[0])
    # Bergson runs in a process of its own started from here: its maxrss (at least this process's size when started)
    peak_mb = max(own_kb, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    (Path(args[2]) / "cost.json").write_text(json.dumps({"seconds": round(time.time() - started, 1),
                                                         "peak_mb": round(peak_mb)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/lds_peers")
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument("--heldin", type=int, default=16)
    parser.add_argument("--k-heldout", type=int, default=18)
    parser.add_argument("--k-fit", type=int, default=24)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--bergson-python", default=None, help="a Python with bergson installed")
    parser.add_argument("--bergson-script", default=None, help="the script that runs bergson (see bergson())")
    parser.add_argument("--bergson-methods", default="ekfac,trackstar")
    parser.add_argument("--doc", default=None, help="also write the table as Markdown to this file")
    args = parser.parse_args()
    from influence.evaluate.lds import evaluate_lds
    from influence.gradients.collect import project_grads
    from influence.models.loading import LoraSettings
    from influence.train.subsets import train_subsets
    from influence.train.warmup import WarmupConfig, warmup

    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool_file, _ = write_data(out, args.pool, args.heldin, 0)
    run_dir = out / "run"
    config = WarmupConfig(model="smollm2-135m", train_files=[str(pool_file)], out=str(run_dir),
                          lora=LoraSettings(8, 32, 0.05, ["q_proj", "v_proj"]), fraction=1.0, epochs=3,
                          learning_rate=5e-4, warmup_ratio=0.0, batch_size=8, grad_accum=1, max_length=128, seed=0)
    steps = {}
    since = time.time()
    warmup(config, resume=(run_dir / "manifest.json").exists())
    for _, target, tasks in targets_of(out):
        project_grads(run_dir, target, proj_dim=args.proj_dim, batch_size=8, chunk_size=32, target_tasks=tasks,
                      train_gradients=["adam", "sgd", "margin"])
    steps["warm-up and gradients"] = round(time.time() - since)
    since = time.time()
    specs = [(target, tasks) for _, target, tasks in targets_of(out)]
    train_subsets(run_dir, k=args.k_fit, alpha=0.5, targets=specs, name="fit", seed=0, say=print)
    steps[f"{args.k_fit} fit subset models"] = round(time.time() - since)

    methods = [(m, our_method, ()) for m in OURS] + [(m, kronfluence, ()) for m in
                                                      ("kronfluence_ekfac", "kronfluence_ekfac_heuristic")]
    if args.bergson_python:
        methods += [(f"bergson_{m}", bergson, (args.bergson_python, args.bergson_script))
                    for m in args.bergson_methods.split(",")]
    context = multiprocessing.get_context("spawn")
    for name, function, extra in methods:
        folder = out / "attributions" / name
        if (folder / "cost.json").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        print(f"== {name}", flush=True)
        process = context.Process(target=measured, args=(function, str(run_dir), name, str(folder), *extra))
        process.start()
        process.join()
        if process.exitcode:
            print(f"   {name} failed (exit {process.exitcode}); left out", flush=True)

    since = time.time()
    done = [name for name, _, _ in methods if (out / "attributions" / name / "cost.json").exists()]
    rows = []
    for label, target, tasks in targets_of(out):
        files = [str(out / "attributions" / name / f"{label}.npz") for name in done]
        report = evaluate_lds(run_dir, target, attributions=files, k=args.k_heldout, target_tasks=tasks,
                              heldout="heldout", say=print)
        for _, row in report.table.iterrows():
            name = str(row["method"]).split("/")[0]
            cost = json.loads((out / "attributions" / name / "cost.json").read_text())
            rows.append({"target": label, "method": name, "lds": row["lds"], "ci_low": row["ci_low"],
                         "ci_high": row["ci_high"], **cost})
    steps[f"{args.k_heldout} held-out models and the LDS"] = round(time.time() - since)
    table = pd.DataFrame(rows)
    table.to_csv(out / "lds_peers.csv", index=False)
    text = [f"LDS on {args.k_heldout} held-out subset models (alpha 0.5), SmolLM2-135M, LoRA r=8 q/v, pool {args.pool}, "
            f"attributed model trained on the whole pool; 95% bootstrap intervals. Wall time and peak memory of "
            "each method's own process (model loading included; ekfac/kfac include fitting the curvature).", "",
            "| target | method | LDS | 95% interval | wall s | peak MB |", "|---|---|---|---|---|---|"]
    text += [f"| {r.target} | {r.method} | {r.lds:+.3f} | [{r.ci_low:+.3f}, {r.ci_high:+.3f}] | {r.seconds} | "
             f"{r.peak_mb} |" for r in table.itertuples()]
    text += ["", f"Steps (s): {json.dumps(steps)}; total {(time.time() - started) / 60:.1f} min."]
    print("\n".join(text))
    if args.doc:
        Path(args.doc).write_text("# LDS head to head (`scripts/lds_peers.py`)\n\n" + "\n".join(text) + "\n")


if __name__ == "__main__":
    main()
