import json

import pytest

from influence.data import load_examples, load_pool
from influence.errors import DataFormatError

from .conftest import write_jsonl


def test_formats_and_ids(pool_files):
    pool = load_pool(pool_files)
    assert len(pool) == 32
    assert pool[0].id == "chat.jsonl#0" and pool[0].source == "chat.jsonl"
    assert pool[12].id == "alpaca.json#0"
    assert pool[12].messages == [{"role": "user", "content": "Name a colour number 0."},
                                 {"role": "assistant", "content": "red"}]
    cot = pool[22]
    assert cot.id == "cot.tsv#0"
    assert cot.messages[1]["content"] == "0 mod 2 is 0.\nSo the answer is yes."
    assert cot.record == {"question": "Is 0 even?", "answer": "yes", "rationale": "0 mod 2 is 0."}


def test_p3_completion_and_lima_history(tmp_path):
    p3 = write_jsonl(tmp_path / "p3.jsonl", [{"prompt": "Q?\n", "completion": "Business<|endoftext|>"}])
    assert load_examples(p3)[0].messages[1]["content"] == "Business"
    lima = tmp_path / "lima.json"
    lima.write_text(json.dumps([{"instruction": "again", "input": "", "output": "ok", "history": [["hi", "hello"]]}]))
    assert [m["content"] for m in load_examples(lima)[0].messages] == ["hi", "hello", "again", "ok"]
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Translate", "input": "chat", "output": "cat"}]))
    assert load_examples(alpaca)[0].messages[0]["content"] == "Translate\n\nchat"


def test_flan_escaped_newlines(tmp_path):
    f = tmp_path / "x.tsv"
    f.write_text("Q?\\nOptions:\\n- a\ta\tbecause\\nreasons\n")
    ex = load_examples(f)[0]
    assert ex.messages[0]["content"] == "Q?\nOptions:\n- a"
    assert ex.messages[1]["content"] == "because\nreasons\nSo the answer is a."


@pytest.mark.parametrize(
    "name,content,line,fragment",
    [
        ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', 2, "malformed JSON"),
        ("noresp.jsonl", '{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": "  "}\n', 3, "no response"),
        ("nomsg.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', 1, "no response"),
        ("role.jsonl", '{"messages": [{"role": "bot", "content": "hi"}]}\n', 1, "unknown role"),
        ("unknown.jsonl", '{"text": "hello"}\n', 1, "unknown record format"),
        ("cols.tsv", "q\ta\tr\nonly two\tcolumns\n", 2, "3 columns"),
        ("empty.jsonl", "\n  \n", None, "empty"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, name, content, line, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataFormatError) as info:
        load_examples(path)
    message = str(info.value)
    assert fragment in message
    assert name in message
    if line is not None:
        assert info.value.line == line and f"{name}:{line}" in message


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataFormatError, match="unknown file type"):
        load_examples(tmp_path / "x.csv")
    with pytest.raises(DataFormatError, match="not found"):
        load_examples(tmp_path / "missing.jsonl")


def test_same_name_in_two_folders_gets_distinct_ids(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_jsonl(tmp_path / folder / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    pool = load_pool([tmp_path / "a" / "d.jsonl", tmp_path / "b" / "d.jsonl"])
    assert [e.id for e in pool] == ["a/d.jsonl#0", "b/d.jsonl#0"]
