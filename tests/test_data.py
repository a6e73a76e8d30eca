import json

import pytest

from influence.data.formats import load_examples, load_pool
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
    (tmp_path / "x.txt").write_text("a,b\n")
    with pytest.raises(DataFormatError, match="unknown file type"):
        load_examples(tmp_path / "x.txt")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataFormatError, match="x.csv: file has no records"):
        load_examples(tmp_path / "x.csv")
    with pytest.raises(DataFormatError, match="not found"):
        load_examples(tmp_path / "missing.jsonl")


def test_same_name_in_two_folders_gets_distinct_ids(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_jsonl(tmp_path / folder / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    pool = load_pool([tmp_path / "a" / "d.jsonl", tmp_path / "b" / "d.jsonl"])
    assert [e.id for e in pool] == ["a/d.jsonl#0", "b/d.jsonl#0"]


# Files in the formats people have (issue 11): Parquet, CSV, gzip, ShareGPT, their own ids and field names.

RECORDS = [{"prompt": f"Add {i} and 2.", "completion": f"{i + 2}", "task": "add"} for i in range(5)]


def _messages(examples):
    return [e.messages for e in examples]


def test_parquet_csv_and_gzip_read_like_jsonl(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    reference = load_examples(write_jsonl(tmp_path / "p.jsonl", RECORDS))
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text("prompt,completion,task\n" + "".join(
        f'"{r["prompt"]}",{r["completion"]},{r["task"]}\n' for r in RECORDS), encoding="utf-8")
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress((tmp_path / "p.jsonl").read_bytes()))
    (tmp_path / "p.json.gz").write_bytes(gzip.compress(json.dumps(RECORDS).encode()))
    for name in ("p.parquet", "p.csv", "p.jsonl.gz", "p.json.gz"):
        examples = load_examples(tmp_path / name)
        assert _messages(examples) == _messages(reference), name
        assert [e.task for e in examples] == ["add"] * 5 and examples[2].id == f"{name}#2"
    assert load_examples(tmp_path / "p.csv")[1].line == 3  # the header is line 1
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    pq.write_table(pa.Table.from_pylist([{"messages": messages}]), tmp_path / "m.parquet")
    assert load_examples(tmp_path / "m.parquet")[0].messages == messages  # nested columns
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match="bad.parquet: not a readable Parquet file"):
        load_examples(tmp_path / "bad.parquet")
    (tmp_path / "x.xlsx").write_bytes(b"")
    with pytest.raises(DataFormatError, match="unknown file type '.xlsx'"):
        load_examples(tmp_path / "x.xlsx")


def test_sharegpt_conversations_and_tool_turns(tmp_path):
    path = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": "get_weather()"}, {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "Sunny."}]}])
    example = load_examples(path)[0]
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert example.response == "Sunny."
    tool = write_jsonl(tmp_path / "tool.jsonl", [{"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}]}])
    assert load_examples(tool)[0].messages[1]["role"] == "tool"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "alien", "value": "?"}]}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl:1.*unknown speaker 'alien'"):
        load_examples(bad)


def test_tool_turns_in_the_tulu_format_are_prompt():
    from transformers import ByT5Tokenizer

    from influence.data.formats import Example
    from influence.data.templates import IGNORE_INDEX, encode_example

    example = Example("x", "x", [{"role": "user", "content": "2+2?"}, {"role": "tool", "content": "4"},
                                 {"role": "assistant", "content": "four"}], {})
    tokenizer = ByT5Tokenizer()
    encoded = encode_example(example, tokenizer, 256)
    labelled = tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])
    assert labelled.startswith("four") and "<|tool|>\n4" in tokenizer.decode(encoded.input_ids)


def test_a_records_own_id_is_kept_and_must_be_unique(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"id": "planted_15", **RECORDS[0]}, RECORDS[1], {"id": 7, **RECORDS[2]}])
    assert [e.id for e in load_examples(path)] == ["planted_15", "ids.jsonl#1", "7"]
    twice = write_jsonl(tmp_path / "twice.jsonl", [{"id": "a", **RECORDS[0]}, {"id": "a", **RECORDS[1]}])
    with pytest.raises(DataFormatError, match=r"twice.jsonl:2: id 'a' is used twice \(twice.jsonl line 1 and "):
        load_examples(twice)
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "planted_15", **RECORDS[3]}])
    with pytest.raises(DataFormatError, match="id 'planted_15' is used twice"):
        load_pool([path, other])
    with pytest.raises(DataFormatError, match="field 'id' must be a string or an integer"):
        load_examples(write_jsonl(tmp_path / "listid.jsonl", [{"id": [1], **RECORDS[0]}]))


