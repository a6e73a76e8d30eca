"""Loading instruction-tuning data in the formats people already have, without conversion.

Every record becomes an :class:`Example`: a conversation (``messages``), the original record (so a
selected subset can be written back in its own format) and a stable id that appears in every output
of the toolkit: the record's own ``id`` field when it has one (unique in the pool), else
``<file name>#<index>``.

Supported, detected per file (and, for JSON, per record):

* JSONL / JSON with ``messages: [{role, content}, ...]`` (Tulu / LESS; roles system, user, assistant,
  tool);
* ShareGPT ``conversations: [{from, value}, ...]`` (``human``/``gpt``/``system``/``tool``...);
* Alpaca / LIMA ``instruction`` / ``input`` / ``output`` (LIMA's ``history`` pairs become earlier turns);
* P3-style ``prompt`` / ``completion`` (a trailing literal ``<|endoftext|>`` is dropped: the template
  adds the model's own end-of-turn marker);
* FLAN chain-of-thought TSV without header: ``question <TAB> answer <TAB> rationale`` (literal ``\\n``
  in a field is a line break); the response is ``"{rationale}\\nSo the answer is {answer}."``.

Any record may carry a ``task`` field (used for target subtasks).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import DataFormatError

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speaker names (``from``) and the roles they are.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system", "tool": "tool",
                  "function": "tool", "observation": "tool", "function_call": "assistant"}


@dataclass(frozen=True)
class Columns:
    """Where a file's fields are, for records whose names differ from the known formats'. Recorded in
    the run, so every stage reads the pool the same way."""

    prompt: str | None = field(default=None, metadata={
        "flag": "prompt-column", "help": "Field holding the prompt (with --response-column), in every --train file "
                                         "(one file's own: --train FILE:prompt=F,response=G)."})
    response: str | None = field(default=None, metadata={"flag": "response-column",
                                                         "help": "Field holding the response (with --prompt-column)."})
    messages: str | None = field(default=None, metadata={
        "flag": "messages-column", "help": "Field holding the conversation ([{role, content}] or ShareGPT [{from, value}])."})

    def extra_problems(self) -> list[str]:
        if (self.prompt is None) != (self.response is None):
            return ["--prompt-column and --response-column go together"]
        if self.messages is not None and self.prompt is not None:
            return ["give --messages-column or --prompt-column/--response-column, not both"]
        return []

    def apply(self, record: Any, path: str, line: int) -> Any:
        """The record with its mapped fields under the names the formats know (the original is kept)."""
        if not isinstance(record, dict) or (self.messages is None and self.prompt is None):
            return record
        wanted = [self.messages] if self.messages is not None else [self.prompt, self.response]
        missing = [name for name in wanted if name not in record]
        if missing:
            raise DataFormatError(path, f"record has no field {missing[0]!r} (named by the column options); its "
                                  f"fields: {', '.join(sorted(record))}", line)
        if self.messages is not None:
            turns = record[self.messages]
            first = turns[0] if isinstance(turns, list) and turns else {}
            key = "conversations" if isinstance(first, dict) and "from" in first else "messages"
            return {**{k: v for k, v in record.items() if k not in ("messages", "conversations")}, key: turns}
        return {**record, "prompt": record[self.prompt], "completion": record[self.response]}


# A source with its own column mapping: ``file.jsonl:prompt=question,response=answer`` (or ``:messages=turns``).
MAPPED_SOURCE = re.compile(r"^(?P<source>.+):(?P<mapping>(?:prompt|response|messages)=[^,=:]+"
                           r"(?:,(?:prompt|response|messages)=[^,=:]+)*)$")


def split_mapping(spec: str | Path) -> tuple[str, Columns | None]:
    """A source and the column mapping written after it (``FILE:prompt=q,response=a``), or None when it has none."""
    text = str(spec)
    match = MAPPED_SOURCE.match(text)
    if match is None:
        return text, None
    fields = dict(part.split("=", 1) for part in match["mapping"].split(","))
    columns = Columns(**fields)
    if (columns.prompt is None) != (columns.response is None) or (columns.messages and columns.prompt):
        raise DataFormatError(match["source"], f"column mapping '{match['mapping']}': give prompt= with response=, "
                              "or messages= alone")
    return match["source"], columns


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


def _sharegpt_messages(turns: Any, path: str, line: int) -> list[dict[str, Any]]:
    """ShareGPT's ``conversations: [{from, value}, ...]`` as messages (also accepts role/content turns)."""
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(path, "'conversations' must be a non-empty list of {from, value}", line)
    messages = []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict) and "role" in turn and "content" in turn:
            messages.append(turn)
            continue
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataFormatError(path, f"conversations[{i}] needs 'from' and 'value'", line)
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataFormatError(path, f"conversations[{i}] has unknown speaker {turn['from']!r} (known: "
                                  f"{', '.join(sorted(SHAREGPT_ROLES))})", line)
        messages.append({"role": role, "content": turn["value"]})
    return messages


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
    if "conversations" in record:
        return _check_messages(_sharegpt_messages(record["conversations"], path, line), path, line)
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
        f"unknown record format (keys: {keys}); expected 'messages', 'conversations' (ShareGPT), "
        "'instruction'+'output', or 'prompt'+'completion'. Name the fields with --prompt-column and "
        "--response-column (or --messages-column), for every file, or for this file alone: "
        f"--train '{path}:prompt=FIELD,response=FIELD'",
        line,
    )


