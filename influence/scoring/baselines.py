"""The text-only baselines of LESS's table: ``random``, ``bm25`` and ``dsir``.

They read the pool (and the target) as text: every message's content, joined by new lines. None
needs a warm-up checkpoint or a gradient, so they run on any run directory in seconds.

* ``random``: a seeded uniform draw in [0, 1); the top fraction is a uniform random subset.
* ``bm25``: lexical relevance (Okapi BM25, ``bm25s``) of each pool example as a document to each
  target example as a query; mean over a subtask's queries, max over subtasks (LESS's aggregation).
  Scale: >= 0, unbounded, in BM25 units; higher = shares more (rare) words with the target.
* ``dsir``: data selection with importance resampling (Xie et al., 2023). Bag-of-words models over
  hashed unigrams and bigrams (the authors' featuriser, ``data_selection.get_ngram_counts``: nltk
  word-punct tokens, 10,000 buckets) are fitted on the target and on the pool; an example's log
  importance weight is ``log p_target(x) - log p_pool(x) = sum_j count_j(x) (log p_t,j - log p_r,j)``.
  The score is that log weight plus seeded Gumbel noise, so the top ``k`` of the score is DSIR's
  importance resampling without replacement (Gumbel top-k); the noiseless log weight is kept in the
  ``log_importance_weight`` column. Higher = more target-like. Unlike the authors' defaults, short
  examples (< 100 words) are not dropped: instruction data is mostly short.
"""

from __future__ import annotations

import logging

import numpy as np

from ..data.formats import Example
from ..data.targets import load_target
from ..train.run import Run
from .base import TARGET, Method, Scores, Target
from .options import Seeded

DSIR_BUCKETS = 10_000
DSIR_NGRAMS = 2
SMOOTHING = 1e-8  # added to bucket probabilities before the log, as in the authors' package


def example_text(example: Example) -> str:
    """The text a lexical method sees: every message's content, in order."""
    return "\n".join(m["content"] for m in example.messages)


def _subtask_index(targets: list[Example]) -> tuple[list[str], np.ndarray]:
    names = sorted({t.task or "" for t in targets})
    return names, np.array([names.index(t.task or "") for t in targets])


class RandomMethod(Method):
    name = "random"
    family = "baseline"
    summary = "a seeded uniform draw: the top fraction is a uniform random subset"
    meaning = ("random: a seeded uniform draw in [0, 1) per example; the top fraction is a uniform "
               "random subset (LESS's random baseline). The score carries no information.")
    Options = Seeded

    def scores(self, run: Run, target: Target | None, options: Seeded) -> Scores:
        pool = run.pool()
        score = np.random.default_rng(options.seed).random(len(pool))
        return Scores(method="random", ids=[e.id for e in pool], score=score, description=self.meaning,
                      details={"seed": options.seed})


class Bm25(Method):
    name = "bm25"
    family = "baseline"
    summary = "lexical relevance (Okapi BM25) of each example to the target's examples"
    meaning = __doc__.split("* ``bm25``: ")[1].split("\n* ")[0].replace("\n  ", " ")
    needs = (TARGET,)

    def scores(self, run: Run, target: Target, options) -> Scores:
        import bm25s

        # bm25s sets its logger to DEBUG on import; follow the root logger's level instead
        logging.getLogger("bm25s").setLevel(logging.getLogger().getEffectiveLevel())

        pool = run.pool()
        targets = load_target(target.name, target.task_list)
        names, task_of = _subtask_index(targets)
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize([example_text(e) for e in pool], show_progress=False), show_progress=False)
        queries = bm25s.tokenize([example_text(t) for t in targets], return_ids=False, show_progress=False)
        # (pool, targets) relevance of every pool example to every target query
        relevance = np.stack([retriever.get_scores(tokens) for tokens in queries], axis=1).astype(np.float64)
        per_task = np.stack([relevance[:, task_of == s].mean(axis=1) for s in range(len(names))], axis=1)
        return Scores(
            method="bm25",
            ids=[e.id for e in pool],
            score=per_task.max(axis=1),
            description=self.meaning,
            per_task=per_task.astype(np.float32),
            task_names=names,
            details={"target": target.name, "n_target_examples": len(targets), "bm25": "bm25s Okapi k1=1.5 b=0.75, "
                     "English stop words removed"},
        )


def hashed_ngram_counts(texts: list[str]) -> np.ndarray:
    """(len(texts), buckets) hashed unigram + bigram counts, with the DSIR authors' featuriser."""
    from data_selection.hashed_ngram_dsir import get_ngram_counts

    return np.stack([get_ngram_counts(text, n=DSIR_NGRAMS, num_buckets=DSIR_BUCKETS) for text in texts])


def dsir_log_weights(pool_counts: np.ndarray, target_counts: np.ndarray) -> np.ndarray:
    """Per pool example ``log p_target(x) - log p_pool(x)`` under the two fitted bag-of-n-gram models."""
    raw = pool_counts.sum(axis=0) / max(pool_counts.sum(), 1)
    tgt = target_counts.sum(axis=0) / max(target_counts.sum(), 1)
    log_diff = np.log(tgt + SMOOTHING) - np.log(raw + SMOOTHING)
    return pool_counts @ log_diff


class Dsir(Method):
    name = "dsir"
    family = "baseline"
    summary = "data selection with importance resampling: how target-like an example's n-grams are"
    meaning = __doc__.split("* ``dsir``: ")[1].replace("\n  ", " ").strip()
    needs = (TARGET,)
    Options = Seeded

    def scores(self, run: Run, target: Target, options: Seeded) -> Scores:
        pool = run.pool()
        targets = load_target(target.name, target.task_list)
        log_weight = dsir_log_weights(hashed_ngram_counts([example_text(e) for e in pool]),
                                      hashed_ngram_counts([example_text(t) for t in targets]))
        gumbel = np.random.default_rng(options.seed).gumbel(size=len(pool))
        return Scores(
            method="dsir",
            ids=[e.id for e in pool],
            score=log_weight + gumbel,
            description=self.meaning,
            columns={"log_importance_weight": log_weight},
            details={"target": target.name, "n_target_examples": len(targets), "seed": options.seed,
                     "buckets": DSIR_BUCKETS, "ngrams": DSIR_NGRAMS},
        )
