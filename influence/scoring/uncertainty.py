"""Uncertainty of the warm-up model about an example, from forward passes under perturbation (target-free).

``prompt_uncertainty`` (Kung et al., EMNLP 2023, "Active Instruction Tuning: Improving Cross-Task Generalization by
Training on Prompt Sensitive Tasks"; the survey's eq. 42). The model at the warm-up's last checkpoint answers each
example's prompt greedily (``--uncertainty-label prediction``, the paper's setting without labels) or is given the
example's own response (``reference``). The instruction is then perturbed ``--perturbations`` times: each word of the
user turns is dropped independently with probability ``--drop-rate`` (their code's ``random_drop_word``, default
rate 0.2 and 20 perturbations as in their runs), seeded by (``--seed``, the example's id, the perturbation). The
paper perturbs a task's definition, not an instance's input; a pool example's user turn holds both, so both are
perturbed here. With
``p_k = exp(-mean NLL of the label's tokens)`` under perturbation ``k`` and ``p_0`` under the original prompt, the
score is ``mean_k |p_k - p_0|``: their ``abs`` "bald" variant (the sentence probability is the geometric mean of the
token probabilities, as their trainer computes it). The paper scores tasks (averaging over a task's instances); here
each example is scored (a task's score is the mean of its examples', a ``groupby`` of scores.csv). The column
``probability`` is ``p_0``, the other axis of the paper's Task Map (prompt-uncertain = ambiguous; prompt-certain with
low probability = difficult; the paper finds the first helps and the second does not).

``dropout_ppl`` (the survey's eq. 8: perplexity under Monte Carlo dropout, Gal & Ghahramani 2016). The response's
perplexity is measured ``--passes`` times with dropout of rate ``--dropout-rate`` on the input of every linear layer
(causal LMs of the LLaMA family have no dropout layers of their own to switch on, so it is added, as a forward
pre-hook, for the passes only; pass ``k`` is seeded by (``--seed``, ``k``)). The score is the mean of the passes'
perplexities (``--statistic mean``) or their standard deviation (``std``, the spread MC dropout reads as the model's
uncertainty); the columns hold both and the perplexity without dropout.

Sign and scale: ``prompt_uncertainty`` in [0, 1], higher = the model's answer is more sensitive to how the instruction
is worded (the paper selects the highest); ``dropout_ppl`` >= 1 with ``mean`` (higher = harder under dropout), >= 0
with ``std`` (higher = less certain).
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..config import setting
from ..data.formats import Example
from ..data.templates import encode_example
from ..models.loading import device_setting, parse_device
from ..models.measure import generate_responses, measure
from ..train.run import Run
from .base import Method, Scores, Target
from .options import seed as seed_option

PROMPT_MEANING = "in [0, 1]; higher = the model's answer is more sensitive to the instruction's wording"
DROPOUT_MEANING = ("perplexity of the response under MC dropout: >= 1 with --statistic mean (higher = harder), "
                   "its spread over the passes >= 0 with std (higher = less certain)")
BATCH = 8


def drop_words(text: str, rate: float, rng: np.random.Generator) -> str:
    """``text`` with each whitespace-separated word dropped independently with probability ``rate`` (Active-IT's
    ``random_drop_word`` without masking)."""
    return " ".join(word for word in text.split() if rng.uniform() >= rate)


def perturbed(example: Example, rate: float, seed: int, k: int) -> Example:
    """The example with words dropped from its user turns, drawn from (seed, the example's id, k)."""
    rng = np.random.default_rng([seed, zlib.crc32(example.id.encode()), k])
    messages = [{**m, "content": drop_words(m["content"], rate, rng)} if m["role"] == "user" else dict(m)
                for m in example.messages]
    return Example(**{**vars(example), "messages": messages})


def response_losses(model, tokenizer, examples: list[Example], max_length: int, device) -> np.ndarray:
    """Mean NLL of each example's last response (nats/token), one forward pass each."""
    return encoded_losses(model, tokenizer, [encode_example(e, tokenizer, max_length) for e in examples], device)


def encoded_losses(model, tokenizer, encoded: list, device) -> np.ndarray:
    """:func:`response_losses` of examples already encoded (a pass repeated over the same examples encodes once)."""
    return measure(model, encoded, tokenizer.pad_token_id, BATCH, device)["loss"]


@dataclass(kw_only=True)
class PromptUncertaintyOptions:
    perturbations: int = setting(20, "Perturbed instructions per example (Active-IT: 20).", min=1)
    drop_rate: float = setting(0.2, "Probability of dropping each word of the instruction (Active-IT: 0.2).", min=0,
                               max=1, max_open=True)
    uncertainty_label: Literal["prediction", "reference"] = setting(
        "prediction", "What the probabilities are of: the model's greedy answer to the original prompt (the paper's) "
                      "or the example's own response.")
    max_new_tokens: int = setting(128, "Tokens of each generated answer.", min=1)
    seed: int = seed_option()
    device: str | None = device_setting()


class PromptUncertainty(Method):
    name = "prompt_uncertainty"
    family = "difficulty"
    summary = "prompt uncertainty: how much the answer's probability moves when instruction words are dropped " \
              "(Kung et al. 2023)"
    meaning = PROMPT_MEANING
    Options = PromptUncertaintyOptions

    def scores(self, run: Run, target: Target | None, options: PromptUncertaintyOptions) -> Scores:
        model, tokenizer, here, checkpoint = run.load_final_model(parse_device(options.device))
        pool = run.pool()
        if options.uncertainty_label == "prediction":
            answers = generate_responses(model, tokenizer, pool, run.max_length, options.max_new_tokens, BATCH, here)
            labelled = [e.with_response(a) for e, a in zip(pool, answers)]
        else:
            labelled = pool
        original = np.exp(-response_losses(model, tokenizer, labelled, run.max_length, here))
        moved = np.zeros(len(pool))
        for k in range(1, options.perturbations + 1):
            variants = [perturbed(e, options.drop_rate, options.seed, k) for e in labelled]
            moved += np.abs(np.exp(-response_losses(model, tokenizer, variants, run.max_length, here)) - original)
        score = moved / options.perturbations
        if options.uncertainty_label == "prediction":  # an empty answer has no probability to move
            score[[not a for a in answers]] = np.nan
        finite = np.isfinite(score)
        return Scores(self.name, [e.id for e in pool], np.where(finite, score, np.nan),
                      f"mean |p_k - p_0| of the {options.uncertainty_label}'s probability over {options.perturbations} "
                      f"instructions with words dropped at rate {options.drop_rate:g}, at {checkpoint.name} "
                      "(higher = more prompt-sensitive)", finite=finite,
                      details={"checkpoint": checkpoint.name, "perturbations": options.perturbations,
                               "drop_rate": options.drop_rate, "label": options.uncertainty_label,
                               "seed": options.seed},
                      columns={"probability": original})


@contextlib.contextmanager
def linear_input_dropout(model: torch.nn.Module, rate: float):
    """Dropout of ``rate`` on the input of every linear layer while the block runs (removed after)."""
    def drop(module, inputs):
        return (torch.nn.functional.dropout(inputs[0], rate, training=True), *inputs[1:])

    handles = [m.register_forward_pre_hook(drop) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(kw_only=True)
class DropoutPplOptions:
    passes: int = setting(10, "Forward passes with dropout per example.", min=2)
    dropout_rate: float = setting(0.1, "Dropout on the input of every linear layer during the passes.", min=0, max=1,
                                  max_open=True)
    statistic: Literal["mean", "std"] = setting("mean", "The score: the passes' mean perplexity, or its standard "
                                                        "deviation over the passes.")
    seed: int = seed_option()
    device: str | None = device_setting()


class DropoutPpl(Method):
    name = "dropout_ppl"
    family = "difficulty"
    summary = "perplexity of the response under Monte Carlo dropout (the survey's eq. 8), its mean or its spread"
    meaning = DROPOUT_MEANING
    Options = DropoutPplOptions

    def scores(self, run: Run, target: Target | None, options: DropoutPplOptions) -> Scores:
        model, tokenizer, here, checkpoint = run.load_final_model(parse_device(options.device))
        pool = run.pool()
        encoded = [encode_example(e, tokenizer, run.max_length) for e in pool]
        plain = np.exp(encoded_losses(model, tokenizer, encoded, here))
        passes = []
        devices = [here] if torch.device(here).type == "cuda" else []  # the passes leave the global RNGs as they were
        with linear_input_dropout(model, options.dropout_rate), torch.random.fork_rng(devices=devices):
            for k in range(options.passes):
                torch.manual_seed(options.seed * 100_003 + k)
                passes.append(np.exp(encoded_losses(model, tokenizer, encoded, here)))
        passes = np.stack(passes)
        mean, spread = passes.mean(axis=0), passes.std(axis=0, ddof=1)
        score = mean if options.statistic == "mean" else spread
        finite = np.isfinite(score)
        return Scores(self.name, [e.id for e in pool], np.where(finite, score, np.nan),
                      f"{options.statistic} of the response's perplexity over {options.passes} passes with dropout "
                      f"{options.dropout_rate:g} on every linear layer's input, at {checkpoint.name}", finite=finite,
                      details={"checkpoint": checkpoint.name, "passes": options.passes,
                               "dropout_rate": options.dropout_rate, "statistic": options.statistic,
                               "seed": options.seed},
                      columns={"ppl_dropout_mean": mean, "ppl_dropout_std": spread, "ppl": plain})