def _json_records(path: Path, text: str, json_array: bool) -> Iterable[tuple[int, Any]]:
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
    if json_array and stripped.startswith("["):
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


def load_examples(path: str | Path, source: str | None = None, columns: Columns | None = None) -> list[Example]:
    """Read one data file into examples. Raises :class:`DataFormatError` naming file and line.

    ``source`` (default: the file name) prefixes the ids of records without their own: ``<source>#<index>``,
    index from 0 in file order. ``columns`` names the fields of records in other layouts; a mapping written after
    the path (``file.jsonl:prompt=q,response=a``) replaces it for this file.
    """
    path, own = split_mapping(path)
    columns = own or columns
    if is_dataset_spec(path):
        return _examples_from_records(Path(str(path)), _dataset_records(str(path)), source or source_name(path), columns)
    path = Path(path)
    if path.is_dir():
        raise DataFormatError(str(path), "a folder, but not one written by the datasets library's save_to_disk")
    if not path.is_file():
        raise DataFormatError(str(path), "file not found")
    source = source or path.name
    kind = file_kind(path)
    if kind in ("parquet", "csv"):
        records = _parquet_records(path) if kind == "parquet" else _csv_records(path)
        return _examples_from_records(path, records, source, columns)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataFormatError(str(path), f"not a readable gzip file ({err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataFormatError(str(path), f"not UTF-8 text ({err.reason} at byte {err.start})", line) from None
    if not text.strip():
        raise DataFormatError(str(path), "file is empty")
    examples: list[Example] = []
    if kind == "tsv":
        for lineno, record in _tsv_records(path, text):
            messages = _check_text(flan_cot_messages(record, str(path), lineno), str(path), lineno)
            examples.append(Example(f"{source}#{len(examples)}", source, messages, record, line=lineno))
    else:
        return _examples_from_records(path, _json_records(path, text, json_array=kind == "json"), source, columns)
    if not examples:
        raise DataFormatError(str(path), "file has no records")
    return examples


KINDS = {".jsonl": "jsonl", ".json": "json", ".tsv": "tsv", ".parquet": "parquet", ".csv": "csv"}


def file_kind(path: Path) -> str:
    """The data format of a file by its suffix (``.gz`` looks at the one before it)."""
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    kind = KINDS.get(suffixes[0].lower()) if suffixes else None
    if kind is None:
        raise DataFormatError(str(path), f"unknown file type '{''.join(suffixes) or path.name}': use .jsonl, .json, "
                              ".tsv (each optionally .gz), .parquet or .csv")
    if path.suffix == ".gz" and kind not in ("jsonl", "json", "tsv"):
        raise DataFormatError(str(path), f"gzip is read for .jsonl, .json and .tsv files, not .{kind}")
    return kind


def _examples_from_records(path: Path, records: Iterable[tuple[int, Any]], source: str,
                           columns: Columns | None = None) -> list[Example]:
    """Examples from (line, record) pairs of any record format (JSON, Parquet, CSV rows)."""
    examples = []
    columns = columns or Columns()
    for lineno, record in records:
        mapped = columns.apply(record, str(path), lineno)
        messages = _check_text(record_to_messages(mapped, str(path), lineno), str(path), lineno)
        task = record.get("task")
        if task is not None and not isinstance(task, (str, int)):
            raise DataFormatError(str(path), f"field 'task' must be a string, got {type(task).__name__}", lineno)
        examples.append(Example(_record_id(record, f"{source}#{len(examples)}", str(path), lineno), source,
                                messages, record, task=str(task) if task not in (None, "") else None, line=lineno))
    if not examples:
        raise DataFormatError(str(path), "file has no records")
    _check_unique_ids(examples, str(path))
    return examples


def _parquet_records(path: Path) -> list[tuple[int, dict]]:
    """(row number, record) of a Parquet file, read with pyarrow (nested columns as lists and dicts)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a damaged or foreign file
        raise DataFormatError(str(path), f"not a readable Parquet file ({str(err).splitlines()[0]})") from None
    return [(i + 1, {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(rows)]


def _csv_records(path: Path) -> list[tuple[int, dict]]:
    """(line, record) of a CSV file with a header row; empty cells count as absent."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            return [(reader.line_num, {k: v for k, v in row.items() if k is not None and v not in (None, "")})
                    for row in reader]
    except UnicodeDecodeError as err:
        raise DataFormatError(str(path), f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise DataFormatError(str(path), f"not a readable CSV file ({err})") from None


def _record_id(record: dict, default: str, path: str, line: int) -> str:
    """A record's own ``id`` (string or integer) when it has one, else ``<file>#<index>``."""
    value = record.get("id")
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(path, f"field 'id' must be a string or an integer, got {type(value).__name__}", line)
    return str(value)


def _check_unique_ids(examples: list[Example], where: str) -> None:
    """Ids name examples in every output: two examples with one id would be confused."""
    seen: dict[str, Example] = {}
    for example in examples:
        first = seen.setdefault(example.id, example)
        if first is not example:
            raise DataFormatError(where, f"id {example.id!r} is used twice ({first.source} line {first.line} and "
                                  f"{example.source} line {example.line}); ids must be unique", example.line)


DEMO_POOL = ("flan_cot_sample.tsv", "p3_sample.jsonl")


def demo_pool_files() -> list[str]:
    """The embedded demo pool: small samples of FLAN-CoT and P3 (Apache-2.0), vendored in the package."""
    from importlib import resources

    folder = resources.files("influence.resources").joinpath("demo")
    return [str(folder.joinpath(name)) for name in DEMO_POOL]


def load_pool(paths: Sequence[str | Path], columns: Columns | None = None) -> list[Example]:
    """Load several sources (files, ``save_to_disk`` folders, ``hf:<id>[:<split>]``) into one pool. Sources
    are file names, made unique with parent folders."""
    problems = (columns or Columns()).extra_problems()
    if problems:
        raise DataFormatError(str(paths[0]) if paths else "--train", "; ".join(problems))
    specs = [str(p) for p in paths]
    paths = [Path(split_mapping(p)[0]) for p in specs]
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(names)) != len(names):
        raise DataFormatError(str(paths[0]), "the same file is given twice")
    pool: list[Example] = []
    for spec, name in zip(specs, names):
        pool.extend(load_examples(spec, source=name, columns=columns))
    if len(paths) > 1:
        _check_unique_ids(pool, ", ".join(names))
    return pool


