"""prompt_uncertainty, dropout_ppl and readability against computations written here: response losses from the full
logits (``per_example_loss``, not the scoring path's ``forward_response``), Flesch's formula with syllables counted by
hand."""

import numpy as np
import pytest
import textstat
import torch

from influence.data.templates import collate, encode_example
from influence.models.losses import per_example_loss
from influence.scoring.base import get_method
from influence.scoring.readability import part_text
from influence.scoring.uncertainty import drop_words, linear_input_dropout, perturbed
from influence.train.run import Run


def _probabilities(model, tokenizer, examples, max_length) -> np.ndarray:
    """exp(-mean response NLL) of each example, one example per forward pass, from the full logits."""
    out = []
    for example in examples:
        batch = collate([encode_example(example, tokenizer, max_length)], tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = per_example_loss(logits, batch["labels"])
        out.append(float(torch.exp(-loss[0])))
    return np.array(out)


def test_dropping_words_is_seeded_at_its_rate_and_touches_only_the_instruction(tiny_run):
    words = [f"w{i}" for i in range(20000)]
    kept = drop_words(" ".join(words), 0.2, np.random.default_rng(0)).split()
    assert abs(1 - len(kept) / len(words) - 0.2) < 0.01 and set(kept) <= set(words)
    assert drop_words("a b c", 0.0, np.random.default_rng(1)) == "a b c"
    example = Run(tiny_run["run"]).pool()[0]
    one, again = perturbed(example, 0.5, 0, 1), perturbed(example, 0.5, 0, 1)
    assert one.messages == again.messages and [m for m in one.messages if m["role"] != "user"] == \
        [m for m in example.messages if m["role"] != "user"]
    assert any(perturbed(example, 0.5, 0, k).messages != one.messages for k in range(2, 10))


def test_prompt_uncertainty_equals_the_mean_moved_probability(tiny_run):
    run = Run(tiny_run["run"])
    method = get_method("prompt_uncertainty")
    options = method.options({"perturbations": 3, "drop_rate": 0.5, "uncertainty_label": "reference", "seed": 4})
    scores = method.scores(run, None, options)
    model, tokenizer, _, _ = run.load_final_model(torch.device("cpu"))
    pool = run.pool()[:5]
    original = _probabilities(model, tokenizer, pool, run.max_length)
    moved = np.mean([np.abs(_probabilities(model, tokenizer, [perturbed(e, 0.5, 4, k) for e in pool], run.max_length)
                            - original) for k in (1, 2, 3)], axis=0)
    np.testing.assert_allclose(scores.score[:5], moved, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(scores.columns["probability"][:5], original, rtol=1e-5)
    assert (scores.score[:5] > 0).any()
    unmoved = method.scores(run, None, method.options({"perturbations": 2, "drop_rate": 0.0,
                                                       "uncertainty_label": "reference"}))
    assert np.all(unmoved.score == 0)
    predicted = method.scores(run, None, method.options({"perturbations": 1, "max_new_tokens": 4}))
    finite = predicted.score[predicted.finite]
    assert len(finite) and np.all((finite >= 0) & (finite <= 1))


def test_dropout_ppl_is_the_perplexity_without_dropout_and_spreads_with_it(tiny_run):
    run = Run(tiny_run["run"])
    method = get_method("dropout_ppl")
    model, tokenizer, _, _ = run.load_final_model(torch.device("cpu"))
    pool = run.pool()
    plain = 1 / _probabilities(model, tokenizer, pool, run.max_length)
    still = method.scores(run, None, method.options({"passes": 2, "dropout_rate": 0.0}))
    np.testing.assert_allclose(still.score, plain, rtol=1e-5)
    np.testing.assert_allclose(still.columns["ppl_dropout_std"], 0, atol=1e-9)
    noisy = method.scores(run, None, method.options({"passes": 3, "dropout_rate": 0.3, "seed": 2}))
    again = method.scores(run, None, method.options({"passes": 3, "dropout_rate": 0.3, "seed": 2}))
    spread = method.scores(run, None, method.options({"passes": 3, "dropout_rate": 0.3, "seed": 2,
                                                      "statistic": "std"}))
    np.testing.assert_array_equal(noisy.score, again.score)
    np.testing.assert_array_equal(spread.score, noisy.columns["ppl_dropout_std"])
    assert (spread.score > 0).all() and not np.allclose(noisy.score, plain)
    np.testing.assert_allclose(noisy.columns["ppl"], plain, rtol=1e-5)
    with linear_input_dropout(model, 0.3):
        pass
    np.testing.assert_allclose(1 / _probabilities(model, tokenizer, pool[:3], run.max_length), plain[:3], rtol=1e-6)


def test_readability_is_textstat_on_the_chosen_part(tiny_run):
    # Flesch (1948): 206.835 - 1.015 words/sentence - 84.6 syllables/word; 9 one-syllable words in 2 sentences
    assert textstat.flesch_reading_ease("The cat sat on the mat. The dog ran.") == pytest.approx(
        206.835 - 1.015 * 9 / 2 - 84.6 * 9 / 9, abs=0.01)
    run = Run(tiny_run["run"])
    method = get_method("readability")
    for index, part in (("flesch_reading_ease", "response"), ("gunning_fog", "prompt")):
        scores = method.scores(run, None, method.options({"readability_index": index, "readability_text": part}))
        expected = [getattr(textstat, index)(part_text(e, part)) for e in run.pool()]
        np.testing.assert_allclose(scores.score, expected)
    assert part_text(run.pool()[0], "prompt") == "Add 0 and 1." and part_text(run.pool()[0], "response") == \
        "The sum is 1."
