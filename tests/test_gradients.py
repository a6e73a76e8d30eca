import numpy as np
import pytest
import torch

from influence.data.formats import Example
from influence.data.templates import collate, encode_example
from influence.gradients.per_example import AdamPreconditioner, LoraGradients
from influence.models.loading import lora_parameters
from influence.models.losses import per_example_loss

from .conftest import lora_with_nonzero_b


def _examples(n=5):
    return [
        Example(f"e#{i}", "e", [{"role": "user", "content": "q" * (3 + 7 * i)},
                                {"role": "assistant", "content": "answer " * (1 + i % 3)}], {})
        for i in range(n)
    ]


def _loop_gradients(model, encoded, pad_id):
    """Reference: one backward per example, no padding, autograd's parameter gradients."""
    params = lora_parameters(model)
    rows = []
    for enc in encoded:
        model.zero_grad(set_to_none=True)
        batch = collate([enc], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = per_example_loss(logits, batch["labels"])
        loss.sum().backward()
        rows.append(torch.cat([params[n].grad.reshape(-1) for n in params]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batched_hooks_equal_per_example_loop_with_padding(tiny_lora, attn):
    model, tok = tiny_lora
    model.base_model.model.config._attn_implementation = attn
    encoded = [encode_example(e, tok, 128) for e in _examples()]
    assert len({len(e.input_ids) for e in encoded}) > 1  # the batch really is padded
    reference = _loop_gradients(model, encoded, tok.pad_token_id)
    assert reference.abs().sum() > 0
    hooks = LoraGradients(model)
    result = hooks.compute({k: v for k, v in collate(encoded, tok.pad_token_id).items()})
    hooks.remove()
    assert result.grads.shape == (5, hooks.dim)
    torch.testing.assert_close(result.grads, reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.norms, reference.norm(dim=1), rtol=1e-4, atol=1e-6)
    # lora_A gradients are non-zero because lora_B is (see the fixture)
    a_name = next(n for n in hooks.names if "lora_A" in n)
    offset = sum(int(np.prod(hooks.shapes[n])) for n in hooks.names[: hooks.names.index(a_name)])
    assert result.grads[:, offset : offset + int(np.prod(hooks.shapes[a_name]))].abs().sum() > 0


def test_hooks_do_not_leak_parameter_gradients(tiny_lora):
    model, tok = tiny_lora
    hooks = LoraGradients(model)
    hooks.compute(collate([encode_example(e, tok, 64) for e in _examples(2)], tok.pad_token_id))
    assert all(p.grad is None for p in lora_parameters(model).values())
    hooks.remove()


def test_adam_preconditioning_is_less_formula():
    """LESS's obtain_gradients_with_adam: m' / sqrt(v' + eps), eps inside the root. At LoRA-like
    magnitudes (v' far below eps) that differs from m' / (sqrt(v') + eps) by far more than rounding."""
    rng = np.random.default_rng(0)
    g, m = rng.normal(scale=1e-5, size=(3, 10)), rng.normal(scale=1e-5, size=10)
    v = rng.uniform(0, 1e-10, size=10)
    b1, b2, eps = 0.9, 0.999, 1e-8
    feature = AdamPreconditioner(torch.tensor(m), torch.tensor(v), b1, b2, eps)(torch.tensor(g)).numpy()
    m2 = b1 * m + (1 - b1) * g
    v2 = b2 * v + (1 - b2) * g**2
    np.testing.assert_allclose(feature, m2 / np.sqrt(v2 + eps), rtol=1e-12)
    other = m2 / (np.sqrt(v2) + eps)
    assert np.abs(feature - other).max() > 0.1 * np.abs(other).max()


def test_flatten_follows_gradient_order(tiny_lora):
    model, _ = tiny_lora
    hooks = LoraGradients(model)
    params = lora_parameters(model)
    flat = hooks.flatten({n: p.detach() for n, p in params.items()}, "cpu")
    torch.testing.assert_close(flat, torch.cat([params[n].detach().reshape(-1) for n in hooks.names]))
    with pytest.raises(KeyError, match="no optimizer state"):
        hooks.flatten({}, "cpu")
    hooks.remove()


def test_lm_head_lora_after_response_selection(tiny):
    """lm_head sees batch-flattened response positions (logits_to_keep); gradients stay exact."""
    model, tok = tiny
    model = lora_with_nonzero_b(model, ["v_proj", "lm_head"], r=2)
    encoded = [encode_example(e, tok, 128) for e in _examples(4)]
    reference = _loop_gradients(model, encoded, tok.pad_token_id)
    hooks = LoraGradients(model)
    assert any("lm_head" in n for n in hooks.names)
    result = hooks.compute(collate(encoded, tok.pad_token_id))
    hooks.remove()
    torch.testing.assert_close(result.grads, reference, rtol=1e-4, atol=1e-6)
