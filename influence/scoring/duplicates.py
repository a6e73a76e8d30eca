"""Duplicates in the pool: exact copies (``exact_dup``) and near copies by MinHash-LSH (``near_dup``).

Both compare an example's text (``--dedup-text``: the whole conversation, each turn's role and content, by default;
or the prompt or the response alone: the same prompt with different answers is a conflict worth seeing, not a copy
of the whole example) after normalisation: Unicode NFKC, lower case, runs of whitespace as one space.

* ``exact_dup``: examples whose normalised texts are equal (SHA-256 of the text) form a group.
* ``near_dup``: Broder's MinHash of each text's word ``--shingle``-grams (``datasketch``; ``--num-perm`` hash
  functions, seeded), candidate pairs from locality-sensitive hashing tuned to ``--jaccard``, kept where the
  signatures' estimated Jaccard similarity is at least ``--jaccard``; the groups are the connected components of
  those pairs (as Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better", with 5-gram shingles
  and threshold 0.8 on web text). Memory: the signatures, ``num_perm`` 4-byte values per example, and LSH's
  buckets of 8-byte band keys; no pairwise matrix (``scripts/bench_dedup.py`` measures it).

Each group keeps its first example in pool order; the others are its duplicates. Sign and scale: higher = more
redundant: 0 for an example with no duplicate and for the example each group keeps; for the others, the largest
similarity to another member of their group, in (0, 1] (``exact_dup``: 1; ``near_dup``: estimated Jaccard, at least
``--jaccard``). So ``rank --mode below --threshold`` (``near_dup``: its ``--jaccard``; ``exact_dup``: any value in
(0, 1]) keeps one example per group, and ``duplicates.parquet`` beside the ranking lists every group (its members,
the one kept, each one's similarity).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..config import setting
from ..data.formats import Example
from ..train.run import Run
from .base import Method, Scores, Target

MEANING = __doc__.split("Sign and scale: ")[1].split(" So ``rank")[0]
TextPart = Literal["all", "prompt", "response"]
SPACES = re.compile(r"\s+")


def example_text(example: Example, part: str) -> str:
    """The normalised text of an example (module docstring): every turn, or the user turns, or the assistant's."""
    roles = {"all": None, "prompt": {"system", "user"}, "response": {"assistant"}}[part]
    turns = [f"{m['role']}: {m['content']}" if roles is None else m["content"] for m in example.messages
             if roles is None or m["role"] in roles]
    return SPACES.sub(" ", unicodedata.normalize("NFKC", "\n".join(turns)).lower()).strip()


def shingles(text: str, n: int) -> set[bytes]:
    """The word ``n``-grams of a text (the whole text as one shingle when it has fewer than ``n`` words)."""
    tokens = text.split(" ")
    if len(tokens) < n:
        return {text.encode()}
    return {" ".join(tokens[i : i + n]).encode() for i in range(len(tokens) - n + 1)}


