"""Model-rated quality: a language model or a reward model grades each pool example (the survey's model-rated family).

On the rater backend (:mod:`influence.models.raters`: a local LM or an OpenAI-compatible endpoint, every answer cached
in ``RUN/raters/cache.sqlite``, the cost printed before any call, ``--rater-dry-run``):

* ``alpagasus`` (Chen et al., ICLR 2024, "AlpaGasus: Training a Better Alpaca with Fewer Data", Fig. 3): the rater
  reads the paper's prompt (a system message asking for feedback, the instruction, input and response, and "rate
  according to the accuracy ... on a scale of 0 to 5", the score on the first line) and the score is the first number
  of the answer's first line. The paper kept the examples rated at least 4.5 (9k of Alpaca's 52k):
  ``rank --mode above --threshold 4.4``. Only the score line is asked for (``max_tokens`` 16), not the explanation.
* ``autods`` (Zhang et al., 2025, "Autonomous Data Selection with Zero-shot Generative Classifiers for Mathematical
  Texts"): each of ``--questions`` is asked as a YES/NO question about the example, and the score is the product over
  the questions of ``P(YES) = e^{l_YES} / (e^{l_YES} + e^{l_NO})`` from the first answer token's log-probabilities
  (``l``: the log-sum-exp of the top alternatives that read YES, resp. NO, whatever their case and spacing). The
  paper's questions are about mathematics; the default ones here ask the same about instruction data.

* ``qurater`` (Wettig et al., ICML 2024, "QuRating"): the rater compares pairs of examples on ``--criterion``
  ("Which of the two has more ...?"), each pair asked in both orders (A/B swapped) and the two judgments averaged,
  ``--pairs`` random partners per example; per-example scores are the Bradley-Terry strengths that best explain the
  judgments (the judged probability that A wins, from the first token's log-probabilities of A against B where given,
  else 1 / 0 / 0.5 from the answer's letter), fitted by L-BFGS with a small ridge term, mean 0.
* ``bsdetector`` (Chen & Mueller, ACL 2024, "Quantifying Uncertainty in Answers from any Language Model"): confidence
  in the example's response as ``beta O + (1 - beta) S`` (beta 0.7): the observed consistency ``O``, the mean
  similarity of ``--samples`` answers sampled at temperature 1 to the reference response (``alpha sim + (1 - alpha)
  exact``, alpha 0.8), and the self-reflection certainty ``S``, the rater's verdict on the response (correct 1,
  incorrect 0, not sure 0.5). The paper's ``sim`` is an NLI model's entailment; here it is the token F1 of the two
  answers (no NLI model is assumed to be available), a stated deviation.

Reward models (any local folder or hub id of a ``AutoModelForSequenceClassification`` with one output):

* ``reward`` (the survey's eq. 9): the reward model's score of (instruction, response), formatted by its tokenizer's
  chat template;
* ``necessity`` (eq. 43): minus the reward of the warm-up model's own greedy answer to the instruction (its last
  checkpoint): a low reward means the model cannot do it yet, so the example is needed.

Sign and scale: higher = better rated (``alpagasus``: the rating, 0 to 5; ``autods``: a probability in [0, 1];
``qurater``: a Bradley-Terry strength, mean 0, a difference of 1 = odds e to 1 of winning a comparison;
``bsdetector``: a confidence in [0, 1];
``reward``: the reward model's unbounded score) or more needed (``necessity``: minus the reward of the model's own
answer); an answer without a usable rating is unscorable (NaN, ranked last), its reason in the ``rating_error``
column, never a zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from ..config import setting
from ..data.formats import Example
from ..errors import InfluenceError
from ..models.loading import device_setting, parse_device, place
from ..models.measure import generate_responses
from ..models.raters import Answer, RaterSettings, Request, make_backend, prompt_template, say
from ..train.run import Run
from .base import RATER, REWARD_MODEL, Method, Scores, Target
from .options import seed as seed_option

MEANING = __doc__.split("Sign and scale: ")[1].strip()

ALPAGASUS_SYSTEM = ("We would like to request your feedback on the performance of AI assistant in response to the "
                    "instruction and the given input displayed following.")
ALPAGASUS_PROMPT = ("Instruction: {instruction}\nInput: {input}\nResponse: {response}\n\nPlease rate according to the "
                    "accuracy of the response to the instruction and the input. Each assistant receives a score on a "
                    "scale of 0 to 5, where a higher score indicates higher level of the accuracy. Please first output "
                    "a single line containing the value indicating the scores. In the subsequent line, please provide "
                    "a comprehensive explanation of your evaluation, avoiding any potential bias.")
AUTODS_PROMPT = ("{example}\n\nQuestion: {question}\nAnswer with YES or NO only.")
AUTODS_QUESTIONS = ["Is the response correct and does it answer the instruction well?",
                    "Would training an assistant on this example make it better at following instructions?"]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parts(example: Example) -> dict[str, str]:
    """The instruction (the user turns), the input (empty: our records keep it inside the instruction) and the
    response (the assistant turns) of an example."""
    user = "\n\n".join(m["content"] for m in example.messages if m["role"] in ("system", "user"))
    answer = "\n\n".join(m["content"] for m in example.messages if m["role"] == "assistant")
    return {"instruction": user, "input": "", "response": answer}


def alpagasus_rating(answer: Answer) -> tuple[float, str | None]:
    """The rating in the answer's first line (0 to 5), or NaN and why not."""
    if answer.error:
        return np.nan, answer.error
    line = next((text.strip().splitlines()[0] for text in answer.texts if text.strip()), "")
    found = NUMBER.search(line)
    if found is None or not 0 <= float(found.group()) <= 5:
        return np.nan, f"no rating from 0 to 5 on the answer's first line: {line[:80]!r}"
    return float(found.group()), None