def examples_from_records(records: Sequence[dict], source: str = "records", columns: Columns | None = None) -> list[Example]:
    """Examples from in-memory records (any supported record format), as if read from a file named
    ``source``: ids are the records' own or ``<source>#<index>``."""
    return _examples_from_records(Path(source), [(i + 1, r) for i, r in enumerate(records)], source, columns)


def write_records(records: Sequence[dict], path: Path) -> Path:
    """In-memory records as a JSONL file (so a run that trained on them can read them again)."""
    examples_from_records(records, path.name)  # refuse bad records before writing anything
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


HUB_PREFIX = "hf:"


def is_hub_spec(spec: str) -> bool:
    """``hf:<org>/<name>[:<split>]``: a dataset on the Hugging Face hub (split ``train`` by default)."""
    return spec.startswith(HUB_PREFIX)


def _is_dataset_folder(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict of splits)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _folder_and_split(text: str) -> tuple[Path, str]:
    """A local source as (path, split): ``folder:split`` names one split of a DatasetDict folder; a path
    that exists as given has no split."""
    if Path(text).exists() or ":" not in text:
        return Path(text), ""
    folder, _, split = text.rpartition(":")
    return Path(folder), split


def is_dataset_spec(spec: str | Path) -> bool:
    """A Hugging Face dataset: a hub spec, or a ``save_to_disk`` folder (``folder:split`` for one split)."""
    text = str(spec)
    return is_hub_spec(text) or _is_dataset_folder(_folder_and_split(text)[0])