def test_column_mapping(tmp_path):
    from influence.data.formats import Columns

    (tmp_path / "qa.csv").write_text("question,answer\nWhat is 2+2?,4\nWhat is 3+3?,6\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="unknown record format"):
        load_pool([tmp_path / "qa.csv"])
    pool = load_pool([tmp_path / "qa.csv"], Columns(prompt="question", response="answer"))
    assert pool[1].messages == [{"role": "user", "content": "What is 3+3?"}, {"role": "assistant", "content": "6"}]
    assert pool[1].record == {"question": "What is 3+3?", "answer": "6"}  # the original record is kept
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"dialogue": [{"from": "human", "value": "hi"},
                                                                 {"from": "gpt", "value": "yo"}]}])
    assert load_pool([chats], Columns(messages="dialogue"))[0].response == "yo"
    with pytest.raises(DataFormatError, match=r"qa.csv:2: record has no field 'prompt_text'"):
        load_pool([tmp_path / "qa.csv"], Columns(prompt="prompt_text", response="answer"))
    with pytest.raises(DataFormatError, match="go together"):
        load_pool([tmp_path / "qa.csv"], Columns(prompt="question"))


def test_column_mapping_is_recorded_by_the_warmup_and_followed(tmp_path):
    from influence.data.formats import Columns
    from influence.models.loading import LoraSettings
    from influence.train.run import Run
    from influence.train.warmup import WarmupConfig, warmup

    (tmp_path / "qa.csv").write_text("question,answer\n" + "".join(f"What is {i}+1?,{i + 1}\n" for i in range(6)),
                                     encoding="utf-8")
    warmup(WarmupConfig(model="tiny-llama", train_files=[str(tmp_path / "qa.csv")], out=str(tmp_path / "run"),
                        fraction=1.0, epochs=1, batch_size=4, grad_accum=1, max_length=64,
                        lora=LoraSettings(4, 8, 0.0, ["q_proj"]), columns=Columns(prompt="question", response="answer")),
           progress=False)
    pool = Run(tmp_path / "run").pool()
    assert len(pool) == 6 and pool[0].messages[0]["content"] == "What is 0+1?"


def test_mmlu_csv_files_are_targets(tmp_path):
    from influence.data.targets import load_target

    path = tmp_path / "anatomy_dev.csv"
    path.write_text('"Which bone?",femur,ulna,skull,rib,A\n"Which organ?",heart,lung,liver,skin,D\n', encoding="utf-8")
    examples = load_target(str(path))
    assert [e.task for e in examples] == ["anatomy", "anatomy"] and examples[1].response == " D"
    assert examples[0].choices == [" A", " B", " C", " D"] and "about anatomy" in examples[0].messages[0]["content"]


def test_hugging_face_datasets(tmp_path, monkeypatch):
    import datasets

    from influence.models.loading import LoraSettings
    from influence.train.run import Run
    from influence.train.warmup import WarmupConfig, warmup

    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "one"))
    examples = load_examples(tmp_path / "one")
    assert _messages(examples) == _messages(load_examples(write_jsonl(tmp_path / "p.jsonl", RECORDS)))
    assert examples[0].id == "one#0" and examples[0].task == "add"
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:3]),
                                   "test": datasets.Dataset.from_list(RECORDS[3:])})
    splits.save_to_disk(str(tmp_path / "both"))
    with pytest.raises(DataFormatError, match="holds the splits train, test: name one as"):
        load_examples(tmp_path / "both")
    assert len(load_examples(f"{tmp_path / 'both'}:test")) == 2
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataFormatError, match="not one written by the datasets library"):
        load_examples(tmp_path / "plain")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataFormatError, match="hf:nobody/nothing: cannot load it from the Hugging Face hub"):
        load_examples("hf:nobody/nothing")
    warmup(WarmupConfig(model="tiny-llama", train_files=[f"{tmp_path / 'both'}:train"], out=str(tmp_path / "run"),
                        fraction=1.0, epochs=1, batch_size=4, grad_accum=1, max_length=64,
                        lora=LoraSettings(4, 8, 0.0, ["q_proj"])), progress=False)
    run = Run(tmp_path / "run")
    run.check_data_unchanged()
    assert len(run.pool()) == 3
