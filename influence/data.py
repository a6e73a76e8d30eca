"""Loading instruction-tuning data in the formats people already have, without conversion.

Every record becomes an :class:`Example`: a conversation (``messages``), the original record (so a
selected subset can be written back in its own format) and a stable id ``<file name>#<index>`` that
appears in every output of the toolkit.

Supported, detected per file (and, for JSON, per record):

* JSONL / JSON with ``messages: [{role, content}, ...]`` (Tulu / LESS);
* Alpaca / LIMA ``instruction`` / ``input`` / ``output`` (LIMA's ``history`` pairs become earlier turns);
* P3-style ``prompt`` / ``completion`` (a trailing literal ``<|endoftext|>`` is dropped: the template
  adds the model's own end-of-turn marker);
* FLAN chain-of-thought TSV without header: ``question <TAB> answer <TAB> rationale`` (literal ``\\n``
  in a field is a line break); the response is ``"{rationale}\\nSo the answer is {answer}."``.

Any record may carry a ``task`` field (used for target subtasks).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import DataFormatError

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One training or target example.

    ``messages`` is the conversation; the loss is taken on assistant turns only. ``response_prefix``
    is text the template puts at the start of the *last* assistant turn without training on it (LESS
    puts "The answer is:" there for MMLU). ``label_end_of_turn``: whether the end-of-turn marker the
    template adds after a response (``<|im_end|>``, ``</s>``) is part of the loss; true for training
    data (the model learns to stop), false for targets, whose gradient covers the answer alone as in LESS.
    """

    id: str
    source: str
    messages: list[dict[str, str]]
    record: dict[str, Any] = field(repr=False)
    task: str | None = None
    response_prefix: str = ""
    label_end_of_turn: bool = True
    line: int | None = None  # where the record starts in its file (JSON arrays: the record's position)
    # Multiple choice: the possible answers (the last response is one of them), e.g. MMLU's " A".." D".
    # Used to measure the correct answer's margin; not part of the gradient, so not of the content hash.
    choices: list[str] | None = None

    @property
    def response(self) -> str:
        """The last assistant turn: the answer a target's loss is taken on."""
        return [m["content"] for m in self.messages if m["role"] == "assistant"][-1]

    def with_response(self, response: str) -> Example:
        """The same example with another last response (e.g. a wrong choice), for scoring it."""
        messages = [dict(m) for m in self.messages]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        messages[last]["content"] = response
        return replace(self, messages=messages)


def _check_messages(messages: Any, path: str, line: int) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(path, "'messages' must be a non-empty list of {role, content}", line)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataFormatError(path, f"messages[{i}] needs 'role' and 'content'", line)
        if m["role"] not in ROLES:
            raise DataFormatError(path, f"messages[{i}] has unknown role {m['role']!r}", line)
        if not isinstance(m["content"], str):
            raise DataFormatError(path, f"messages[{i}].content must be a string", line)
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise DataFormatError(path, "record has no response (no non-empty assistant message)", line)
    return out


def _require_text(record: dict, key: str, path: str, line: int) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataFormatError(path, f"field '{key}' must be a string, got {type(value).__name__}", line)
    return value


def record_to_messages(record: Any, path: str, line: int) -> list[dict[str, str]]:
    """Turn one JSON record of a supported format into a conversation, or raise naming the line."""
    if not isinstance(record, dict):
        raise DataFormatError(path, f"expected a JSON object, got {type(record).__name__}", line)
    if "messages" in record:
        return _check_messages(record["messages"], path, line)
    if "instruction" in record and "output" in record:
        instruction = _require_text(record, "instruction", path, line)
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataFormatError(path, "field 'input' must be a string", line)
        output = _require_text(record, "output", path, line)
        if not output.strip():
            raise DataFormatError(path, "record has no response (empty 'output')", line)
        messages: list[dict[str, str]] = []
        for turn in record.get("history") or []:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise DataFormatError(path, "'history' must be a list of [prompt, response] pairs", line)
            messages += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
        prompt = instruction + ("\n\n" + extra if extra.strip() else "")
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        return messages
    if "prompt" in record and "completion" in record:
        prompt = _require_text(record, "prompt", path, line)
        completion = _require_text(record, "completion", path, line)
        if completion.endswith("<|endoftext|>"):
            completion = completion[: -len("<|endoftext|>")]
        if not completion.strip():
            raise DataFormatError(path, "record has no response (empty 'completion')", line)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    keys = ", ".join(sorted(record)) or "none"
    raise DataFormatError(
        path,
        f"unknown record format (keys: {keys}); expected 'messages', 'instruction'+'output', "
        "or 'prompt'+'completion'",
        line,
    )


