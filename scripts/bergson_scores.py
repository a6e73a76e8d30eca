#!/usr/bin/env python
"""Training-data attribution scores from Bergson (EleutherAI, PyPI `bergson` 2.5.1) for a
Hugging Face causal LM with a peft LoRA adapter, on CPU in fp32.

Run with the Bergson venv, e.g.

    .venv-bergson/bin/python scripts/bergson_scores.py --model DIR --adapter DIR \
        --train train.jsonl --query query.jsonl --method ekfac --out scores.npz

--train/--query: .jsonl rows {"input_ids": [...], "labels": [...]} or .npz with object arrays
`input_ids` and `labels` (labels -100 = not trained on; same alignment as input_ids, as in HF:
Bergson shifts them itself, the logit at position t is scored against labels[t + 1]).

Writes `matrix` [n_train, n_query] float64 (higher = the train example helps the query more;
Bergson's influence pipelines already use that sign, `higher_is_better=True`, so nothing is
flipped), `method`, `seconds` (the Bergson pipeline's wall time, model loads included).

Methods (each one is the Bergson CLI pipeline of the same name, driven through its Python
command classes with Bergson's defaults unless an option below says otherwise):
  ekfac      `bergson ekfac` with --method kfac --ev_correction (EK-FAC, Grosse et al. 2023)
  kfac       `bergson ekfac` with --method kfac (no eigenvalue correction)
  trackstar  `bergson trackstar` (random-projected grads, mixed query/train autocorrelation
             Hessian, no optimizer-state normalization, no unit normalization)
  trak       `bergson trak`, one model (no ensemble): log-odds loss, one global random
             projection (the CLI's default of 16 dims unless --projection-dim), inverse Gram
             with damping 0, times (1 - p_i)
  graddot    `bergson build` (query) + `bergson score`: plain dot product of LoRA gradients
  gradcos    the same with --unit_normalize (gradient cosine similarity)

What is attributed: Bergson hooks every nn.Linear inside the PeftModel that belongs to the
adapter, i.e. the `lora_A.default` and `lora_B.default` linears, and forms per-example weight
gradients from (input activation, output gradient) pairs. So the parameters are exactly the
LoRA A and B matrices (not the frozen base weights, not biases).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402

METHODS = ("ekfac", "kfac", "trackstar", "trak", "graddot", "gradcos")


def read_rows(path: str) -> list[dict]:
    """Rows of {"input_ids": list[int], "labels": list[int]} from a .jsonl or .npz file."""
    p = Path(path)
    if p.suffix == ".jsonl":
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    elif p.suffix == ".npz":
        z = np.load(p, allow_pickle=True)
        labels = z["labels"] if "labels" in z.files else z["input_ids"]
        rows = [{"input_ids": a, "labels": b} for a, b in zip(z["input_ids"], labels)]
    else:
        raise SystemExit(f"{path}: expected .jsonl or .npz")
    out = []
    for r in rows:
        ids = [int(t) for t in np.asarray(r["input_ids"]).ravel()]
        lab = [int(t) for t in np.asarray(r.get("labels", ids)).ravel()]
        if len(ids) != len(lab):
            raise SystemExit(f"{path}: input_ids and labels differ in length")
        out.append({"input_ids": ids, "labels": lab})
    return out


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def prepare_adapter(model_dir: str, adapter_dir: str, work: Path) -> str:
    """Copy the adapter, pointing its base_model_name_or_path at --model: Bergson loads a
    PEFT model by being given the adapter folder as `model` and reads the base from there."""
    dst = work / "adapter"
    shutil.copytree(adapter_dir, dst)
    cfg_path = dst / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(Path(model_dir).resolve())
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return str(dst)


def prepare_tokenizer(model_dir: str, work: Path) -> str:
    """Bergson's data pipeline always loads a tokenizer (only to read model_max_length; the
    data here is pre-tokenized). Use the model's own if it has one, else write a dummy."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(model_dir)
        return model_dir
    except Exception:
        pass
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    max_len = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", 1 << 30)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
        unk_token="<unk>",
        model_max_length=max_len,
    )
    out = work / "tokenizer"
    tok.save_pretrained(out)
    return str(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--query", required=True)
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--damping", type=float, default=None,
                    help="InversionConfig.damping_factor (Bergson default 0.1, relative to the "
                         "mean eigenvalue of each module's Hessian)")
    ap.add_argument("--projection-dim", type=int, default=None,
                    help="trackstar: per-module projection side p (grads become p x p); "
                         "trak: the global projection's dimension. Bergson's default: 16")
    ap.add_argument("--no-mix", action="store_true",
                    help="trackstar: precondition with the train Hessian only (mix_hessians=False)")
    ap.add_argument("--loss-reduction", choices=("sum", "mean"), default="sum",
                    help="per-document token-loss reduction (Bergson default: sum)")
    ap.add_argument("--use-dataset-labels", action="store_true",
                    help="ekfac/kfac: fit the Hessian with the data labels (empirical Fisher) "
                         "instead of Bergson's default of labels sampled from the model")
    ap.add_argument("--seed", type=int, default=0,
                    help="torch.manual_seed before running: Bergson samples the Hessian's labels "
                         "from the model with torch's global RNG and does not seed it itself")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--keep", default=None, help="keep Bergson's run folder here")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        print("note: CUDA is visible; Bergson will use it", file=sys.stderr)

    from bergson.cli.commands import Build, Ekfac, Score, Trackstar, Trak
    from bergson.config.config import (
        DataConfig,
        DistributedConfig,
        HessianConfig,
        HessianPipelineConfig,
        IndexConfig,
        InversionConfig,
        PreprocessConfig,
        QuerySetConfig,
        ScoreConfig,
        TrackstarConfig,
        TrackstarIndexConfig,
        TrakConfig,
    )
    from bergson.data import load_scores

    train, query = read_rows(args.train), read_rows(args.query)
    work = Path(tempfile.mkdtemp(prefix="bergson_scores_"))
    try:
        write_jsonl(train, work / "train.jsonl")
        write_jsonl(query, work / "query.jsonl")
        adapter = prepare_adapter(args.model, args.adapter, work)
        tokenizer = prepare_tokenizer(args.model, work)
        max_len = max(len(r["input_ids"]) for r in train + query)
        from transformers import AutoConfig, AutoTokenizer

        model_max = min(
            getattr(AutoConfig.from_pretrained(args.model), "max_position_embeddings", 1 << 62),
            getattr(AutoTokenizer.from_pretrained(tokenizer), "model_max_length", 1 << 62),
        )
        if max_len > model_max:
            raise SystemExit(f"a row has {max_len} tokens, more than the model's {model_max}")
        run = str(work / "run")

        common = dict(
            model=adapter,
            tokenizer=tokenizer,
            precision="fp32",
            data=DataConfig(dataset=str(work / "train.jsonl"), split="train"),
            distributed=DistributedConfig(nnode=1, nproc_per_node=1),
            loss_reduction=args.loss_reduction,
            # Bergson's default is 2048 tokens per batch; Bergson refuses more than the
            # model's context, and a batch must hold the longest row.
            token_batch_size=max(min(2048, model_max), max_len),
        )
        qset = QuerySetConfig(dataset=str(work / "query.jsonl"), split="train",
                              aggregation="none")
        inversion = InversionConfig()
        if args.damping is not None:
            inversion.damping_factor = args.damping

        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        if args.method in ("ekfac", "kfac"):
            cmd = Ekfac(
                index_cfg=IndexConfig(run, **common),
                hessian_cfg=HessianConfig(method="kfac", ev_correction=args.method == "ekfac",
                                          use_dataset_labels=args.use_dataset_labels),
                score_cfg=ScoreConfig(),
                preprocess_cfg=PreprocessConfig(),
                hessian_pipeline_cfg=HessianPipelineConfig(query=qset, inversion_cfg=inversion),
            )
            cmd.execute()
        elif args.method == "trackstar":
            icfg = TrackstarIndexConfig(run, **common)
            if args.projection_dim is not None:
                icfg.projection_dim = args.projection_dim
            tcfg = TrackstarConfig(query=qset, mix_hessians=not args.no_mix)
            tcfg.preprocess_cfg.inversion_cfg = inversion
            Trackstar(index_cfg=icfg, trackstar_cfg=tcfg).execute()
        elif args.method == "trak":
            icfg = TrackstarIndexConfig(run, **common)
            icfg.loss_fn, icfg.projection_target = "log_odds", "global"
            if args.projection_dim is not None:
                icfg.projection_dim = args.projection_dim
            tcfg = TrakConfig(query=qset)
            if args.damping is not None:
                tcfg.preprocess_cfg.inversion_cfg.damping_factor = args.damping
            Trak(index_cfg=icfg, trak_cfg=tcfg).execute()
        else:  # graddot / gradcos: build the query index, then score train against it
            unit = args.method == "gradcos"
            qcfg = IndexConfig(f"{run}/query", **{**common, "data": qset.to_data()})
            Build(index_cfg=qcfg, preprocess_cfg=PreprocessConfig()).execute()
            Score(
                score_cfg=ScoreConfig(query_path=f"{run}/query"),
                index_cfg=IndexConfig(f"{run}/scores", **common),
                preprocess_cfg=PreprocessConfig(unit_normalize=unit),
            ).execute()
        seconds = time.perf_counter() - t0

        scores = load_scores(Path(run) / "scores")
        matrix = np.asarray(scores[:], dtype=np.float64)
        if matrix.shape != (len(train), len(query)):
            raise RuntimeError(f"unexpected score shape {matrix.shape}")
        if not np.isfinite(matrix).all():
            print("warning: non-finite scores (e.g. trak's default damping of 0 with a singular "
                  "Gram: pass --damping or a smaller --projection-dim)", file=sys.stderr)
        np.savez(args.out, matrix=matrix, method=np.array(args.method),
                 seconds=np.array(seconds))
        print(f"{args.method}: matrix {matrix.shape} in {seconds:.1f}s -> {args.out}")
        if args.keep:
            shutil.copytree(run, args.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
