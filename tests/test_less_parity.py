"""LESS parity: ``rank --method less`` against an independent re-computation of LESS's reference code.

The reference side uses none of our gradient, preconditioning or scoring code. As LESS's
``collect_grad_reps.py`` does, it runs one example at a time through the peft model with the model's
own ``labels`` loss and ``loss.backward()``, concatenates ``p.grad`` in parameter order, forms
``m' / sqrt(v' + eps)`` from the checkpoint's Adam moments (beta1 0.9, beta2 0.999, eps 1e-8, as LESS
hard-codes), projects with our projector (the one shared piece: LESS's own TRAK projector draws other
random numbers), normalises rows, and aggregates as ``matching.py`` does: the checkpoint-weighted sum
of the train x target matrices, reshaped to (n, subtasks, examples per subtask), mean, max.

Only public entry points are called on our side (``warmup``, ``project_grads``, ``rank``), so the same
file runs against any version of the package.
"""

import json

import numpy as np
import pandas as pd
import torch
from peft import PeftModel
from safetensors.torch import load_file

from influence import project_grads, rank
from influence.data.formats import load_pool
from influence.data.targets import load_target
from influence.data.templates import collate, encode_example
from influence.gradients.projection import Projector
from influence.models.loading import LoraSettings, build_tiny_llama
from influence.train.warmup import WarmupConfig, warmup

BETA1, BETA2, EPS = 0.9, 0.999, 1e-08  # LESS obtain_gradients_with_adam
DIM = 256
MAX_LENGTH = 96


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _make_run(folder):
    pool = _write(folder / "pool.jsonl", [
        {"messages": [{"role": "user", "content": f"Add {i} and {i % 7 + 1}."},
                      {"role": "assistant", "content": f"The sum is {i + i % 7 + 1}."}]}
        if i % 3 else {"prompt": f"Name colour {i}.", "completion": ["red", "green", "light blue sky"][i % 3 - 1]}
        for i in range(30)
    ])
    target = _write(folder / "target.jsonl", [
        {"prompt": f"What is {i} plus 2?", "completion": f"{i + 2}", "task": "math"} for i in range(3)
    ] + [
        {"prompt": f"Describe colour {i}.", "completion": "a warm red", "task": "words"} for i in range(3)
    ])
    config = WarmupConfig(
        model="tiny-llama", train_files=[pool], out=str(folder / "run"),
        lora=LoraSettings(4, 16, 0.0, ["q_proj", "v_proj"]), fraction=0.6, epochs=2, learning_rate=5e-3,
        batch_size=2, grad_accum=2, max_length=MAX_LENGTH, seed=0,
    )
    warmup(config, progress=False)
    return config.out, pool, target


def _stable(name):
    return name.replace(".default.", ".").replace("base_model.model.", "")


def _reference_features(run_dir, checkpoint, examples, tokenizer, adam):
    """LESS collect_grads, one example at a time; Adam feature for the pool, plain gradient for targets."""
    base, _ = build_tiny_llama()
    model = PeftModel.from_pretrained(base, str(run_dir / "checkpoints" / checkpoint), is_trainable=True).eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if adam:
        state = load_file(str(run_dir / "checkpoints" / checkpoint / "optimizer.safetensors"))
        avg = torch.cat([state[f"exp_avg.{_stable(n)}"].reshape(-1) for n in names])
        avg_sq = torch.cat([state[f"exp_avg_sq.{_stable(n)}"].reshape(-1) for n in names])
    rows = []
    for example in examples:
        batch = collate([encode_example(example, tokenizer, MAX_LENGTH)], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        grads = torch.cat([p.grad.view(-1) for n, p in model.named_parameters() if p.grad is not None])
        if adam:
            updated_avg = BETA1 * avg + (1 - BETA1) * grads
            updated_avg_sq = BETA2 * avg_sq + (1 - BETA2) * grads**2
            grads = updated_avg / torch.sqrt(updated_avg_sq + EPS)
        rows.append(grads.detach().clone())
        model.zero_grad()
    return torch.stack(rows)


def reference_less(run_dir, pool_file, target_file):
    """LESS's scores, re-computed from the checkpoints as its reference code does."""
    from pathlib import Path

    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    checkpoints = [c["name"] for c in manifest["checkpoints"]]
    weights = np.array([c["mean_lr"] for c in manifest["checkpoints"]])
    weights = weights / weights.sum()
    _, tokenizer = build_tiny_llama()
    pool = load_pool([pool_file])
    targets = sorted(load_target(target_file), key=lambda e: e.task)  # LESS stores targets grouped by subtask
    n_subtasks = len({t.task for t in targets})
    influence = 0
    for weight, checkpoint in zip(weights, checkpoints):
        train = _reference_features(run_dir, checkpoint, pool, tokenizer, adam=True)
        valid = _reference_features(run_dir, checkpoint, targets, tokenizer, adam=False)
        projector = Projector(train.shape[1], DIM, seed=0)
        train = torch.nn.functional.normalize(projector.project(train).half().float(), dim=1)
        valid = torch.nn.functional.normalize(projector.project(valid).half().float(), dim=1)
        influence = influence + weight * (train @ valid.T).double().numpy()
    return influence.reshape(influence.shape[0], n_subtasks, -1).mean(-1).max(-1)


def spearman(a, b):
    return float(np.corrcoef(pd.Series(a).rank(), pd.Series(b).rank())[0, 1])


def test_rank_less_matches_the_reference_computation(tmp_path):
    run_dir, pool, target = _make_run(tmp_path)
    project_grads(run_dir, target, proj_dim=DIM, seed=0, batch_size=4, chunk_size=8, progress=False)
    table = rank(run_dir, target, method="less", fraction=0.1, out=tmp_path / "ranked")
    ours = table.sort_values("pool_index")["score"].to_numpy()
    expected = reference_less(run_dir, pool, target)
    assert len(ours) == len(expected) == 30
    assert np.std(expected) > 1e-3  # a ranking with something to agree on
    rho = spearman(ours, expected)
    assert rho >= 0.999, f"Spearman {rho:.4f} between rank --method less and LESS's reference computation"
    np.testing.assert_allclose(ours, expected, atol=5e-3)
