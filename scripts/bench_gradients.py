"""Per-example gradients: ours (hooks, one batched backward) vs a LESS-style batch-1 backward loop vs
a plain training step (forward + backward of the batch, the physical floor), same batch, same model.
Prints seconds per example, ratios and peak memory.

    python scripts/bench_gradients.py --model smollm2-135m --batch 8 --length 256
    python scripts/bench_gradients.py --model tiny-llama --batch 8 --length 256
    python scripts/bench_gradients.py --model scripts/model_configs/llama-3.1-8b --random-weights --dtype bf16  # GPU

``--random-weights`` builds the architecture of a folder holding only its ``config.json`` (e.g. a 1B or 8B
Llama) with random weights, directly on the device: the cost of a gradient does not depend on the values.
"""

from __future__ import annotations

import argparse
import json

import torch
from _bench import measure, report, run_child

# ours-hooks+projection adds the default projector (to --proj-dim): its share of the total is the most
# that projecting from the LoRA factors without materialising the gradient (LoGra-style) could save.
CONTENDERS = ("training-step", "ours-batched-hooks", "ours-hooks+projection", "less-batch1-loop")


def setup(args):
    from influence.models.loading import DTYPES, LoraSettings, ModelLoading, add_lora, load_base_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loading = ModelLoading(dtype=args.dtype).resolved(device)
    if args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM

        with device:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model),
                                                     dtype=DTYPES[loading.dtype])
    else:
        model, _ = load_base_model(args.model, loading, device)
    model = add_lora(model, LoraSettings(r=args.rank, alpha=2 * args.rank, dropout=0.0,
                                         target_modules=["q_proj", "v_proj"]), seed=0).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=g)
    labels = ids.clone()
    labels[:, : args.length // 2] = -100  # half prompt, half response
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}
    return model, batch


def training_step(model, batch):
    from influence.models.losses import forward_response

    model.zero_grad(set_to_none=True)
    forward_response(model, batch).losses.sum().backward()


def batched_hooks(hooks, batch):
    return hooks.compute(batch).grads


def batch1_loop(model, params, batch):
    from influence.models.losses import forward_response

    rows = []
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad(set_to_none=True)
        forward_response(model, {k: v[i : i + 1] for k, v in batch.items()}).losses.sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params.values()]))
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="fp32", choices=("auto", "fp32", "bf16", "fp16"),
                        help="precision of the base weights (the adapter and gradients stay fp32)")
    parser.add_argument("--random-weights", action="store_true",
                        help="--model is a folder with a config.json: its architecture with random weights")
    parser.add_argument("--proj-dim", type=int, default=8192, help="LESS's projection dimension")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=CONTENDERS)
    args = parser.parse_args()
    if args.only:
        model, batch = setup(args)
        if args.only == "training-step":
            result = measure(training_step, model, batch, repeat=args.repeat)
        elif args.only == "ours-batched-hooks":
            from influence.gradients.per_example import LoraGradients

            result = measure(batched_hooks, LoraGradients(model), batch, repeat=args.repeat)
        elif args.only == "ours-hooks+projection":
            from influence.gradients.collect import projection_rows
            from influence.gradients.per_example import LoraGradients
            from influence.gradients.projection import Projector

            # project-grads buffers `projection_rows` examples per projection call; the projection's cost
            # does not depend on the values, so this batch's gradients are repeated to that many rows.
            hooks = LoraGradients(model)
            projector = Projector(hooks.dim, args.proj_dim, seed=0)
            rows = projection_rows(hooks.dim, args.batch, chunk_size=128)  # project-grads' default chunk
            buffered = hooks.compute(batch).grads.repeat(-(-rows // args.batch), 1)[:rows]
            projection = measure(projector.project, buffered, repeat=args.repeat)
            result = measure(batched_hooks, hooks, batch, repeat=args.repeat)
            result["projection_seconds"] = projection["seconds"] / rows  # per example
            result["seconds"] += result["projection_seconds"] * args.batch
            result["peak_rss_mb"] = max(result["peak_rss_mb"], projection["peak_rss_mb"])
        else:
            from influence.models.loading import lora_parameters

            result = measure(batch1_loop, model, lora_parameters(model), batch, repeat=args.repeat)
        result["seconds"] /= args.batch  # per example
        print(json.dumps(result))
        return
    common = [f"--model={args.model}", f"--batch={args.batch}", f"--length={args.length}",
              f"--rank={args.rank}", f"--proj-dim={args.proj_dim}", f"--repeat={args.repeat}", f"--dtype={args.dtype}",
              *(["--random-weights"] if args.random_weights else [])]
    results = {name: run_child(__file__, name, common) for name in CONTENDERS}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report(f"per-example LoRA gradients, {args.model} ({args.dtype} weights), r={args.rank} q/v, "
           f"{args.batch} x {args.length} tokens, {device}: seconds per example", results, "training-step")
    if "error" not in results["ours-batched-hooks"]:
        ours = results["ours-batched-hooks"]["seconds"]
        print(f"ours / training step = {ours / results['training-step']['seconds']:.2f}x (goal <= 1.3x); "
              f"loop / ours = {results['less-batch1-loop']['seconds'] / ours:.2f}x")
    if "error" not in results["ours-hooks+projection"]:
        both = results["ours-hooks+projection"]
        print(f"projection to {args.proj_dim}: {both['projection_seconds']:.4f} s per example = "
              f"{both['projection_seconds'] / both['seconds']:.0%} of extraction + projection "
              f"(the most that projecting from the LoRA factors could save)")


if __name__ == "__main__":
    main()
