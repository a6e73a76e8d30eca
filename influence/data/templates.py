"""Turning examples into token ids and loss labels.

The model's own chat template is used when its tokenizer has one; otherwise LESS's Tulu format
``<|user|>\\n{prompt}\\n<|assistant|>\\n{response}</s>``. Loss is taken on assistant turns only:
every prompt token (and the ``response_prefix``) is labelled ``-100``.

Texts are tokenised segment by segment (prompt part, response part, ...) and concatenated, so the
label boundary is exact for any tokenizer, including ones without offset mappings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import Example

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool  # the example was longer than max_length

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _segments_chat_template(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """(text, is_response) pieces rendered with the tokenizer's chat template."""
    messages = example.messages
    segments: list[tuple[str, bool]] = []
    rendered = ""
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prefix.startswith(rendered) and full.startswith(prefix)):
            raise ValueError(
                f"{example.id}: the chat template is not prefix-consistent; cannot separate prompt from response"
            )
        response = full[len(prefix):]
        if i == last_assistant and example.response_prefix:
            prefix += example.response_prefix
            if response.startswith(example.response_prefix):
                response = response[len(example.response_prefix):]
        segments.append((prefix[len(rendered):], False))
        content = message["content"]
        if not example.label_end_of_turn and response.startswith(content) and len(response) > len(content):
            segments += [(content, True), (response[len(content):], False)]  # end-of-turn marker unlabelled
        else:
            segments.append((response, True))
        rendered = full
    return segments


def _segments_tulu(example: Example, eos: str) -> list[tuple[str, bool]]:
    """LESS / open-instruct Tulu format."""
    segments: list[tuple[str, bool]] = []
    pending = ""
    last_assistant = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    for i, message in enumerate(example.messages):
        if message["role"] != "assistant":  # system, user, tool (open-instruct has no tool tag: <|tool|>)
            pending += f"<|{message['role']}|>\n{message['content'].strip()}\n"
        else:
            pending += "<|assistant|>\n"
            if i == last_assistant and example.response_prefix:
                pending += example.response_prefix
            segments.append((pending, False))
            segments.append((message["content"] + (eos if example.label_end_of_turn else ""), True))
            pending = "\n" if i != last_assistant else ""
    return segments


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_example(example: Example, tokenizer, max_length: int) -> Encoded:
    """Token ids and labels for one example, truncated to ``max_length``.

    Truncation cuts the end. If that would leave no response token (a very long prompt), the window
    is moved so it ends inside the response and keeps up to half of ``max_length`` response tokens.
    """
    if has_chat_template(tokenizer):
        segments = _segments_chat_template(example, tokenizer)
        input_ids: list[int] = []
    else:
        segments = _segments_tulu(example, tokenizer.eos_token or "")
        input_ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [IGNORE_INDEX] * len(input_ids)
    first_response = None
    for text, is_response in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if is_response and first_response is None:
            first_response = len(input_ids)
        input_ids += ids
        labels += ids if is_response else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    if truncated:
        start = 0
        if first_response is not None and first_response >= max_length:
            keep = min(len(input_ids) - first_response, max_length // 2)
            start = first_response + keep - max_length
        input_ids = input_ids[start : start + max_length]
        labels = labels[start : start + max_length]
    return Encoded(input_ids, labels, truncated)


def collate(batch: list[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label -100."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, enc in enumerate(batch):
        n = len(enc.input_ids)
        input_ids[row, :n] = torch.tensor(enc.input_ids)
        labels[row, :n] = torch.tensor(enc.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}



def last_response(example: Example, tokenizer) -> tuple[Encoded, int, int]:
    """The example encoded whole, and where its last response's labelled tokens start and end."""
    encoded = encode_example(example, tokenizer, 1 << 30)
    end = len(encoded.labels)
    while end > 0 and encoded.labels[end - 1] == IGNORE_INDEX:  # unlabelled end-of-turn marker
        end -= 1
    start = end
    while start > 0 and encoded.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return encoded, start, end


def prompt_ids(example: Example, tokenizer, max_length: int) -> list[int]:
    """The tokens before the example's last response (its prompt, formatted as in training), for
    generation: at most the last ``max_length`` of them."""
    encoded, start, _ = last_response(example, tokenizer)
    return encoded.input_ids[:start][-max_length:]
