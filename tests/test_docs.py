"""The docs hold together: the API reference builds from the docstrings (what `make docs` does), the method reference
is what the code declares, every page is linked and every link lands, every `influence ...` command line in the README
and docs/ names a real command, real flags and real methods, and the README's which-method table names real methods
of every family."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]


def test_api_reference_builds(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_docs.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    page = (tmp_path / "influence.html").read_text(encoding="utf-8")
    for name in ("rank", "warmup", "project_grads", "evaluate_select", "ModelLoading"):
        assert f'id="{name}"' in page, name  # the lazily imported public names are documented
    assert (tmp_path / "influence" / "scoring" / "less.html").is_file()
    assert (tmp_path / "influence" / "kernels" / "scoring.html").is_file()


def test_docs_pages_exist_and_are_linked():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in ("docs/troubleshooting.md", "docs/scaling.md", "docs/architecture.md", "docs/methods.md"):
        assert (ROOT / page).is_file() and page in readme
    unlinked = [p.name for p in DOCS if f"](docs/{p.name})" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_starts_with_the_two_make_commands():
    """`make demo` and `make test` stay the README's first instructions (.ci/run calls `make test`)."""
    head = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:8]
    assert any(line.startswith("make demo") for line in head) and any(line.startswith("make test") for line in head)
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


# --- the generated method reference ------------------------------------------------------------------------------


def _method_reference():
    spec = importlib.util.spec_from_file_location("method_reference", ROOT / "scripts" / "method_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_method_reference_is_what_the_code_declares():
    """docs/methods.md is scripts/method_reference.py's output from the registry: it cannot drift from the code."""
    from influence.scoring import registry

    page = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    assert page == _method_reference().render(), (
        "docs/methods.md differs from the method contract: run `python scripts/method_reference.py`")
    for name, method in registry().items():  # what the page is for: every method with its meaning and options
        section = page.split(f"\n### {name}\n", 1)[1].split("\n### ", 1)[0]
        assert "**Score (sign and scale).**" in section and "**Needs" in section, name
        for option in _options(method):
            assert f"`{option.flag}`" in section, (name, option.flag)


def _options(method):
    from influence.config import options_of

    return options_of(method.Options)


def test_method_reference_check_mode(tmp_path):
    script = _method_reference()
    stale = tmp_path / "methods.md"
    stale.write_text("old\n", encoding="utf-8")
    assert script.main(["--check", "--out", str(stale)]) == 1
    assert script.main(["--out", str(stale)]) == 0 and script.main(["--check", "--out", str(stale)]) == 0


# --- the README's which-method table -----------------------------------------------------------------------------


def _section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_which_method_table_names_real_methods_of_every_family_and_every_cost_class():
    from influence.scoring.base import FAMILIES, registry

    section = _section((ROOT / "README.md").read_text(encoding="utf-8"), "Which method for which question")
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    classes = [re.match(r"\| \*\*(.+?)\*\* \|", row)[1] for row in rows if re.match(r"\| \*\*[^|]+\*\* \| [^|]*[a-z]", row)
               and row.count(" | ") == 2]
    assert len(classes) >= 6, classes
    question_rows = [row for row in rows if row.count(" | ") == 3 and not row.startswith("| your question")]
    named, costs = set(), set()
    for row in question_rows:
        _, methods, family, cost = [cell.strip() for cell in row.strip("|").split(" | ")]
        named |= {name for name in re.findall(r"`([a-z][a-z0-9_]*)`", methods)}
        costs.add(cost)
    methods = registry()
    assert not named - set(methods) - {"rank"}, f"not methods: {sorted(named - set(methods) - {'rank'})}"
    assert not set(methods) - named, f"methods the README's which-method table leaves out: {sorted(set(methods) - named)}"
    assert {methods[name].family for name in named if name in methods} == set(FAMILIES)
    for cost_class in classes:
        assert any(cost.startswith(cost_class) for cost in costs), f"cost class '{cost_class}' is no row's"
    for question in ("evaluate lds", "evaluate select"):
        assert f"`influence {question}`" in section


# --- links and anchors -------------------------------------------------------------------------------------------


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids of a Markdown page."""
    seen: dict[str, int] = {}
    found = set()
    for line in _without_code_blocks(path.read_text(encoding="utf-8")).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            slug = re.sub(r"[^\w\- ]", "", match[1].strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_lands(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _without_code_blocks(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue
        where, _, anchor = target.partition("#")
        path = (page.parent / where).resolve() if where else page
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: {broken}"


# --- command lines ------------------------------------------------------------------------------------------------

STOP = {"#", "&&", "|", ";", "\\", "||"}


def _snippets(text: str) -> list[str]:
    """Command lines of a page: each line of a fenced block that is not Python (backslash continuations joined), and
    every inline code span."""
    found = []
    for language, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        if language != "python":
            found += body.replace("\\\n", " ").splitlines()
    found += [span.replace("\n", " ") for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", _without_code_blocks(text))]
    return found


def _invocations(snippet: str, commands: set[str]) -> list[list[str]]:
    """The token lists after each `influence` of a snippet (at its start or after `-m`), or of a snippet that starts
    with a command's name and gives flags (`rank --method trak`)."""
    tokens = [token.lstrip("[").rstrip("[](),;.'\"").replace("\\|", "|") for token in snippet.split()]
    tokens = [token for token in tokens if token]
    out, start = [], 0
    for index, token in enumerate(tokens + ["&&"]):
        if token not in STOP:
            continue
        part, start = tokens[start:index], index + 1
        for at, word in enumerate(part):
            if word == "influence" and (at == 0 or part[at - 1] == "-m"):
                out.append(part[at + 1:])
                break
        else:
            if part and part[0] in commands and any(word.startswith("--") for word in part):
                out.append(part)
    return out


def _defined_in(text: str) -> tuple[set[str], set[str]]:
    """The methods and flags a page's own Python defines (docs/architecture.md's worked example adds a method)."""
    code = "\n".join(re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M))
    return (set(re.findall(r'^\s+name = "([a-z0-9_]+)"', code, flags=re.M)),
            {"--" + field.replace("_", "-") for field in re.findall(r"^\s+(\w+): .*= setting\(", code, flags=re.M)})