def yes_probability(answer: Answer) -> tuple[float, str | None]:
    """P(YES) against NO from the first answer token's log-probabilities, or NaN and why not."""
    if answer.error:
        return np.nan, answer.error
    if not answer.first_token_logprobs:
        return np.nan, "the rater gave no log-probabilities (an endpoint without logprobs support?)"
    groups: dict[str, list[float]] = {"YES": [], "NO": []}
    for token, logprob in answer.first_token_logprobs.items():
        word = token.strip().upper()
        if word in groups:
            groups[word].append(logprob)
    if not groups["YES"] and not groups["NO"]:
        return np.nan, "neither YES nor NO among the first token's top log-probabilities"
    yes, no = (float(np.logaddexp.reduce(v)) if v else -np.inf for v in (groups["YES"], groups["NO"]))
    return float(np.exp(yes - np.logaddexp(yes, no))), None


def _rated(name: str, pool: list[Example], values: list[tuple[float, str | None]], description: str,
           details: dict) -> Scores:
    score = np.array([v for v, _ in values], dtype=np.float64)
    errors = np.array([e or "" for _, e in values], dtype=object)
    return Scores(name, [e.id for e in pool], score, description, finite=np.isfinite(score),
                  details={**details, "unscorable": int((~np.isfinite(score)).sum())},
                  columns={"rating_error": errors})


def _ask(run: Run, options: RaterSettings, requests: list[Request], what: str) -> list[Answer] | None:
    """The answers to the requests (None after a dry run), the estimate printed first."""
    backend = make_backend(options, run.path / "raters" / "cache.sqlite", getattr(options, "device", None))
    say(backend.estimate(requests, what))
    if options.rater_dry_run:
        raise InfluenceError(f"{what}: dry run (--rater-dry-run), nothing asked")
    answers = backend.answer(requests, desc=what)
    say(f"{what}: {backend.calls} call(s) made, the rest from the cache")
    return answers


@dataclass(kw_only=True)
class AlpagasusOptions(RaterSettings):
    device: str | None = device_setting()


@dataclass(kw_only=True)
class AutodsOptions(RaterSettings):
    questions: list[str] = setting(default_factory=lambda: list(AUTODS_QUESTIONS), multiple=True, flag="question",
                                   help="A YES/NO question about each example (repeat the flag for several).")
    device: str | None = device_setting()


class Alpagasus(Method):
    name = "alpagasus"
    family = "quality"
    summary = "AlpaGasus: an LLM rates the response's accuracy from 0 to 5 (Chen et al. 2024); needs --rater"
    meaning = MEANING
    needs = (RATER,)
    Options = AlpagasusOptions

    def scores(self, run: Run, target: Target | None, options: AlpagasusOptions) -> Scores:
        pool = run.pool()
        template = prompt_template(ALPAGASUS_PROMPT, options, ("instruction", "response"))
        requests = [Request(template.format(**parts(e)), ALPAGASUS_SYSTEM, max_tokens=16) for e in pool]
        answers = _ask(run, options, requests, "alpagasus")
        return _rated(self.name, pool, [alpagasus_rating(a) for a in answers],
                      "AlpaGasus accuracy rating from 0 to 5 (higher = better; the paper keeps >= 4.5)",
                      {"rater": options.rater, "rater_model": options.rater_model})


