"""Target (validation) sets that the pool is ranked against.

Built-in targets are LESS's, vendored in the package so they work offline:

* ``mmlu_val``: the 285 MMLU dev rows (57 subjects x 5), LESS's prompt, subtask = subject;
* ``bbh``: BIG-Bench Hard three-shot file, each of the 3 exemplars of 27 tasks with the other two as
  in-context examples, subtask = task;
* ``tydiqa``: TyDiQA-GoldP one-shot, one example for each of 9 languages, subtask = language.

Any data file (see :mod:`influence.data.formats`) is also a target; a ``task`` field per record gives
subtasks, otherwise the whole file is one task. As in LESS, a target's loss (and so its gradient)
covers the answer tokens only, without the end-of-turn marker that training examples learn.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import DataFormatError, InfluenceError
from .formats import Example, load_examples

MMLU_CHOICES = ("A", "B", "C", "D")


def _resource_dir(*parts: str) -> Path:
    return Path(str(resources.files("influence.resources").joinpath("targets", *parts)))


def _one_turn(example_id: str, prompt: str, answer: str, record: dict, task: str, response_prefix: str,
              choices: list[str] | None = None) -> Example:
    """A built-in target example: one user turn, the answer as the assistant turn (source = the
    target's name, the part of the id before '/')."""
    return Example(
        id=example_id,
        source=example_id.split("/", 1)[0],
        messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        record=record,
        task=task,
        response_prefix=response_prefix,
        choices=choices,
    )


def _mmlu(folder: Path, suffix: str, name: str, limit: int | None) -> list[Example]:
    """MMLU rows in LESS's prompt (subject header, question, lettered choices, ``Answer:``; the answer
    letter after ``The answer is:``), multiple choice over the four letters."""
    return [e for path in sorted(folder.glob(f"*{suffix}")) for e in _mmlu_file(path, path.name[: -len(suffix)], name, limit)]


def _mmlu_file(path: Path, subject: str, name: str, limit: int | None) -> list[Example]:
    """One MMLU CSV file (no header; question, four choices, answer letter) of ``subject``."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    examples = []
    for row_index, row in enumerate(rows[:limit]):
        if len(row) != 6 or row[5] not in MMLU_CHOICES:
            raise DataFormatError(str(path), "an MMLU row has 6 columns (question, 4 choices, answer letter A-D)",
                                  row_index + 1)
        question, *choices, answer = row
        prompt = header + question
        for letter, choice in zip(MMLU_CHOICES, choices):
            prompt += f"\n{letter}. {choice}"
        prompt += "\nAnswer:"
        record = {"question": question, "choices": choices, "answer": answer, "subject": subject}
        examples.append(_one_turn(f"{name}/{subject}#{row_index}", prompt, " " + answer, record, subject,
                                  response_prefix="The answer is:", choices=[" " + c for c in MMLU_CHOICES]))
    return examples


def _is_mmlu_csv(path: Path) -> bool:
    """MMLU's own CSV layout: no header, six columns, the last an answer letter."""
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        first = next(csv.reader(fh), [])
    return len(first) == 6 and first[5] in MMLU_CHOICES


def load_mmlu_val() -> list[Example]:
    return _mmlu(_resource_dir("mmlu"), "_dev.csv", "mmlu_val", 5)


def load_bbh() -> list[Example]:
    prompts = json.loads(_resource_dir("bbh", "bbh-three-shot.json").read_text(encoding="utf-8"))
    examples = []
    for task in sorted(prompts):
        parts = prompts[task].split("\n\n")
        exemplars, instruction = parts[-3:], "\n\n".join(parts[:-3]).strip()
        for i, exemplar in enumerate(exemplars):
            others = exemplars[:i] + exemplars[i + 1:]
            icl = "".join(other + "\n\n" for other in others)
            question, answer = exemplar.split("\nA:", 1)
            examples.append(_one_turn(f"bbh/{task}#{i}", f"{instruction}\n\n{icl}{question}", answer,
                                      {"task": task, "question": question, "answer": answer}, task, response_prefix="A:"))
    return examples


TYDIQA_TEMPLATES = {
    # (instruction, passage label, question label, answer label), as in open-instruct's TyDiQA eval.
    "english": ("Answer the following question based on the information in the given passage.", "Passage:", "Question:", "Answer:"),
    "arabic": ("أجب على السؤال التالي بناءً على المعلومات في المقطع المعطى.", "المقطع:", "السؤال:", "الإجابة:"),
    "bengali": ("প্রদত্ত অধ্যায়ের তথ্যের উপর ভিত্তি করে নিম্নলিখিত প্রশ্নের উত্তর দিন।", "অধ্যায়:", "প্রশ্ন:", "উত্তর:"),
    "finnish": ("Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.", "Kappale:", "Kysymys:", "Vastaus:"),
    "indonesian": ("Jawab pertanyaan berikut berdasarkan informasi di bagian yang diberikan.", "Bagian:", "Pertanyaan:", "Jawaban:"),
    "korean": ("주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.", "문단:", "질문:", "답변:"),
    "russian": ("Ответьте на следующий вопрос на основе информации в данном отрывке.", "Отрывок:", "Вопрос:", "Ответ:"),
    "swahili": ("Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.", "Kifungu:", "Swali:", "Jibu:"),
    "telugu": ("ఇచ్చిన పేరాలోని సమాచారం ఆధారంగా కింది ప్రశ్నకు సమాధానం ఇవ్వండి.", "పేరా:", "ప్రశ్న:", "సమాధానం:"),
}


def load_tydiqa() -> list[Example]:
    data = json.loads(_resource_dir("tydiqa", "tydiqa-one-shot.json").read_text(encoding="utf-8"))
    examples = []
    for language in data:
        item = data[language][0]
        instruction, passage, question, answer = TYDIQA_TEMPLATES[language]
        prompt = f"{instruction}{passage} {item['context']}\n{question} {item['question']}\n"
        examples.append(_one_turn(f"tydiqa/{language}#0", prompt, " " + item["answers"][0]["text"], item, language,
                                  response_prefix=answer))
    return examples


def _choices(example: Example, path: str) -> list[str] | None:
    """A target record's ``choices`` (a list of strings, one of them its response): multiple choice."""
    choices = example.record.get("choices") if isinstance(example.record, dict) else None
    if choices is None:
        return None
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
        raise DataFormatError(path, "field 'choices' must be a list of at least two strings", example.line)
    if example.response not in choices:
        raise DataFormatError(path, f"the response {example.response!r} is not one of the record's 'choices'", example.line)
    return list(choices)


def _heldout_dir(*parts: str) -> Path:
    return Path(str(resources.files("influence.resources").joinpath("heldout", *parts)))


def load_mmlu_test() -> list[Example]:
    """Held-out for ``mmlu_val``: the first 20 MMLU test questions of every subject (vendored)."""
    return _mmlu(_heldout_dir("mmlu"), "_test.csv", "mmlu_test", None)


def load_bbh_heldout() -> list[Example]:
    """Held-out for ``bbh``: 20 test examples of every task after the task's three-shot prompt, the
    answer (e.g. ``(A)``) after ``A:``."""
    prompts = json.loads(_resource_dir("bbh", "bbh-three-shot.json").read_text(encoding="utf-8"))
    examples = []
    for task in sorted(prompts):
        path = _heldout_dir("bbh", f"{task}.json")
        if not path.is_file():
            continue
        parts = prompts[task].split("\n\n")
        context = "\n\n".join(parts).strip()
        for i, item in enumerate(json.loads(path.read_text(encoding="utf-8"))["examples"]):
            examples.append(_one_turn(f"bbh_test/{task}#{i}", f"{context}\n\nQ: {item['input']}", " " + item["target"],
                                      {"task": task, **item}, task, response_prefix="A:"))
    return examples


def load_self_instruct() -> list[Example]:
    """Self-Instruct's 252 user-oriented instructions with their reference answers (first instance):
    reference-answer NLL measures instruction following."""
    examples = []
    with open(_heldout_dir("user_oriented_instructions.jsonl"), encoding="utf-8") as fh:
        for index, line in enumerate(fh):
            record = json.loads(line)
            instance = record["instances"][0]
            prompt = record["instruction"] + (f"\n\n{instance['input']}" if instance.get("input", "").strip() else "")
            example = _one_turn(f"self_instruct/{record['id']}", prompt, instance["output"], record, "self_instruct", "")
            examples.append(example)
    return examples


TYDIQA_HUB = ("google-research-datasets/tydiqa", "secondary_task", "validation")


def tydiqa_examples(records: list[dict], per_language: int = 20) -> list[Example]:
    """TyDiQA-GoldP records (the hub's ``secondary_task`` schema: id ``<language>-...``, context, question,
    answers) in the target's one-shot prompt, at most ``per_language`` per language."""
    examples, counts = [], {}
    for record in records:
        language = record["id"].split("-", 1)[0]
        if language not in TYDIQA_TEMPLATES or counts.get(language, 0) >= per_language:
            continue
        counts[language] = counts.get(language, 0) + 1
        instruction, passage, question, answer = TYDIQA_TEMPLATES[language]
        prompt = f"{instruction}{passage} {record['context']}\n{question} {record['question']}\n"
        examples.append(_one_turn(f"tydiqa_dev/{record['id']}", prompt, " " + record["answers"]["text"][0], record,
                                  language, response_prefix=answer))
    return examples


def load_tydiqa_dev() -> list[Example]:
    """Held-out for ``tydiqa``: TyDiQA-GoldP dev, 20 per language, from the Hugging Face hub (not
    vendored: it needs the network and the ``datasets`` package)."""
    try:
        from datasets import load_dataset

        records = load_dataset(*TYDIQA_HUB[:2], split=TYDIQA_HUB[2])
    except Exception as err:  # ImportError, or any failure to reach the hub
        raise InfluenceError(f"TyDiQA's dev set is not vendored and could not be loaded from the Hugging Face hub "
                             f"({type(err).__name__}); offline, give a held-out file with --eval") from None
    return tydiqa_examples(list(records))


# Held-out evaluation data of a target (what `evaluate select` scores retrained models on): never the
# examples the selection looked at.
HELDOUT: dict[str, tuple[str, Callable[[], list[Example]]]] = {
    "mmlu_val": ("MMLU test, 20 per subject", load_mmlu_test),
    "bbh": ("BIG-Bench Hard test examples, 20 per task", load_bbh_heldout),
    "tydiqa": ("TyDiQA-GoldP dev, 20 per language (from the hub)", load_tydiqa_dev),
    "self_instruct": ("Self-Instruct's 252 user-oriented instructions, reference answers", load_self_instruct),
}


def load_heldout(name: str, tasks: list[str] | None = None) -> list[Example]:
    """Built-in held-out data (``mmlu_val`` -> MMLU test, ``bbh`` -> BBH test examples, ``tydiqa`` ->
    TyDiQA dev from the hub, and ``self_instruct``), restricted to ``tasks``; the loss of a held-out
    example covers its answer only."""
    if name not in HELDOUT:
        raise InfluenceError(f"no built-in held-out data for '{name}' (there is for {', '.join(sorted(HELDOUT))}); "
                             "give a held-out file with --eval")
    examples = HELDOUT[name][1]()
    for example in examples:
        example.label_end_of_turn = False
    if tasks:
        missing = sorted(set(tasks) - {e.task for e in examples})
        if missing:
            raise InfluenceError(f"held-out data of '{name}' has no subtask(s) {', '.join(missing)}")
        examples = [e for e in examples if e.task in set(tasks)]
    return examples


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    loader: Callable[[], list[Example]]


TARGETS: dict[str, TargetSpec] = {
    "mmlu_val": TargetSpec("mmlu_val", "MMLU dev, 57 subjects x 5 (LESS's MMLU target)", load_mmlu_val),
    "bbh": TargetSpec("bbh", "BIG-Bench Hard three-shot, 27 tasks x 3 (LESS's BBH target)", load_bbh),
    "tydiqa": TargetSpec("tydiqa", "TyDiQA-GoldP one-shot, 9 languages x 1 (LESS's TydiQA target)", load_tydiqa),
}


def target_name(target: str) -> str:
    """Short name used for store groups and outputs: the registry name, or the file's stem."""
    return target if target in TARGETS else Path(target).stem


def check_target(target: str) -> None:
    """Refuse a ``--target`` that is neither a registered target nor a file (before any work)."""
    if target not in TARGETS and not Path(target).is_file():
        raise InfluenceError(f"unknown target '{target}': not a file, and not one of the registered targets: "
                             + ", ".join(sorted(TARGETS)))


def load_target(target: str, tasks: list[str] | None = None) -> list[Example]:
    """Examples of a registered target or of a user file, optionally restricted to some subtasks."""
    if target in TARGETS:
        examples = TARGETS[target].loader()
    elif Path(target).is_file() and Path(target).suffix == ".csv" and _is_mmlu_csv(Path(target)):
        path = Path(target)  # e.g. MMLU's data/dev/abstract_algebra_dev.csv: the subject is the name's stem
        subject = path.stem.removesuffix("_dev").removesuffix("_val").removesuffix("_test")
        examples = _mmlu_file(path, subject, path.stem, None)
    elif Path(target).is_file():
        examples = load_examples(target)
        labelled = [e for e in examples if e.task is not None]
        if labelled and len(labelled) < len(examples):
            first = next(e for e in examples if e.task is None)
            raise DataFormatError(target, f"record has no 'task' while {len(labelled)} other records have one: give "
                                  "every record a task, or none (then the whole file is one task)", first.line)
        for example in examples:
            example.task = example.task or Path(target).stem
            example.choices = _choices(example, target)
    else:
        check_target(target)
    for example in examples:  # a target's loss covers its answer, not the end-of-turn marker (LESS)
        example.label_end_of_turn = False
    if tasks:
        known = {e.task for e in examples}
        missing = sorted(set(tasks) - known)
        if missing:
            raise InfluenceError(
                f"target '{target}' has no subtask(s) {', '.join(missing)}; available: {', '.join(sorted(known))}"
            )
        examples = [e for e in examples if e.task in set(tasks)]
    return examples