def _problems(tokens: list[str], main: click.Group, defined: tuple[set[str], set[str]] = (set(), set())) -> list[str]:
    from influence.scoring import registry

    def names(command):
        return {name for param in command.params for name in (*param.opts, *param.secondary_opts)} | {"--help", "-h"}

    problems, index = [], 0
    while index < len(tokens) and tokens[index].startswith("-"):  # the group's own options
        if tokens[index] not in names(main):
            problems.append(f"unknown option {tokens[index]} of `influence`")
        index += 2 if tokens[index] == "--config" else 1
    if index == len(tokens) or not re.fullmatch(r"[a-z][a-z-]*", tokens[index]):
        return problems  # `influence --quiet`, `influence ...`
    command, words = main.commands.get(tokens[index]), [tokens[index]]
    if command is None:
        return problems + [f"no command `influence {tokens[index]}`"]
    index += 1
    if isinstance(command, click.Group):
        if index == len(tokens) or tokens[index] not in command.commands:
            return problems  # `influence evaluate`, `subsets train|status`
        command, words = command.commands[tokens[index]], words + [tokens[index]]
        index += 1
    allowed = names(command) | {"--config"} | defined[1]
    methods = set(registry()) | {"help"} | defined[0]
    for at in range(index, len(tokens)):
        flag = tokens[at].split("=")[0]
        if not flag.startswith("--") or flag == "--":
            continue
        if flag not in allowed:
            problems.append(f"`influence {' '.join(words)}` has no {flag}")
        value = tokens[at + 1] if at + 1 < len(tokens) else ""
        if flag in ("--method", "--methods") and re.fullmatch(r"[a-z0-9_,]+", value):
            problems += [f"no method '{name}' (`influence {' '.join(words)} {flag}`)" for name in value.split(",")
                         if name and name not in methods]
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_line_names_real_commands_flags_and_methods(page):
    from influence.cli import main

    problems, text = [], page.read_text(encoding="utf-8")
    for snippet in _snippets(text):
        for tokens in _invocations(snippet, set(main.commands)):
            problems += [f"{problem}  <- {snippet.strip()[:100]}" for problem in _problems(tokens, main, _defined_in(text))]
    assert not problems, f"{page.name}:\n" + "\n".join(problems)


def test_the_command_line_check_finds_mistakes():
    """The check above is not vacuous: a wrong command, flag or method is caught."""
    from influence.cli import main

    def check(line):
        return [p for tokens in _invocations(line, set(main.commands)) for p in _problems(tokens, main)]

    assert check("influence rank --run r --method less --fraction 0.1") == []
    assert check("torchrun --nproc-per-node 2 -m influence project-grads --run-dir r") == []
    assert check("rank --method trak --proj-dim 8") == []
    assert check("influence rank --run r --no-such-flag") and check("influence rnak --run r")
    assert check("influence rank --method lesss") and check("influence evaluate lds --methods less,nope")
    assert check("project-grads --no-such-flag 1") and check("influence --no-such-option rank")
