import json

import pytest

from influence.data.targets import TARGETS, load_target
from influence.errors import InfluenceError


def test_mmlu_val_is_lesss_285_dev_rows():
    examples = load_target("mmlu_val")
    assert len(examples) == 285
    assert len({e.task for e in examples}) == 57
    first = examples[0]
    assert first.task == "abstract_algebra"
    assert first.messages[0]["content"].startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\nFind all c in Z_3"
    )
    assert first.messages[0]["content"].endswith("\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:")
    assert first.messages[1]["content"] == " B" and first.response_prefix == "The answer is:"
    assert not any(e.label_end_of_turn for e in examples)  # targets: the answer's loss only


def test_bbh_and_tydiqa():
    bbh = load_target("bbh")
    assert len(bbh) == 81 and len({e.task for e in bbh}) == 27
    assert bbh[0].messages[0]["content"].count("\nA:") == 2  # two in-context exemplars
    assert bbh[0].messages[1]["content"].startswith(" Let's think step by step.")
    tydiqa = load_target("tydiqa")
    assert len(tydiqa) == 9 and {e.task for e in tydiqa} >= {"english", "swahili"}


def test_subtask_filter_and_errors(tmp_path):
    assert len(load_target("mmlu_val", ["anatomy", "astronomy"])) == 10
    with pytest.raises(InfluenceError, match="no subtask"):
        load_target("mmlu_val", ["nope"])
    with pytest.raises(InfluenceError) as info:
        load_target("mmlu_vall")
    for name in TARGETS:
        assert name in str(info.value)


def test_user_file_target_with_tasks(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": "a", "task": "t" + str(i % 2)}) for i in range(4)))
    examples = load_target(str(path))
    assert [e.task for e in examples] == ["t0", "t1", "t0", "t1"]
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    assert load_target(str(plain))[0].task == "plain"
