"""Duplicate detection at pool scale: ``near_dup``'s MinHash-LSH (ours: uint32 signatures in one array, 8-byte band
keys) against datasketch used as its README shows (a MinHash object kept per example, MinHashLSH's default keys),
and ``exact_dup``, on the same synthetic pool: ``--n`` texts of 100 words from a 5,000-word vocabulary, with 5%
near copies (one word changed: a Jaccard similarity of 5-word shingles of 91/101 = 0.90) and 2% exact copies (other
case and spacing). Each contender runs in its own process; prints seconds, peak memory, memory per example, the ratio
to ours and the recall of the planted copies.

    python scripts/bench_dedup.py --n 100000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _bench import measure, report, run_child  # noqa: E402

CONTENDERS = ["ours near_dup", "datasketch as documented", "ours exact_dup"]


def synthetic(n: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int]], list[tuple[int, int]]]:
    """Normalised texts, the planted near pairs and the planted exact pairs."""
    from influence.scoring.duplicates import SPACES

    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{k}" for k in range(5000)])
    base = int(n / 1.07)
    texts = [" ".join(rng.choice(vocabulary, 100)) for _ in range(base)]
    near, exact = [], []
    for source in rng.choice(base, n - base, replace=False):
        words = texts[source].split(" ")
        if len(near) < 5 * (n - base) // 7:
            words[rng.integers(100)] = "changed"
            near.append((int(source), len(texts)))
            texts.append(" ".join(words))
        else:
            exact.append((int(source), len(texts)))
            texts.append(SPACES.sub(" ", "  ".join(words).upper().lower()))
    return texts, near, exact


def datasketch_as_documented(texts: list[str], threshold: float, shingle: int, num_perm: int) -> list[tuple[int, int]]:
    from datasketch import MinHash, MinHashLSH

    from influence.scoring.duplicates import shingles

    lsh, kept, pairs = MinHashLSH(threshold=threshold, num_perm=num_perm), [], []
    for i, text in enumerate(texts):
        minhash = MinHash(num_perm=num_perm, seed=1)
        for gram in shingles(text, shingle):
            minhash.update(gram)
        pairs += [(j, i) for j in lsh.query(minhash) if kept[j].jaccard(minhash) >= threshold]
        lsh.insert(i, minhash)
        kept.append(minhash)
    return pairs


def child(name: str, n: int, threshold: float) -> None:
    from influence.scoring.duplicates import exact_pairs, near_pairs

    texts, near, exact = synthetic(n)
    found: list = []

    def work():
        if name == "ours near_dup":
            found[:] = near_pairs(texts, threshold, 5, 128, 1)[0]
        elif name == "ours exact_dup":
            found[:] = exact_pairs(texts)[0]
        else:
            found[:] = datasketch_as_documented(texts, threshold, 5, 128)

    result = measure(work)
    planted = exact if name == "ours exact_dup" else near + exact
    result["recall"] = len(set(planted) & set(found)) / len(planted)
    result["pairs"] = len(found)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--jaccard", type=float, default=0.8)
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    if args.only:
        child(args.only, args.n, args.jaccard)
        return
    results = {name: run_child(__file__, name, ["--n", str(args.n), "--jaccard", str(args.jaccard)])
               for name in CONTENDERS}
    report(f"duplicates: {args.n} synthetic examples of 100 words, Jaccard >= {args.jaccard}, 5-word shingles, "
           "128 permutations", results, "ours near_dup")
    for name, r in results.items():
        if "error" not in r:
            print(f"{name:<28} recall of planted copies {r['recall']:.3f}, {r['pairs']} pairs, "
                  f"{r['peak_rss_over_setup_mb'] * 2**20 / args.n:.0f} bytes per example over set-up "
                  f"(~{r['peak_rss_over_setup_mb'] / args.n * 1e6 / 1024:.1f} GB at 1M)")


if __name__ == "__main__":
    main()