class Autods(Method):
    name = "autods"
    family = "quality"
    summary = "AutoDS: the product of P(YES) over zero-shot YES/NO questions, from the rater's log-probabilities"
    meaning = MEANING
    needs = (RATER,)
    Options = AutodsOptions

    def scores(self, run: Run, target: Target | None, options: AutodsOptions) -> Scores:
        pool = run.pool()
        template = prompt_template(AUTODS_PROMPT, options, ("example", "question"))
        text = [f"Instruction: {p['instruction']}\nResponse: {p['response']}" for p in map(parts, pool)]
        requests = [Request(template.format(example=t, question=q), max_tokens=1, top_logprobs=20)
                    for t in text for q in options.questions]
        answers = _ask(run, options, requests, "autods")
        per = len(options.questions)
        values = []
        for i in range(len(pool)):
            probabilities = [yes_probability(a) for a in answers[i * per : (i + 1) * per]]
            errors = [e for _, e in probabilities if e]
            values.append((float(np.prod([p for p, _ in probabilities])), None) if not errors else (np.nan, errors[0]))
        return _rated(self.name, pool, values, "AutoDS: product over the questions of P(YES) (higher = better)",
                      {"rater": options.rater, "questions": options.questions})


QURATER_PROMPT = ("Compare two examples of an assistant's training data, A and B, on this criterion: {criterion}\n\n"
                  "[A]\n{a}\n\n[B]\n{b}\n\nWhich of the two shows more of the criterion? Answer with a single letter, "
                  "A or B.")
BSDETECTOR_REFLECTION = ("Question: {instruction}\nProposed answer: {response}\n\nIs the proposed answer: (A) Correct "
                         "(B) Incorrect (C) I am not sure. Answer with a single letter.")
LETTER = re.compile(r"\b([ABC])\b")


def letter_probability(answer: Answer) -> tuple[float, str | None]:
    """P(A) against B from the first token's log-probabilities where given, else 1 / 0 / 0.5 from the letter."""
    if answer.error:
        return np.nan, answer.error
    if answer.first_token_logprobs:
        groups: dict[str, list[float]] = {"A": [], "B": []}
        for token, logprob in answer.first_token_logprobs.items():
            if token.strip().upper() in groups:
                groups[token.strip().upper()].append(logprob)
        if groups["A"] or groups["B"]:
            a, b = (float(np.logaddexp.reduce(v)) if v else -np.inf for v in (groups["A"], groups["B"]))
            return float(np.exp(a - np.logaddexp(a, b))), None
    found = LETTER.search((answer.texts or [""])[0].upper())
    if found is None or found.group(1) == "C":
        return np.nan, f"no A or B in the answer: {(answer.texts or [''])[0][:60]!r}"
    return (1.0 if found.group(1) == "A" else 0.0), None


def bradley_terry(n: int, pairs: list[tuple[int, int]], wins: np.ndarray, ridge: float = 1e-2) -> np.ndarray:
    """Strengths ``s`` (mean 0) maximising ``sum p_ij log sigmoid(s_i - s_j) + (1 - p_ij) log sigmoid(s_j - s_i)``
    minus ``ridge |s|^2 / 2`` (``p_ij = wins``: the judged probability that i beats j), by L-BFGS (scipy)."""
    from scipy.optimize import minimize

    first, second = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    def loss(s: np.ndarray) -> tuple[float, np.ndarray]:
        margin = s[first] - s[second]
        value = -(wins * -np.logaddexp(0, -margin) + (1 - wins) * -np.logaddexp(0, margin)).sum() + ridge * s @ s / 2
        residual = 1 / (1 + np.exp(-margin)) - wins  # d value / d margin
        grad = np.bincount(first, residual, n) - np.bincount(second, residual, n) + ridge * s
        return float(value), grad

    strengths = minimize(loss, np.zeros(n), jac=True, method="L-BFGS-B").x
    return strengths - strengths.mean()


def token_f1(a: str, b: str) -> float:
    """SQuAD's token F1 of two answers (lower-cased words)."""
    x, y = a.lower().split(), b.lower().split()
    common = sum(min(x.count(w), y.count(w)) for w in set(x))
    return 0.0 if not x or not y or not common else 2 * common / (len(x) + len(y))


