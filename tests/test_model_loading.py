"""How base models are loaded (--dtype, gradient checkpointing, hub options), recorded by the warm-up
and followed by every later stage."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from influence.cli import main
from influence.gradients.collect import project_grads
from influence.gradients.store import GradientStore
from influence.models.loading import LoraSettings, ModelLoading, load_base_model, place
from influence.train.run import Run
from influence.train.warmup import WarmupConfig, warmup

from .conftest import group, make_target_file, write_jsonl


def _config(folder: Path, pool: str, **loading) -> WarmupConfig:
    return WarmupConfig(model="tiny-llama", train_files=[pool], out=str(folder), fraction=1.0, epochs=1,
                        learning_rate=5e-3, batch_size=4, grad_accum=1, max_length=64, seed=0,
                        lora=LoraSettings(4, 16, 0.1, ["q_proj", "v_proj"]), loading=ModelLoading(**loading))


@pytest.fixture
def pool(tmp_path):
    return str(write_jsonl(tmp_path / "pool.jsonl", [{"prompt": f"Add {i} and 2.", "completion": f"{i + 2}"}
                                                     for i in range(8)]))


def test_auto_is_bf16_on_gpus_that_support_it_else_fp32_and_recorded(tmp_path, pool):
    expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    assert ModelLoading().resolved(torch.device("cpu")).dtype == "fp32"
    warmup(_config(tmp_path / "run", pool), progress=False)
    run = Run(tmp_path / "run")
    assert run.manifest["model_loading"]["dtype"] == expected
    assert run.manifest["config"]["loading"]["dtype"] == "auto"
    assert run.model_loading == ModelLoading(dtype=expected)


def test_bf16_weights_are_followed_by_later_stages_with_fp32_adapters(tmp_path, pool):
    warmup(_config(tmp_path / "run", pool, dtype="bf16"), progress=False)
    run = Run(tmp_path / "run")
    assert run.model_loading.dtype == "bf16"
    base, _, _ = run.load_base_model(torch.device("cpu"))  # fingerprint of bf16 weights: accepted
    assert next(base.parameters()).dtype == torch.bfloat16
    adapter = load_file(str(run.checkpoints()[0].adapter_file))
    assert all(t.dtype == torch.float32 for t in adapter.values())  # peft keeps adapters in fp32
    target = make_target_file(tmp_path)
    project_grads(str(run.path), target, proj_dim=32, seed=0, batch_size=4, chunk_size=4, progress=False)
    store = GradientStore.open(run.store_path, group("train", run.checkpoints()[0].name, 32))
    grads = store.array("grads")
    assert np.isfinite(grads).all() and np.abs(grads).sum() > 0


def test_weights_in_another_dtype_are_refused(tmp_path, pool):
    warmup(_config(tmp_path / "run", pool, dtype="bf16"), progress=False)
    manifest_file = tmp_path / "run" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["model_loading"]["dtype"] = "fp32"  # as if a later stage loaded fp32 weights
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="not the one this run was warmed up on"):
        Run(tmp_path / "run").load_base_model(torch.device("cpu"))


def test_runs_recorded_before_loading_settings_load_fp32():
    assert ModelLoading.from_manifest(None) == ModelLoading(dtype="fp32")


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, pool):
    warmup(_config(tmp_path / "plain", pool), progress=False)
    warmup(_config(tmp_path / "checkpointed", pool, gradient_checkpointing=True), progress=False)
    plain = load_file(str(Run(tmp_path / "plain").checkpoints()[0].adapter_file))
    checkpointed = load_file(str(Run(tmp_path / "checkpointed").checkpoints()[0].adapter_file))
    assert plain.keys() == checkpointed.keys()
    for name in plain:  # dropout 0.1: recomputation must replay the same masks
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6)
    model, _ = load_base_model("tiny-llama", ModelLoading(gradient_checkpointing=True), torch.device("cpu"))
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_place_moves_models_without_a_device_map():
    model, _ = load_base_model("tiny-llama")
    moved, device = place(model, torch.device("cpu"))
    assert device == torch.device("cpu") and next(moved.parameters()).device == device


def test_loading_options_on_the_command_line(tmp_path, pool):
    runner = CliRunner()
    result = runner.invoke(main, ["warmup", "--model", "tiny-llama", "--train", pool, "--out", str(tmp_path / "r"),
                                  "--dtype", "fp8"])
    assert result.exit_code == 2 and "--dtype" in result.output and "fp8" in result.output
    result = runner.invoke(main, ["warmup", "--model", "tiny-llama", "--train", pool, "--out", str(tmp_path / "r"),
                                  "--attn-implementation", "magic"])
    assert result.exit_code == 2 and "--attn-implementation" in result.output
    assert not (tmp_path / "r").exists()
    result = runner.invoke(main, ["warmup", "--model", "tiny-llama", "--train", pool, "--out", str(tmp_path / "r"),
                                  "--dtype", "fp32", "--attn-implementation", "eager", "--fraction", "1", "--epochs", "1",
                                  "--lora-r", "4", "--lora-modules", "q_proj", "--max-length", "64"])
    assert result.exit_code == 0, result.output
    recorded = Run(tmp_path / "r").manifest["model_loading"]
    assert recorded["dtype"] == "fp32" and recorded["attn_implementation"] == "eager"


def test_chat_format_is_chosen_recorded_and_checked(tmp_path, pool):
    from influence.errors import InfluenceError
    from influence.models.loading import tokenizer_fingerprint

    with pytest.raises(InfluenceError, match="has no chat template"):
        load_base_model("tiny-llama", ModelLoading(chat_format="template"))
    warmup(_config(tmp_path / "run", pool, chat_format="tulu"), progress=False)
    manifest_file = tmp_path / "run" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert manifest["tokenizer"]["chat_format"] == "tulu" and len(manifest["tokenizer"]["tokenizer_sha256"]) == 64
    _, tokenizer = load_base_model("tiny-llama")
    assert tokenizer_fingerprint(tokenizer) == manifest["tokenizer"]
    manifest["tokenizer"]["tokenizer_sha256"] = "0" * 64  # as if the tokenizer files had been replaced
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="tokenizer or chat format"):
        Run(tmp_path / "run").load_base_model(torch.device("cpu"))


def test_tulu_format_replaces_a_chat_template():
    from influence.data.formats import Example
    from influence.data.templates import encode_example

    model, tokenizer = load_base_model("tiny-llama")
    from .conftest import CHATML

    tokenizer.chat_template = CHATML
    example = Example("x", "x", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], {})
    assert "<|im_start|>" in tokenizer.decode(encode_example(example, tokenizer, 64).input_ids)
    tokenizer.chat_template = None  # what --chat-format tulu does at load
    assert "<|user|>" in tokenizer.decode(encode_example(example, tokenizer, 64).input_ids)


def test_a_model_loaded_in_memory_runs_every_stage(tmp_path, pool):
    from influence.models.loading import build_tiny_llama, register_model

    model, tokenizer = build_tiny_llama(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    register_model("my-model", model, tokenizer)
    config = WarmupConfig(model="my-model", train_files=[pool], out=str(tmp_path / "run"), fraction=1.0, epochs=1,
                          learning_rate=5e-3, batch_size=4, grad_accum=1, max_length=64,
                          lora=LoraSettings(4, 16, 0.0, ["q_proj"]))
    run = warmup(config, progress=False)
    project_grads(str(run.path), make_target_file(tmp_path), proj_dim=16, chunk_size=4, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    assert run.manifest["model"] == "my-model"
    other, _ = build_tiny_llama(seed=4)
    register_model("my-model", other, tokenizer)  # other weights under the same name: refused
    with pytest.raises(Exception, match="not the one this run was warmed up on"):
        run.load_base_model(torch.device("cpu"))
