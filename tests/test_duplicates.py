"""exact_dup and near_dup: the groups equal those of an independent computation (hashes of the normalised texts;
exact Jaccard similarity of every pair's shingle sets), and ``rank`` writes the groups and keeps one per group."""

import itertools

import numpy as np
import pandas as pd
from click.testing import CliRunner

from influence.cli import main
from influence.data.formats import Example
from influence.scoring.duplicates import exact_pairs, example_text, groups_of, near_pairs, shingles


def _example(i: int, prompt: str, response: str) -> Example:
    return Example(id=f"e{i}", source="test", record=i, messages=[{"role": "user", "content": prompt},
                                                                  {"role": "assistant", "content": response}])


def _partition(labels) -> set[frozenset[int]]:
    """The groups of more than one item, as sets of indices."""
    groups: dict = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, set()).add(i)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def _pool(n: int = 120, seed: int = 0) -> list[Example]:
    """Random texts of 40 words, and near copies of some (1 or 2 words changed: Jaccard of 5-word shingles about
    0.7-0.9) and exact copies with other case and spacing."""
    rng = np.random.default_rng(seed)
    vocabulary = [f"w{k}" for k in range(500)]
    pool = [_example(i, "Write.", " ".join(rng.choice(vocabulary, 40))) for i in range(n)]
    for k in range(0, 30, 3):
        words = example_text(pool[k], "response").split(" ")
        words[20] = "changed"
        pool.append(_example(len(pool), "Write.", " ".join(words)))
        pool.append(_example(len(pool), "WRITE. ", "  ".join(pool[k].messages[1]["content"].upper().split(" "))))
    return pool


def test_exact_groups_equal_those_of_the_normalised_texts():
    pool = _pool()
    texts = [example_text(e, "all") for e in pool]
    labels, best = groups_of(len(pool), *exact_pairs(texts))
    expected: dict = {}
    for i, text in enumerate(texts):
        expected.setdefault(text, set()).add(i)
    assert _partition(labels) == {frozenset(g) for g in expected.values() if len(g) > 1}
    assert len(_partition(labels)) == 10 and set(np.unique(best)) == {0.0, 1.0}


def test_near_groups_equal_the_exact_jaccard_components():
    pool = _pool()
    texts = [example_text(e, "all") for e in pool]
    sets = [shingles(t, 5) for t in texts]
    jaccard = {(i, j): len(sets[i] & sets[j]) / len(sets[i] | sets[j]) for i, j in itertools.combinations(range(len(pool)), 2)}
    threshold = 0.6
    # no pair near the threshold, so MinHash's estimation error cannot decide the test
    assert not any(abs(value - threshold) < 0.15 for value in jaccard.values())
    true_pairs = [pair for pair, value in jaccard.items() if value >= threshold]
    expected, _ = groups_of(len(pool), true_pairs, [jaccard[p] for p in true_pairs])
    pairs, estimates = near_pairs(texts, threshold, 5, 128, 1)
    labels, _ = groups_of(len(pool), pairs, estimates)
    assert _partition(labels) == _partition(expected) and len(_partition(expected)) == 10
    for (i, j), estimate in zip(pairs, estimates):
        assert abs(estimate - jaccard[(i, j)]) < 0.2  # MinHash's estimate, 128 permutations


def test_rank_writes_the_groups_and_keeps_one_per_group(tmp_path):
    from influence.models.loading import LoraSettings, ModelLoading
    from influence.train.warmup import WarmupConfig, warmup

    from .conftest import write_jsonl

    pool = _pool(40)
    data = write_jsonl(tmp_path / "pool.jsonl", [{"messages": e.messages} for e in pool])
    run = tmp_path / "run"
    warmup(WarmupConfig(model="tiny-llama", train_files=[str(data)], out=str(run), lora=LoraSettings(4, 16, 0.0, ["q_proj"]),
                        fraction=0.1, epochs=1, batch_size=4, max_length=64, loading=ModelLoading(dtype="fp32")),
           progress=False)
    out = tmp_path / "near"
    result = CliRunner().invoke(main, ["rank", "--run", str(run), "--method", "near_dup", "--jaccard", "0.6",
                                       "--mode", "below", "--threshold", "0.6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    groups = pd.read_parquet(out / "duplicates.parquet")
    assert groups.groupby("group")["kept"].sum().eq(1).all() and groups["group"].nunique() == 10
    selected = [line for line in (out / "selected.jsonl").read_text().splitlines() if line]
    assert len(selected) == len(pool) - int((~groups["kept"]).sum())  # one per group, and every unique example
    line = groups["id"].str.split("#").str[-1].astype(int)  # the pool order (ids are file#line)
    assert (groups.loc[groups["kept"], "id"].tolist() == groups.loc[line.groupby(groups["group"]).idxmin(), "id"].tolist())
