"""Pairwise judges for instruction following: which of two responses to an instruction is better?

A judge returns the probability that the first response is the better one. :func:`preference` asks in
both orders and averages (``(p(A, B) + 1 - p(B, A)) / 2``), which cancels a judge's bias for the first
or second position. Two judges:

* :class:`LocalJudge`: a causal LM (hub id, local folder or a built-in name) reads a judging prompt and
  the probability is its softmax over the next tokens " A" and " B";
* :class:`OpenAIJudge`: any OpenAI-compatible chat-completions endpoint (``--judge
  https://host/v1 --judge-model NAME``, key from ``OPENAI_API_KEY``; the rater backend of
  :mod:`influence.models.raters`), answering "A" or "B" at temperature 0 (1.0 or 0.0; 0.5 for anything else).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..errors import InfluenceError

PROMPT = (
    "You are comparing two responses to an instruction. Judge which response follows the instruction "
    "better: helpful, correct, and to the point.\n\n[Instruction]\n{instruction}\n\n[Response A]\n{a}\n\n"
    "[Response B]\n{b}\n\nWhich response is better? Answer with a single letter, A or B."
)


class Judge(Protocol):
    def prefer_first(self, instruction: str, first: str, second: str) -> float:
        """Probability that ``first`` is the better response to ``instruction``."""


def preference(judge: Judge, instruction: str, a: str, b: str) -> float:
    """Probability that ``a`` beats ``b``, asked in both orders and averaged."""
    return 0.5 * (judge.prefer_first(instruction, a, b) + 1 - judge.prefer_first(instruction, b, a))


class LocalJudge:
    """A local causal LM as judge: softmax over its next-token logits for " A" and " B"."""

    def __init__(self, model: str, device: str | None = None):
        from ..models.loading import load_base_model, parse_device

        self.model, self.tokenizer = load_base_model(model)
        self.device = parse_device(device)
        self.model.to(self.device).eval()
        self.letters = [self._token(" A"), self._token(" B")]

    def _token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-1]  # " A" may be one token or a space then "A": the letter decides

    @torch.no_grad()
    def prefer_first(self, instruction: str, first: str, second: str) -> float:
        content = PROMPT.format(instruction=instruction, a=first, b=second)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True) + "The better response is"
        else:
            text = content + "\nThe better response is"
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -4096:]
        logits = self.model(input_ids=ids.to(self.device)).logits[0, -1].float()
        return float(torch.softmax(logits[self.letters], dim=0)[0])


class OpenAIJudge:
    """An OpenAI-compatible chat-completions endpoint as judge, through the rater backend (retries, timeouts; no
    cache: the answers compared change with every model trained)."""

    def __init__(self, base_url: str, model: str):
        from ..models.raters import EndpointBackend, RaterSettings

        self.backend = EndpointBackend(RaterSettings(rater=base_url, rater_model=model), None)

    def prefer_first(self, instruction: str, first: str, second: str) -> float:
        from ..models.raters import Request

        prompt = PROMPT.format(instruction=instruction, a=first, b=second)
        answer = self.backend.answer([Request(prompt, max_tokens=1)], progress=False)[0]
        if answer.error:
            raise InfluenceError(f"judge endpoint {self.backend.url}: no usable answer ({answer.error})")
        text = answer.texts[0].strip().upper()
        return 1.0 if text.startswith("A") else 0.0 if text.startswith("B") else 0.5


def make_judge(spec: str, model: str | None = None, device: str | None = None) -> Judge:
    """``spec`` an http(s) URL (OpenAI-compatible, with ``model``) or a model for :class:`LocalJudge`."""
    if spec.startswith(("http://", "https://")):
        if not model:
            raise InfluenceError("--judge URL needs --judge-model (the endpoint's model name)")
        return OpenAIJudge(spec, model)
    return LocalJudge(spec, device)