def source_name(spec: str | Path) -> str:
    """The name an example's id and ``source`` carry: the file or folder name, or the hub id (and split)."""
    text = str(spec)
    return text[len(HUB_PREFIX):] if is_hub_spec(text) else Path(text).name


def _load_dataset(spec: str):
    """A ``datasets.Dataset`` from a hub spec or a ``save_to_disk`` folder (``folder:split`` for a
    DatasetDict), through the ``datasets`` library."""
    try:
        import datasets
    except ImportError:
        raise DataFormatError(spec, "reading Hugging Face datasets needs the datasets library: pip install datasets") from None
    if is_hub_spec(spec):
        name, _, split = spec[len(HUB_PREFIX):].partition(":")
        try:
            return datasets.load_dataset(name, split=split or "train")
        except Exception as err:  # the hub client raises many kinds (offline, no such dataset, no such split)
            raise DataFormatError(spec, f"cannot load it from the Hugging Face hub ({str(err).splitlines()[0]}); "
                                  "offline, save it with save_to_disk and give the folder") from None
    folder, split = _folder_and_split(spec)
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as err:  # a damaged folder: datasets raises several kinds
        raise DataFormatError(spec, f"not a readable save_to_disk folder ({str(err).splitlines()[0]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) == 1 and not split:
            return next(iter(loaded.values()))
        if split not in loaded:
            raise DataFormatError(spec, f"holds the splits {', '.join(loaded)}: name one as {folder}:<split>")
        return loaded[split]
    return loaded


def _dataset_records(spec: str) -> list[tuple[int, dict]]:
    """(row number, record) of a Hugging Face dataset."""
    return [(i + 1, {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(_load_dataset(spec))]


def source_sha256(spec: str | Path) -> str:
    """What identifies a data source's content: a file's sha256, a folder's over its files, or for a
    hub dataset the ``datasets`` fingerprint of the split (loaded from the local cache)."""
    text = split_mapping(spec)[0]
    if is_hub_spec(text):
        return "datasets:" + _load_dataset(text)._fingerprint
    path, split = _folder_and_split(text)
    if path.is_dir():
        digest = hashlib.sha256(split.encode())
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path)}|{file_sha256(file)}|".encode())
        return digest.hexdigest()
    return file_sha256(path)


def source_exists(spec: str | Path) -> bool:
    text = split_mapping(spec)[0]
    return is_hub_spec(text) or Path(text).exists() or is_dataset_spec(text)


def resolved_source(spec: str | Path) -> str:
    """A source as the run records it: files and folders by absolute path, hub specs as given (a column mapping after
    it kept)."""
    text = split_mapping(spec)[0]
    mapping = str(spec)[len(text):]
    if is_hub_spec(text):
        return text + mapping
    folder, split = _folder_and_split(text) if is_dataset_spec(text) else (Path(text), "")
    return str(folder.resolve()) + (f":{split}" if split else "") + mapping


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