def groups_of(n: int, pairs: list[tuple[int, int]], similarity: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the duplicate ``pairs`` over ``n`` items: (component label per item, the largest
    similarity of each item to another member of its component, 0 for items in no pair)."""
    best = np.zeros(n)
    if not pairs:
        return np.arange(n), best
    rows, cols = np.array(pairs).T
    _, labels = connected_components(coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(n, n)), directed=False)
    values = np.asarray(similarity, dtype=np.float64)
    np.maximum.at(best, rows, values)
    np.maximum.at(best, cols, values)
    return labels, best


def exact_pairs(texts: list[str]) -> tuple[list[tuple[int, int]], list[float]]:
    """Each text paired with the first one equal to it."""
    first: dict[bytes, int] = {}
    pairs = []
    for i, text in enumerate(texts):
        key = hashlib.sha256(text.encode()).digest()
        if key in first:
            pairs.append((first[key], i))
        else:
            first[key] = i
    return pairs, [1.0] * len(pairs)


def _band_key(data: bytes) -> bytes:
    """LSH's bucket key of a band: 8 bytes of BLAKE2b instead of the band's 8 bytes per hash value (the pairs it
    proposes are checked on the signatures, so a rare collision costs nothing)."""
    return hashlib.blake2b(data, digest_size=8).digest()


def near_pairs(texts: list[str], jaccard: float, shingle: int, num_perm: int, seed: int
               ) -> tuple[list[tuple[int, int]], list[float]]:
    """Pairs whose MinHash signatures estimate a Jaccard similarity of at least ``jaccard`` among LSH's candidates
    (each text queried against the earlier ones), and those estimates. Memory: the signatures (4 bytes per hash:
    datasketch's values are below 2**32) and LSH's buckets."""
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=jaccard, num_perm=num_perm, hashfunc=_band_key)
    signatures = np.empty((len(texts), num_perm), dtype=np.uint32)
    pairs, values = [], []
    for i, text in enumerate(texts):
        minhash = MinHash(num_perm=num_perm, seed=seed)
        minhash.update_batch(sorted(shingles(text, shingle)))
        signature = LeanMinHash(minhash)
        signatures[i] = signature.hashvalues
        for j in lsh.query(signature):
            estimate = float(np.mean(signatures[j] == signatures[i]))
            if estimate >= jaccard:
                pairs.append((j, i))
                values.append(estimate)
        lsh.insert(i, signature, check_duplication=False)
    return pairs, values


def duplicate_scores(name: str, examples: list[Example], pairs: list[tuple[int, int]], similarity: list[float],
                     description: str, details: dict) -> Scores:
    """:class:`Scores` of the module docstring from the duplicate pairs, with ``duplicates`` (every group's members)
    as a table beside the ranking."""
    labels, best = groups_of(len(examples), pairs, similarity)
    _, first, sizes = np.unique(labels, return_index=True, return_counts=True)
    kept = np.zeros(len(examples), dtype=bool)
    kept[first] = True  # np.unique's first index of each label: the first member in pool order
    size = sizes[np.searchsorted(np.unique(labels), labels)]
    score = np.where(kept, 0.0, best)
    in_group = size > 1
    table = pd.DataFrame({"group": labels[in_group], "id": [e.id for e, g in zip(examples, in_group) if g],
                          "kept": kept[in_group], "similarity": best[in_group], "group_size": size[in_group]})
    table = table.sort_values(["group", "kept"], ascending=[True, False], kind="stable").reset_index(drop=True)
    return Scores(name, [e.id for e in examples], score, description,
                  details={**details, "groups": int((sizes > 1).sum()), "duplicates": int((~kept).sum()),
                           "keep_one_per_group": "rank --mode below --threshold "
                                                 + str(details.get("jaccard", 0.5))},
                  columns={"duplicate": ~kept, "group": labels, "group_size": size}, tables={"duplicates": table})


@dataclass(kw_only=True)
class ExactOptions:
    dedup_text: TextPart = setting("all", "What two examples must share to be duplicates: all (every turn), prompt "
                                          "(the system and user turns) or response (the assistant's).")


@dataclass(kw_only=True)
class NearOptions(ExactOptions):
    jaccard: float = setting(0.8, "Estimated Jaccard similarity of word shingles from which two examples are near "
                                  "duplicates.", min=0, max=1, min_open=True)
    shingle: int = setting(5, "Words per shingle.", min=1)
    num_perm: int = setting(128, "MinHash permutations (more: a closer estimate, more memory).", min=16)
    minhash_seed: int = setting(1, "Seed of the MinHash permutations.")


class ExactDup(Method):
    name = "exact_dup"
    family = "diversity"
    summary = "exact duplicates: examples whose normalised text equals an earlier one's"
    meaning = MEANING
    Options = ExactOptions

    def scores(self, run: Run, target: Target | None, options: ExactOptions) -> Scores:
        pool = run.pool()
        pairs, similarity = exact_pairs([example_text(e, options.dedup_text) for e in pool])
        return duplicate_scores(self.name, pool, pairs, similarity,
                                f"1 for a copy of an earlier example's {options.dedup_text} text (normalised), else 0; "
                                "higher = redundant", {"text": options.dedup_text})


class NearDup(Method):
    name = "near_dup"
    family = "diversity"
    summary = "near duplicates by MinHash-LSH over word shingles (Broder 1997; Lee et al. 2022)"
    meaning = MEANING
    Options = NearOptions

    def scores(self, run: Run, target: Target | None, options: NearOptions) -> Scores:
        pool = run.pool()
        texts = [example_text(e, options.dedup_text) for e in pool]
        pairs, similarity = near_pairs(texts, options.jaccard, options.shingle, options.num_perm, options.minhash_seed)
        return duplicate_scores(self.name, pool, pairs, similarity,
                                f"largest estimated Jaccard similarity of {options.shingle}-word shingles to another "
                                f"member of the example's near-duplicate group (at least {options.jaccard:g}), 0 for "
                                "the example each group keeps and for unique ones; higher = redundant",
                                {"text": options.dedup_text, "jaccard": options.jaccard, "shingle": options.shingle,
                                 "num_perm": options.num_perm})
