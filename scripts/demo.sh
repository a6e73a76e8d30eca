#!/usr/bin/env bash
# The whole pipeline on the embedded default: SmolLM2-135M-Instruct (from PyPI), a pool of ~190
# real FLAN-CoT and P3 examples vendored in the package, target mmlu_val (4 subjects).
# About 5 minutes on a 2-core CPU (301 s measured): LoRA r=8 on q/v, max 256 tokens, 2 epochs on 25% of the pool,
# 2048-dimensional projection; then LESS's baselines (random, bm25, dsir, rds) compared with LESS.
# Usage: scripts/demo.sh [run dir]
set -euo pipefail
RUN=${1:-runs/demo}
BIN=${VENV:-.venv}/bin
SUBJECTS=elementary_mathematics,high_school_biology,world_religions,marketing
start=$(date +%s)
echo "== demo: SmolLM2-135M-Instruct, pool = embedded FLAN-CoT + P3 sample, target = mmlu_val ($SUBJECTS)"
echo "== settings: LoRA r=8 alpha=32 on q_proj,v_proj; max length 256; warm-up 25% of pool, 2 epochs; proj-dim 2048"
rm -rf "$RUN"
$BIN/influence prepare-model
$BIN/influence warmup --model smollm2-135m --out "$RUN" --fraction 0.25 --epochs 2 --batch-size 8 \
  --grad-accum 1 --warmup-ratio 0 --lr 2e-4 --max-length 256 --lora-r 8 --lora-alpha 32 --lora-dropout 0.05 \
  --lora-modules q_proj,v_proj
$BIN/influence project-grads --run "$RUN" --target mmlu_val --target-tasks "$SUBJECTS" \
  --proj-dim 2048 --batch-size 8 --chunk-size 32
$BIN/influence rank --run "$RUN" --target mmlu_val --target-tasks "$SUBJECTS" --fraction 0.1 --show 3
echo "== LESS's baselines on the same run: top-10% overlap with LESS, score correlation, length bias"
$BIN/influence compare --run "$RUN" --target mmlu_val --target-tasks "$SUBJECTS" --fraction 0.1
$BIN/influence report --run "$RUN"
echo "== demo finished in $(( $(date +%s) - start )) s; LESS ranking in $RUN/rank-less-mmlu_val, the baselines in $RUN/compare-mmlu_val/, figures in $RUN/report.html"