@dataclass(kw_only=True)
class QuraterOptions(RaterSettings):
    criterion: str = setting("the quality of an assistant's answer: correct, helpful, clear and to the point",
                             "What the pairwise comparisons judge.")
    pairs: int = setting(4, "Random partners per example (each pair is asked in both orders).", min=1)
    seed: int = seed_option()
    device: str | None = device_setting()


@dataclass(kw_only=True)
class BsdetectorOptions(RaterSettings):
    samples: int = setting(5, "Answers sampled at temperature 1 for the observed consistency.", min=1)
    max_new_tokens: int = setting(128, "Tokens of each generated answer.", min=1)
    device: str | None = device_setting()


class Qurater(Method):
    name = "qurater"
    family = "quality"
    summary = "QuRater: Bradley-Terry strengths from pairwise LLM judgments asked in both orders (Wettig et al. 2024)"
    meaning = MEANING
    needs = (RATER,)
    Options = QuraterOptions

    def scores(self, run: Run, target: Target | None, options: QuraterOptions) -> Scores:
        pool = run.pool()
        n = len(pool)
        rng = np.random.default_rng(options.seed)
        chosen: set[tuple[int, int]] = set()
        for i in range(n):
            for j in rng.choice(n - 1, min(options.pairs, n - 1), replace=False):
                j = int(j) + int(j >= i)  # a partner other than i
                chosen.add((min(i, j), max(i, j)))
        pairs = sorted(chosen)
        text = [f"Instruction: {p['instruction']}\nResponse: {p['response']}" for p in map(parts, pool)]
        template = prompt_template(QURATER_PROMPT, options, ("criterion", "a", "b"))
        requests = [Request(template.format(criterion=options.criterion, a=text[x], b=text[y]), max_tokens=1,
                            top_logprobs=20) for i, j in pairs for x, y in ((i, j), (j, i))]
        answers = _ask(run, options, requests, "qurater")
        kept, wins, failed = [], [], []
        for k, (i, j) in enumerate(pairs):
            forward, why = letter_probability(answers[2 * k])
            backward, why_back = letter_probability(answers[2 * k + 1])
            if np.isnan(forward) or np.isnan(backward):
                failed.append(why or why_back)
                continue
            kept.append((i, j))
            wins.append((forward + 1 - backward) / 2)  # both orders: the position bias cancels
        judged = np.zeros(n, dtype=bool)
        for i, j in kept:
            judged[[i, j]] = True
        strengths = bradley_terry(n, kept, np.array(wins)) if kept else np.zeros(n)
        score = np.where(judged, strengths - strengths[judged].mean() if judged.any() else strengths, np.nan)
        return Scores(self.name, [e.id for e in pool], score,
                      f"Bradley-Terry strength on '{options.criterion}' (higher = better, mean 0)",
                      finite=np.isfinite(score),
                      details={"rater": options.rater, "pairs": len(pairs), "judged_pairs": len(kept),
                               "unjudged_pairs": len(failed), "first_failure": failed[0] if failed else None},
                      columns={"rating_error": np.where(judged, "", "no usable comparison").astype(object)})


class Bsdetector(Method):
    name = "bsdetector"
    family = "quality"
    summary = ("BSDetector: confidence in the response from sampled answers' consistency and the rater's "
               "self-reflection (Chen & Mueller 2024)")
    meaning = MEANING
    needs = (RATER,)
    Options = BsdetectorOptions

    def scores(self, run: Run, target: Target | None, options: BsdetectorOptions) -> Scores:
        pool = run.pool()
        split = [parts(e) for e in pool]
        samples = [Request(p["instruction"], max_tokens=options.max_new_tokens, temperature=1.0, n=options.samples)
                   for p in split]
        reflection = prompt_template(BSDETECTOR_REFLECTION, options, ("instruction", "response"))
        verdicts = [Request(reflection.format(**p), max_tokens=4) for p in split]
        answers = _ask(run, options, samples + verdicts, "bsdetector")
        values = []
        for p, sampled, verdict in zip(split, answers[: len(pool)], answers[len(pool):]):
            if sampled.error or verdict.error:
                values.append((np.nan, sampled.error or verdict.error))
                continue
            found = LETTER.search((verdict.texts or [""])[0].upper())
            if found is None:
                values.append((np.nan, f"no A, B or C in the self-reflection: {verdict.texts[0][:60]!r}"))
                continue
            reference = " ".join(p["response"].lower().split())
            observed = np.mean([0.8 * token_f1(t, p["response"]) + 0.2 * float(" ".join(t.lower().split()) == reference)
                                for t in sampled.texts])
            certainty = {"A": 1.0, "B": 0.0, "C": 0.5}[found.group(1)]
            values.append((0.7 * observed + 0.3 * certainty, None))
        return _rated(self.name, pool, values, "BSDetector confidence in the response, [0, 1] (higher = more "
                      "trustworthy)", {"rater": options.rater, "samples": options.samples})


