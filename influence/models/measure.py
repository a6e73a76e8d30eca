"""What a trained model does on each example: the outcomes the counterfactual engine records.

Per example, from one forward pass with dropout off (the model in eval mode):

* ``loss``: mean NLL of the response tokens (nats/token), as training minimises it;
* ``accuracy``: fraction of response tokens the model predicts by argmax (teacher forcing);
* ``probability``: ``exp(-loss)``, the geometric mean of the response tokens' probabilities
  (a smooth "is it right" in [0, 1] that does not vanish for long responses, unlike the sequence's);

and, for multiple-choice examples (``Example.choices``, e.g. MMLU's letters), from the same pass when
every choice is a single token after the same prompt (the letters), else from one more pass per choice:

* ``margin``: ``log p(correct) - log sum_{c != correct} p(c)``, each choice's log-likelihood being the
  sum over its response tokens: TRAK's classification margin over the choices (> 0: the correct
  answer is more likely than all the others together);
* ``choice_correct``: 1 where the correct choice has the highest log-likelihood (multiple-choice
  accuracy by answer log-likelihood), else 0.

Both are NaN for examples that are not multiple choice.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

from ..data.formats import Example
from ..data.templates import IGNORE_INDEX, Encoded, collate, encode_example, prompt_ids
from .losses import forward_response

# What a model is measured on per example (see the module docstring); written once, used by every stage.
Outcome = Literal["loss", "accuracy", "probability", "margin", "choice_correct"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)
# Whether a higher value of an outcome is better (the loss is the one to lower).
HIGHER_IS_BETTER = {"loss": False, "accuracy": True, "probability": True, "margin": True, "choice_correct": True}


def choice_margin(log_likelihoods: torch.Tensor, right: int) -> torch.Tensor:
    """``margin`` (module docstring) from the choices' log-likelihoods: the right one's minus the log-sum-exp of the
    others'. Differentiable (``influence metagrad --measure margin`` takes its derivative)."""
    others = torch.cat([log_likelihoods[:right], log_likelihoods[right + 1 :]])
    return log_likelihoods[right] - torch.logsumexp(others, dim=0)


def encode_choices(examples: list[Example], tokenizer, max_length: int) -> list[list[Encoded] | None]:
    """For each multiple-choice example, one encoding per choice (its response replaced); else None."""
    return [[encode_example(e.with_response(c), tokenizer, max_length) for c in e.choices] if e.choices else None
            for e in examples]


@torch.no_grad()
def _losses(model, encoded: list[Encoded], pad_token_id: int, batch_size: int, device,
            first_rows: set[int] = frozenset()) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """(mean response loss, response-token accuracy, response tokens) per encoding, in order, and for
    the encodings in ``first_rows`` the log-probabilities over the vocabulary at their first response
    position."""
    losses, accuracy, counts, first = [], [], [], {}
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[start : start + batch_size], pad_token_id).items()}
        forward = forward_response(model, batch)
        correct = (forward.logits.argmax(dim=-1) == forward.targets).float()
        losses.append(forward.losses.double().cpu().numpy())  # exact for every dtype; float64 models stay exact
        accuracy.append(forward.per_example(correct).cpu().numpy())
        counts.append(forward.counts.cpu().numpy())
        offsets = (torch.cumsum(forward.counts, 0) - forward.counts).tolist()
        for j, offset in enumerate(offsets):
            if start + j in first_rows and forward.counts[j] > 0:
                first[start + j] = torch.log_softmax(forward.logits[offset].double(), dim=-1).cpu().numpy()
    if not losses:
        return np.zeros(0), np.zeros(0), np.zeros(0), first
    return np.concatenate(losses), np.concatenate(accuracy), np.concatenate(counts), first


def single_token_choices(options: list[Encoded]) -> list[int] | None:
    """The choices' tokens when every choice is one response token after the same prompt (MMLU's
    letters): their log-likelihoods then come from one forward pass. Else None."""
    tokens, prefix = [], None
    for encoding in options:
        positions = [i for i, label in enumerate(encoding.labels) if label != IGNORE_INDEX]
        if len(positions) != 1:
            return None
        here = encoding.input_ids[: positions[0]]
        if prefix is not None and here != prefix:
            return None
        prefix = here
        tokens.append(encoding.labels[positions[0]])
    return tokens if len(set(tokens)) == len(tokens) else None


@torch.no_grad()
def measure(model, encoded: list[Encoded], pad_token_id: int, batch_size: int, device,
            choices: list[list[Encoded] | None] | None = None, correct: list[int | None] | None = None
            ) -> dict[str, np.ndarray]:
    """Every outcome of :data:`OUTCOMES` for each example (see the module docstring). ``choices[j]``
    are example j's encodings per choice and ``correct[j]`` the index of its right answer."""
    choices = choices or [None] * len(encoded)
    single = {j: single_token_choices(options) for j, options in enumerate(choices) if options is not None}
    single = {j: tokens for j, tokens in single.items() if tokens is not None}
    was_training = model.training
    model.eval()
    try:
        loss, accuracy, _, first = _losses(model, encoded, pad_token_id, batch_size, device, set(single))
        margin = np.full(len(encoded), np.nan)
        choice_correct = np.full(len(encoded), np.nan)
        scores: dict[int, np.ndarray] = {j: first[j][tokens] for j, tokens in single.items()}
        rest = [j for j, options in enumerate(choices) if options is not None and j not in single]
        if rest:  # multi-token choices: one pass per choice
            flat = [enc for j in rest for enc in choices[j]]
            choice_loss, _, choice_tokens, _ = _losses(model, flat, pad_token_id, batch_size, device)
            log_likelihood = -(choice_loss * choice_tokens)
            offset = 0
            for j in rest:
                scores[j] = log_likelihood[offset : offset + len(choices[j])]
                offset += len(choices[j])
        for j, values in scores.items():
            right = correct[j]
            margin[j] = float(choice_margin(torch.from_numpy(np.asarray(values, dtype=np.float64)), right))
            choice_correct[j] = float(np.argmax(values) == right)
    finally:
        model.train(was_training)
    return {"loss": loss, "accuracy": accuracy, "probability": np.exp(-loss), "margin": margin,
            "choice_correct": choice_correct}


def correct_choices(examples: list[Example]) -> list[int | None]:
    """Index of each example's response among its choices (None when not multiple choice)."""
    return [e.choices.index(e.response) if e.choices else None for e in examples]


@torch.no_grad()
def greedy_tokens(model, tokenizer, examples: list[Example], max_length: int, max_new_tokens: int, batch_size: int,
                  device) -> list[list[int]]:
    """The tokens ``model`` generates greedily after each example's prompt (formatted as in training; the generated
    ones only, at most ``max_new_tokens``), in evaluation mode."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    out = []
    try:
        for start in range(0, len(examples), batch_size):
            prompts = [prompt_ids(e, tokenizer, max_length) for e in examples[start : start + batch_size]]
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            attention = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, ids in enumerate(prompts):  # left padding: every prompt ends where generation starts
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention[row, width - len(ids):] = 1
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            out += [row[width:].tolist() for row in output.cpu()]
    finally:
        model.train(was_training)
    return out


def generate_responses(model, tokenizer, examples: list[Example], max_length: int, max_new_tokens: int,
                       batch_size: int, device) -> list[str]:
    """Greedy responses of ``model`` to the examples' prompts (formatted as in training), for judges."""
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip()
            for tokens in greedy_tokens(model, tokenizer, examples, max_length, max_new_tokens, batch_size, device)]
