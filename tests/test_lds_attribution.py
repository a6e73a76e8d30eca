"""`evaluate lds` on attribution matrices from other tools: read in any id order and format, scored exactly as
our own methods' Attribution, and refused (naming the file, before any model is trained) when they do not
cover the run's pool and the target."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from influence.cli import main
from influence.errors import InfluenceError
from influence.evaluate.lds import evaluate_lds
from influence.scoring import attribution
from influence.train.run import Run
from influence.train.subset_store import stored_subsets

HELD = {"k": 5, "bootstrap": 50, "progress": False}  # the held-out models test_counterfactual's LDS test trains too


def wide(matrix: np.ndarray, pool_ids, target_ids) -> pd.DataFrame:
    return pd.DataFrame({"id": list(pool_ids), **{t: matrix[:, j] for j, t in enumerate(target_ids)}})


def long(matrix: np.ndarray, pool_ids, target_ids) -> pd.DataFrame:
    return pd.DataFrame([{"pool_id": p, "target_id": t, "score": matrix[i, j]}
                         for i, p in enumerate(pool_ids) for j, t in enumerate(target_ids)])


@pytest.fixture(scope="module")
def tracin(engine_run, tmp_path_factory):
    """TracIn's attribution, written by 'another tool' in three formats with shuffled pool and target order."""
    ours = attribution("tracin", engine_run["run"], engine_run["target"])
    rng = np.random.default_rng(0)
    rows, columns = rng.permutation(len(ours.pool_ids)), rng.permutation(len(ours.target_ids))
    matrix = ours.matrix[np.ix_(rows, columns)]
    pool_ids, target_ids = np.array(ours.pool_ids)[rows], np.array(ours.target_ids)[columns]
    folder = tmp_path_factory.mktemp("attrib")
    wide(matrix, pool_ids, target_ids).to_csv(folder / "wide.csv", index=False)
    long(matrix, pool_ids, target_ids).sample(frac=1, random_state=0).to_parquet(folder / "long.parquet")
    np.savez(folder / "tool.npz", matrix=matrix, pool_ids=pool_ids, target_ids=target_ids)
    wide(-matrix, pool_ids, target_ids).set_index("id").to_parquet(folder / "negated.parquet")  # ids as the index
    return {"attribution": ours, "folder": folder, "matrix": matrix, "pool_ids": pool_ids, "target_ids": target_ids}


def test_a_tools_matrix_scores_exactly_as_the_method_itself(engine_run, tracin):
    folder = tracin["folder"]
    files = [str(folder / name) for name in ("wide.csv", "long.parquet", "tool.npz", "negated.parquet")]
    report = evaluate_lds(engine_run["run"], engine_run["target"], ["tracin", *files], **HELD)
    table = report.table.set_index("method")
    labels = [f"{folder.name}/{name}" for name in ("wide.csv", "long.parquet", "tool.npz", "negated.parquet")]
    assert list(table.index) == ["tracin", *labels]
    assert np.isfinite(table.loc["tracin", "lds"]) and table.loc["tracin", "n_targets"] > 0
    for label in labels[:3]:
        assert table.loc[label, "effects"] == "attribution file"
        for column in ("lds", "ci_low", "ci_high", "n_subsets", "n_targets"):
            assert table.loc[label, column] == table.loc["tracin", column], (label, column)
        np.testing.assert_array_equal(report.per_target[label], report.per_target["tracin"])
    # the sign is kept: scores that mean the opposite score the opposite
    np.testing.assert_allclose(report.per_target[labels[3]], -report.per_target["tracin"])
    assert not report.notes
    summary = json.loads((report.folder / "lds.json").read_text())
    assert [m["method"] for m in summary["methods"]] == ["tracin", *labels]


def test_nan_entries_count_as_zero_and_are_noted(engine_run, tracin, tmp_path):
    matrix = tracin["matrix"].copy()
    matrix[[0, 3, 5], [1, 2, 1]] = np.nan
    wide(matrix, tracin["pool_ids"], tracin["target_ids"]).to_csv(tmp_path / "holes.csv", index=False)
    wide(np.nan_to_num(matrix), tracin["pool_ids"], tracin["target_ids"]).to_csv(tmp_path / "zeros.csv", index=False)
    report = evaluate_lds(engine_run["run"], engine_run["target"], [str(tmp_path / "holes.csv"),
                                                                     str(tmp_path / "zeros.csv")], **HELD)
    holes, zeros = f"{tmp_path.name}/holes.csv", f"{tmp_path.name}/zeros.csv"
    np.testing.assert_array_equal(report.per_target[holes], report.per_target[zeros])
    assert report.notes == [f"{holes}: 3 of its {matrix.size} effects are NaN (unscorable; counted as 0)"]