# --- reward models ------------------------------------------------------------------------------------------------


def load_reward_model(name: str, device):
    """A sequence-classification reward model with one output, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise InfluenceError(f"--reward-model {name}: cannot load it ({str(err).splitlines()[0]})") from None
    if model.config.num_labels != 1:
        raise InfluenceError(f"--reward-model {name}: a reward model has one output; this one has "
                             f"{model.config.num_labels} labels")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return place(model.eval(), device)[0], tokenizer


@torch.no_grad()
def rewards(model, tokenizer, pairs: list[tuple[str, str]], device, batch_size: int = 8,
            max_length: int = 1024) -> np.ndarray:
    """The reward model's score of each (instruction, response), formatted by its chat template when it has one."""
    def text(instruction: str, response: str) -> str:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": instruction},
                                                  {"role": "assistant", "content": response}], tokenize=False)
        return f"{instruction}\n\n{response}"

    out = []
    templated = bool(getattr(tokenizer, "chat_template", None))  # the template already holds the special tokens
    for start in range(0, len(pairs), batch_size):
        batch = tokenizer([text(*p) for p in pairs[start : start + batch_size]], return_tensors="pt", padding=True,
                          truncation=True, max_length=max_length, add_special_tokens=not templated)
        out.append(model(**{k: v.to(device) for k, v in batch.items()}).logits[:, 0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


@dataclass(kw_only=True)
class RewardOptions:
    reward_model: str | None = setting(None, "A sequence-classification reward model with one output (local folder "
                                             "or hub id).")
    device: str | None = device_setting()


@dataclass(kw_only=True)
class NecessityOptions(RewardOptions):
    max_new_tokens: int = setting(128, "Tokens of each generated answer.", min=1)


def _reward_model(options: RewardOptions):
    device = parse_device(options.device)
    return (*load_reward_model(options.reward_model, device), device)


class Reward(Method):
    name = "reward"
    family = "quality"
    summary = "a reward model's score of (instruction, response) (the survey's eq. 9); needs --reward-model"
    meaning = MEANING
    needs = (REWARD_MODEL,)
    Options = RewardOptions

    def scores(self, run: Run, target: Target | None, options: RewardOptions) -> Scores:
        model, tokenizer, device = _reward_model(options)
        pool = run.pool()
        values = rewards(model, tokenizer, [(p["instruction"], p["response"]) for p in map(parts, pool)], device)
        return Scores(self.name, [e.id for e in pool], values, f"reward of (instruction, response) by "
                      f"{options.reward_model} (higher = better)", details={"reward_model": options.reward_model})


class Necessity(Method):
    name = "necessity"
    family = "quality"
    summary = ("necessity: minus the reward of the warm-up model's own answer (the survey's eq. 43: low reward = not "
               "yet learned = needed); needs --reward-model")
    meaning = MEANING
    needs = (REWARD_MODEL,)
    Options = NecessityOptions

    def scores(self, run: Run, target: Target | None, options: NecessityOptions) -> Scores:
        reward_model, reward_tokenizer, device = _reward_model(options)
        pool = run.pool()
        model, tokenizer, here, checkpoint = run.load_final_model(device)
        answers = generate_responses(model, tokenizer, pool, run.max_length, options.max_new_tokens, 8, here)
        del model
        values = rewards(reward_model, reward_tokenizer, [(parts(e)["instruction"], a) for e, a in zip(pool, answers)],
                         device)
        return Scores(self.name, [e.id for e in pool], -values,
                      f"minus the reward ({options.reward_model}) of the warm-up model's greedy answer at "
                      f"{checkpoint.name} (higher = more needed)",
                      details={"reward_model": options.reward_model, "checkpoint": checkpoint.name},
                      columns={"own_answer": np.array(answers, dtype=object)})