def _json_records(path: Path, text: str) -> Iterable[tuple[int, Any]]:
    """(line number, record) for JSONL, or for a JSON array (line = position of the record)."""
    stripped = text.lstrip()
    if stripped.startswith("{") and "\n" in stripped.strip():
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):  # one pretty-printed object, not JSON Lines
            if any(k in whole for k in ("messages", "instruction", "prompt")):
                return [(1, whole)]
            keys = ", ".join(sorted(whole)[:8])
            raise DataFormatError(str(path), f"the file is one JSON object (keys: {keys}), not a list of records: "
                                  "expected a JSON array of records or JSON Lines (one record per line)", 1)
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(str(path), f"invalid JSON: {err.msg}", err.lineno) from None
        # Report the record index as "line" for arrays: there is no meaningful line per record.
        if not isinstance(data, list):
            raise DataFormatError(str(path), f"expected a JSON array of records, got {type(data).__name__}", 1)
        return [(i + 1, r) for i, r in enumerate(data)]
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataFormatError(str(path), f"malformed JSON line: {err.msg}", lineno) from None
    return records


def _tsv_records(path: Path, text: str) -> Iterable[tuple[int, dict[str, str]]]:
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    for lineno, row in enumerate(reader, start=1):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 3:
            raise DataFormatError(
                str(path), f"FLAN CoT TSV needs 3 columns (question, answer, rationale), got {len(row)}", lineno
            )
        # FLAN's TSVs write line breaks inside a field as a literal backslash-n.
        question, answer, rationale = (cell.replace("\\n", "\n") for cell in row)
        yield lineno, {"question": question, "answer": answer, "rationale": rationale}


def flan_cot_messages(record: dict[str, str], path: str, line: int) -> list[dict[str, str]]:
    if not record["answer"].strip():
        raise DataFormatError(path, "record has no response (empty answer)", line)
    response = f"{record['rationale'].strip()}\nSo the answer is {record['answer'].strip()}."
    return [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": response}]


def _check_text(messages: list[dict[str, str]], path: str, line: int) -> list[dict[str, str]]:
    """Refuse text that cannot be encoded (a lone surrogate such as a JSON ``\\ud800`` escape)."""
    for i, message in enumerate(messages):
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataFormatError(path, f"messages[{i}] contains an unpaired surrogate "
                                  f"({message['content'][err.start]!r} at character {err.start}); not valid text", line) from None
    return messages


def load_examples(path: str | Path, source: str | None = None) -> list[Example]:
    """Read one data file into examples. Raises :class:`DataFormatError` naming file and line.

    ``source`` (default: the file name) prefixes the ids: ``<source>#<index>``, index from 0 in
    file order.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(str(path), "file not found")
    source = source or path.name
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataFormatError(str(path), f"not UTF-8 text ({err.reason} at byte {err.start})", line) from None
    if not text.strip():
        raise DataFormatError(str(path), "file is empty")
    examples: list[Example] = []
    if path.suffix == ".tsv":
        for lineno, record in _tsv_records(path, text):
            messages = _check_text(flan_cot_messages(record, str(path), lineno), str(path), lineno)
            examples.append(Example(f"{source}#{len(examples)}", source, messages, record, line=lineno))
    elif path.suffix in (".jsonl", ".json"):
        for lineno, record in _json_records(path, text):
            messages = _check_text(record_to_messages(record, str(path), lineno), str(path), lineno)
            task = record.get("task")
            if task is not None and not isinstance(task, (str, int)):
                raise DataFormatError(str(path), f"field 'task' must be a string, got {type(task).__name__}", lineno)
            examples.append(Example(f"{source}#{len(examples)}", source, messages, record,
                                    task=str(task) if task not in (None, "") else None, line=lineno))
    else:
        raise DataFormatError(str(path), f"unknown file type '{path.suffix}': use .jsonl, .json or .tsv")
    if not examples:
        raise DataFormatError(str(path), "file has no records")
    return examples


def load_pool(paths: Sequence[str | Path]) -> list[Example]:
    """Load several files into one pool. Sources are file names, made unique with parent folders."""
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(names)) != len(names):
        raise DataFormatError(str(paths[0]), "the same file is given twice")
    pool: list[Example] = []
    for path, name in zip(paths, names):
        pool.extend(load_examples(path, source=name))
    return pool


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def examples_sha256(examples: Iterable[Example]) -> str:
    """Fingerprint of examples' content (ids, conversations, prefixes, tasks) in order: two stores
    hold the same examples iff these match."""
    digest = hashlib.sha256()
    for e in examples:
        fields = [e.id, e.messages, e.response_prefix, e.task, e.label_end_of_turn]
        digest.update(json.dumps(fields, ensure_ascii=False).encode())
    return digest.hexdigest()