def bad_files(tracin, folder):
    """(file, what its error says) for each way an attribution file can be wrong."""
    matrix, pool_ids, target_ids = tracin["matrix"], list(tracin["pool_ids"]), list(tracin["target_ids"])
    table = wide(matrix, pool_ids, target_ids)
    cases = []

    def add(name, write, message):
        path = folder / name
        write(path)
        cases.append((path, message))

    add("bare.npy", lambda p: np.save(p, matrix), "a bare .npy matrix has no pool and target ids")
    add("stranger.csv", lambda p: pd.concat([table, table.head(1).assign(id="nowhere.jsonl#7")]).to_csv(p, index=False),
        r"1 pool id\(s\) are not in this run's pool: nowhere.jsonl#7")
    dropped = [i for i in tracin["attribution"].pool_ids if i in pool_ids[:2]]  # named in the run's order
    add("partial.csv", lambda p: table.iloc[2:].to_csv(p, index=False),
        rf"2 of the {len(pool_ids)} pool examples are missing: {dropped[0]}, {dropped[1]};")
    add("twice.csv", lambda p: pd.concat([table, table.tail(1)]).to_csv(p, index=False),
        rf"1 pool id\(s\) appear more than once: {pool_ids[-1]}")
    add("twocols.csv", lambda p: p.write_text(table.to_csv(index=False).replace(target_ids[1], target_ids[0], 1)),
        f"duplicate column\\(s\\) {target_ids[0]}")
    add("other_target.csv", lambda p: table.assign(**{"elsewhere#0": 1.0}).to_csv(p, index=False),
        r"1 target id\(s\) are not in the target's examples .*: elsewhere#0")
    add("fewer_targets.parquet", lambda p: table.drop(columns=[target_ids[2]]).to_parquet(p),
        rf"1 of the {len(target_ids)} target examples are missing: {target_ids[2]}")
    add("text.csv", lambda p: table.assign(**{target_ids[0]: "high"}).to_csv(p, index=False),
        rf"{len(pool_ids)} value\(s\) are not numbers, e.g. 'high' in column {target_ids[0]}")
    add("infinite.csv", lambda p: table.assign(**{target_ids[3]: np.inf}).to_csv(p, index=False),
        rf"{len(pool_ids)} value\(s\) are infinite")
    add("noid.csv", lambda p: table.rename(columns={"id": "example"}).to_csv(p, index=False),
        "neither a ranking .* nor an attribution matrix")
    pairs = long(matrix, pool_ids, target_ids)
    add("pair_twice.parquet", lambda p: pd.concat([pairs, pairs.head(1)]).to_parquet(p),
        rf"1 \(pool_id, target_id\) pair\(s\) appear more than once: \('{pool_ids[0]}', '{target_ids[0]}'\)")
    add("pair_missing.csv", lambda p: pairs.iloc[1:].to_csv(p, index=False),
        rf"1 \(pool_id, target_id\) pair\(s\) of its ids have no row: \('{pool_ids[0]}', '{target_ids[0]}'\)")
    add("nomatrix.npz", lambda p: np.savez(p, scores=matrix, pool_ids=pool_ids, target_ids=target_ids), "no array matrix")
    add("transposed.npz", lambda p: np.savez(p, matrix=matrix.T, pool_ids=pool_ids, target_ids=target_ids),
        r"matrix is \(6, 23\), pool_ids \(23,\) and target_ids \(6,\)")
    return cases


def test_bad_attribution_files_are_refused_naming_the_file_before_any_training(engine_run, tracin, tmp_path):
    run = engine_run["run"]
    cases = bad_files(tracin, tmp_path)
    for path, message in cases:
        with pytest.raises(InfluenceError, match=message) as caught:
            evaluate_lds(run, engine_run["target"], ["random", str(path)], heldout="never", **HELD)
        assert str(path) in str(caught.value), caught.value
    # a file for the whole target is refused for one subtask
    with pytest.raises(InfluenceError, match=r"3 target id\(s\) are not in the target's examples"):
        evaluate_lds(run, engine_run["target"], [str(tracin["folder"] / "tool.npz")], heldout="never", target_tasks=["math"],
                     **HELD)
    assert "never" not in stored_subsets(Run(run).subsets_path)  # refused before the held-out models were trained


def test_the_command_line_takes_an_attribution_file(engine_run, tracin):
    runner = CliRunner()
    common = ["evaluate", "lds", "--run", engine_run["run"], "--target", engine_run["target"], "--k", "5"]
    wide_csv = str(tracin["folder"] / "wide.csv")
    result = runner.invoke(main, [*common, "--methods", f"tracin,{wide_csv}", "--bootstrap", "20", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(result.stdout)}
    label = f"{tracin['folder'].name}/wide.csv"
    assert rows[label]["effects"] == "attribution file" and np.isfinite(rows[label]["lds"])
    assert rows[label]["lds"] == rows["tracin"]["lds"]
    result = runner.invoke(main, [*common, "--attribution", wide_csv, "--bootstrap", "20", "--json"])
    assert result.exit_code == 0, result.output
    assert [row["method"] for row in json.loads(result.stdout)] == [label]  # the file alone, not the default methods
    assert json.loads(result.stdout)[0]["lds"] == rows[label]["lds"]
    result = runner.invoke(main, [*common, "--methods", str(tracin["folder"] / "tool.npy"), "--heldout", "never"])
    assert result.exit_code == 2 and "is neither a method" in result.output
    bare = tracin["folder"] / "matrix.npy"
    np.save(bare, tracin["matrix"])
    result = runner.invoke(main, [*common, "--methods", str(bare), "--heldout", "never"])
    assert result.exit_code == 2, result.output
    assert f"error: {bare}: a bare .npy matrix has no pool and target ids" in result.output
