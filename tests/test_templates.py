import pytest
import torch

from influence.data.formats import Example
from influence.data.templates import IGNORE_INDEX, collate, encode_example
from influence.models.losses import forward_response, per_example_loss

from .conftest import CHATML


def _example(prompt="What is 2+2?", response="4", prefix=""):
    return Example("x#0", "x", [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                   {}, response_prefix=prefix)


def _labelled_text(tokenizer, enc):
    return tokenizer.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX])


def test_tulu_format_masks_prompt(tiny):
    _, tok = tiny
    enc = encode_example(_example(), tok, 512)
    assert tok.decode(enc.input_ids) == "<|user|>\nWhat is 2+2?\n<|assistant|>\n4</s>"
    assert _labelled_text(tok, enc) == "4</s>"
    assert not enc.truncated


def test_chat_template_masks_prompt_and_prefix(tiny):
    _, tok = tiny
    tok.chat_template = CHATML
    enc = encode_example(_example(response=" B", prefix="The answer is:"), tok, 512)
    text = tok.decode(enc.input_ids)
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nThe answer is: B<|im_end|>\n"
    assert _labelled_text(tok, enc) == " B<|im_end|>\n"


def test_multi_turn_trains_every_assistant_turn(tiny):
    _, tok = tiny
    ex = Example("x#0", "x", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}], {})
    enc = encode_example(ex, tok, 512)
    assert _labelled_text(tok, enc) == "b</s>d</s>"


def test_truncation_keeps_response_tokens(tiny):
    _, tok = tiny
    enc = encode_example(_example(prompt="x" * 100, response="yz"), tok, 20)
    assert enc.truncated and len(enc.input_ids) == 20
    assert _labelled_text(tok, enc) == "yz</s>"
    short = encode_example(_example(prompt="ab", response="y" * 50), tok, 20)
    assert short.truncated and len(short.input_ids) == 20 and short.n_response_tokens > 0


def test_collate_and_per_example_loss(tiny):
    model, tok = tiny
    encs = [encode_example(_example(response="r" * n), tok, 64) for n in (1, 5)]
    batch = collate(encs, tok.pad_token_id)
    assert batch["attention_mask"].sum(1).tolist() == [len(e.input_ids) for e in encs]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses, counts = per_example_loss(logits, batch["labels"])
    assert counts.tolist() == [2, 6]  # response characters + </s>
    single = collate([encs[0]], tok.pad_token_id)
    alone, _ = per_example_loss(model(input_ids=single["input_ids"]).logits, single["labels"])
    assert abs(float(alone[0].detach()) - float(losses[0].detach())) < 1e-5


@pytest.mark.parametrize("mask", [True, False], ids=["boolean-mask", "positions"])
def test_response_only_forward_equals_full_logits(tiny, mask, monkeypatch):
    """Both ways of slicing: the boolean mask of recent transformers, and the 1-D positions that
    earlier releases (e.g. 5.17, whose Llama indexes ``hidden_states[:, positions]``) take."""
    from transformers import modeling_utils

    from influence.models import losses

    if mask and not hasattr(modeling_utils, "slice_logits_to_keep"):
        pytest.skip("this transformers release slices logits at positions only")
    monkeypatch.setattr(losses, "slices_with_mask", lambda model: mask)
    model, tok = tiny
    encs = [encode_example(_example(prompt="p" * n, response="r" * (n % 4 + 1)), tok, 64) for n in (3, 9, 14)]
    batch = collate(encs, tok.pad_token_id)
    reference, counts = per_example_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                         batch["labels"])
    forward = forward_response(model, batch)
    assert forward.logits.ndim == 2 and forward.logits.shape[0] == int(counts.sum())  # only response positions
    torch.testing.assert_close(forward.losses, reference, rtol=1e-5, atol=1e-6)
    assert forward.counts.tolist() == counts.tolist()


def test_end_of_turn_unlabelled_for_targets(tiny):
    _, tok = tiny
    target = _example(response=" B", prefix="The answer is:")
    target.label_end_of_turn = False
    assert _labelled_text(tok, encode_example(target, tok, 512)) == " B"  # Tulu format: no </s>
    tok.chat_template = CHATML
    enc = encode_example(target, tok, 512)
    assert _labelled_text(tok, enc) == " B"
    assert tok.decode(enc.input_ids).endswith("The answer is: B<|im_end|>\n")  # the marker is still in the text
