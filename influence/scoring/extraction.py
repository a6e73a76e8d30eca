"""``mem``: how much of an example's response the warm-up model reproduces verbatim from its prompt (Biderman et al.,
NeurIPS 2023, "Emergent and Predictable Memorization in Large Language Models", the memorization score).

The model at the warm-up's last checkpoint generates ``--window`` tokens greedily after the example's prompt
(formatted as in training); the score is the fraction of positions where the generated token equals the response's
token at that position (over the first ``--window`` response tokens, or all of them when fewer): Biderman et al.'s
score with the prompt as the prefix (they use 32 tokens of prefix and 32 of continuation on pretraining text).

Sign and scale: in [0, 1]; higher = more of the response reproduced verbatim (1: extractable from its prompt, the
model has memorised it or the answer is trivially predictable).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import setting
from ..data.templates import last_response
from ..models.loading import device_setting, parse_device
from ..models.measure import greedy_tokens
from ..train.run import Run
from .base import Method, Scores, Target

MEANING = __doc__.split("Sign and scale: ")[1].strip()


def response_tokens(example, tokenizer) -> list[int]:
    """The tokens of the example's last response, as trained."""
    encoded, start, end = last_response(example, tokenizer)
    return encoded.labels[start:end]


def memorization_score(generated: list[int], reference: list[int], window: int) -> float:
    """The fraction of the first ``window`` reference positions the generated tokens match (NaN: no response)."""
    reference = reference[:window]
    if not reference:
        return float("nan")
    return float(np.mean([i < len(generated) and generated[i] == token for i, token in enumerate(reference)]))


@dataclass(kw_only=True)
class MemOptions:
    window: int = setting(32, "Response tokens generated and compared (Biderman et al.: 32).", min=1)
    device: str | None = device_setting()


class Mem(Method):
    name = "mem"
    family = "difficulty"
    summary = "memorization score: the share of the response the warm-up model reproduces greedily (Biderman et al.)"
    meaning = MEANING
    Options = MemOptions

    def scores(self, run: Run, target: Target | None, options: MemOptions) -> Scores:
        model, tokenizer, here, checkpoint = run.load_final_model(parse_device(options.device))
        pool = run.pool()
        generated = greedy_tokens(model, tokenizer, pool, run.max_length, options.window, 8, here)
        score = np.array([memorization_score(g, response_tokens(e, tokenizer), options.window)
                          for g, e in zip(generated, pool)])
        return Scores(self.name, [e.id for e in pool], score,
                      f"share of the first {options.window} response tokens generated verbatim at {checkpoint.name} "
                      "(higher = more memorised)", finite=np.isfinite(score),
                      details={"checkpoint": checkpoint.name, "window": options.window})
