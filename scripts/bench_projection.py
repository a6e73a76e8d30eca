"""Projection: ours (hash-generated Rademacher, cached or streamed; Triton on GPU) vs traker's
BasicProjector at equal input and output dimensions. Prints seconds per call, the ratio, peak memory.

    python scripts/bench_projection.py --grad-dim 460800 --proj-dim 2048 --batch 16
"""

from __future__ import annotations

import argparse
import json

import torch
from _bench import measure, report, run_child

# ours-default: signs kept as int8 within the 2 GiB default budget; ours-cache-256MB: a budget smaller than
# the matrix (the rest streamed); ours-streamed: nothing kept. traker's BasicProjector regenerates its
# matrix in blocks of 100 outputs every call (its default); -whole keeps the whole float32 matrix.
CONTENDERS = ("ours-default", "ours-cache-256MB", "ours-streamed", "traker-BasicProjector", "traker-BasicProjector-whole")


def make_projector(name: str, args, device):
    if name.startswith("ours"):
        from influence.gradients.projection import DEFAULT_CACHE_BYTES, Projector

        cache = {"ours-default": DEFAULT_CACHE_BYTES, "ours-cache-256MB": 256 << 20, "ours-streamed": 0}[name]
        projector = Projector(args.grad_dim, args.proj_dim, seed=0, cache_bytes=cache)
        return lambda g: projector.project(g)
    from trak.projectors import BasicProjector, ProjectionType

    projector = BasicProjector(args.grad_dim, args.proj_dim, 0, ProjectionType.rademacher, device,
                               block_size=args.proj_dim if name.endswith("whole") else args.traker_block, dtype=torch.float32)
    return lambda g: projector.project(g, model_id=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grad-dim", type=int, default=460_800, help="SmolLM2-135M LoRA r=8 on q,v")
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="calls per contender (first is a warm-up)")
    parser.add_argument("--traker-block", type=int, default=100, help="traker's default block size")
    parser.add_argument("--only", choices=CONTENDERS)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.only:
        torch.manual_seed(0)
        grads = torch.randn(args.batch, args.grad_dim, device=device)
        project = make_projector(args.only, args, device)
        print(json.dumps(measure(project, grads, repeat=args.repeat)))
        return
    passthrough = [f"--grad-dim={args.grad_dim}", f"--proj-dim={args.proj_dim}", f"--batch={args.batch}",
                   f"--repeat={args.repeat}", f"--traker-block={args.traker_block}"]
    results = {name: run_child(__file__, name, passthrough) for name in CONTENDERS}
    report(f"projection of {args.batch} x {args.grad_dim} -> {args.proj_dim} on {device} "
           f"(per call, after one warm-up call)", results, "ours-default")
    first = {name: run_child(__file__, name, passthrough[:3] + ["--repeat=1"]) for name in CONTENDERS}
    report("first call (includes generating / caching the signs)", first, "ours-default")


if __name__ == "__main__":
    main()
