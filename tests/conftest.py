import json
from pathlib import Path

import pytest
import torch

from influence.core.naming import grads_group
from influence.gradients.store import target_store_name
from influence.models.loading import LoraSettings, ModelLoading, add_lora, build_tiny_llama

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def tiny():
    """(model, tokenizer) of the random tiny Llama with a byte tokenizer."""
    return build_tiny_llama()


def lora_with_nonzero_b(model, modules, r=4, std=0.05):
    """LoRA whose B matrices are non-zero: at initialisation they are zero, which makes every lora_A
    gradient zero and would hide errors. Returns the peft model in eval mode."""
    model = add_lora(model, LoraSettings(r=r, alpha=2 * r, dropout=0.0, target_modules=modules), seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return model.eval()


@pytest.fixture
def tiny_lora():
    model, tokenizer = build_tiny_llama()
    return lora_with_nonzero_b(model, ["q_proj", "v_proj"]), tokenizer


@pytest.fixture
def pool_files(tmp_path):
    """A small pool in three formats."""
    a = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": f"Add {i} and {i + 1}."},
                          {"role": "assistant", "content": f"The sum is {2 * i + 1}."}]}
            for i in range(12)
        ],
    )
    b = tmp_path / "alpaca.json"
    b.write_text(json.dumps([
        {"instruction": f"Name a colour number {i}.", "input": "", "output": ["red", "blue", "green"][i % 3]}
        for i in range(10)
    ]))
    c = tmp_path / "cot.tsv"
    c.write_text("".join(f"Is {i} even?\t{'yes' if i % 2 == 0 else 'no'}\t{i} mod 2 is {i % 2}.\n" for i in range(10)))
    return [str(a), str(b), str(c)]


def crash_at_epoch(monkeypatch, epoch: int) -> None:
    """Make the warm-up die (KeyboardInterrupt) when it is about to save the checkpoint of ``epoch``."""
    import influence.train.warmup as training

    original = training.save_checkpoint

    def crashing(run_dir, model, optimizer, state, at_epoch, step, mean_lr):
        if at_epoch == epoch:
            raise KeyboardInterrupt("simulated crash")
        return original(run_dir, model, optimizer, state, at_epoch, step, mean_lr)

    monkeypatch.setattr(training, "save_checkpoint", crashing)


def make_target_file(folder: Path) -> str:
    return str(write_jsonl(folder / "tgt.jsonl", [
        {"prompt": f"Add {i} and 1.", "completion": f"{i + 1}", "task": "math" if i % 2 else "words"}
        for i in range(6)
    ]))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A warmed-up tiny run with train and target gradient stores (2 checkpoints)."""
    from influence.gradients.collect import project_grads
    from influence.train.warmup import WarmupConfig, warmup

    folder = tmp_path_factory.mktemp("tiny_run")
    chat = write_jsonl(folder / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"Add {i} and {i + 1}."},
                      {"role": "assistant", "content": f"The sum is {2 * i + 1}."}]}
        for i in range(14)
    ])
    p3 = write_jsonl(folder / "p3.jsonl", [{"prompt": f"Colour {i}?", "completion": "red blue"[i % 2::2]} for i in range(9)])
    config = WarmupConfig(
        model="tiny-llama", train_files=[str(chat), str(p3)], out=str(folder / "run"),
        lora=LoraSettings(4, 16, 0.0, ["q_proj", "v_proj"]),
        fraction=0.5, epochs=2, learning_rate=5e-3, batch_size=4, grad_accum=1, max_length=96, seed=0,
        # fp32 weights on every device: the GPU suite compares stores written on the GPU with CPU ones
        loading=ModelLoading(dtype="fp32"),
    )
    warmup(config, progress=False)
    target = make_target_file(folder)
    project_grads(config.out, target, proj_dim=64, seed=0, batch_size=4, chunk_size=5, progress=False)
    return {"run": config.out, "target": target, "folder": folder, "target_dataset": target_store_name(target)}


def group(dataset: str, checkpoint: str, dim: int = 64) -> str:
    """A gradient store's path inside grads.zarr (the tiny run projects to 64 dimensions)."""
    return grads_group(dim, dataset, checkpoint)


@pytest.fixture(scope="session")
def engine_run(tiny_run, tmp_path_factory):
    """The tiny run with plain and margin gradients (16 dimensions, fewer than the pool's 23 examples,
    so TRAK's kernel is invertible without a ridge term), 12 subset models, the curvature (EK-FAC, K-FAC) and the metagradients (per target example)."""
    import shutil

    from influence.gradients.collect import project_grads
    from influence.gradients.curvature import fit_curvature
    from influence.train.metagrad import metagrad
    from influence.train.subsets import train_subsets

    folder = tmp_path_factory.mktemp("engine")
    shutil.copytree(tiny_run["run"], folder / "run", ignore=shutil.ignore_patterns("grads.zarr", "subsets.zarr"))
    run_dir = folder / "run"
    project_grads(run_dir, tiny_run["target"], proj_dim=16, train_gradients=["adam", "sgd", "margin"], chunk_size=5,
                  progress=False)
    train_subsets(run_dir, k=12, alpha=0.5, targets=[tiny_run["target"]], progress=False)
    fit_curvature(run_dir, progress=False)
    metagrad(run_dir, tiny_run["target"], per_target_example=True, progress=False)
    return {**tiny_run, "run": str(run_dir), "folder": folder}


@pytest.fixture(scope="session")
def rater_server():
    """The test's OpenAI-compatible server (tests/rater_server.py): (base URL, call statistics)."""
    from .rater_server import start

    url, stats, server = start()
    yield url, stats
    server.shutdown()


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory) -> str:
    """A randomly initialised one-output Llama sequence classifier and its byte tokenizer, saved to a folder."""
    from transformers import LlamaForSequenceClassification

    causal, tokenizer = build_tiny_llama()
    config = causal.config
    config.num_labels = 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    folder = tmp_path_factory.mktemp("reward_model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
