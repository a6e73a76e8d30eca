"""The HTML report of a run: every figure embedded, viewable offline (``influence report``).

The page leads with the answer: the main ranking's selection, example texts included; then how the run's
rankings agree, an explorer of every pool example under every ranking (Tabulator, vendored in
``influence/resources/explorer`` and inlined), each ranking's detail, the verdicts, and the run's settings.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import setting
from ..core.storage import check_writable
from ..data.formats import Example
from ..errors import InfluenceError
from ..selection.outputs import ranking_belongs, response_length, spearman
from ..train.run import Run, atomic_write
from .figures import (
    INLINE_MARKUP,
    _pyplot,
    agreement_figure,
    checkpoint_agreement,
    higher_means,
    main_ranking,
    run_rankings,
    score_distribution,
    score_vs_length,
    subtask_coverage_figure,
    subtask_similarity_figure,
    title_of,
    warmup_curves,
)

Rankings = dict[str, tuple[pd.DataFrame, dict]]

SHOWN_SELECTED = 25  # the selected examples the first section shows; the explorer has every one
TEXT_CHARS = 400  # a prompt or response shown in the page's tables is cut here
PREVIEW_CHARS = 160  # an explorer row's prompt and response are cut here; the full example shows on click
EXPLORER_FILES = ("tabulator.min.css", "explorer.css", "tabulator.min.js", "explorer.js")


def _png(fig) -> str:
    buffer = io.BytesIO()
    # bbox_inches="tight": the saved image grows to hold every label, so none is ever cut at the edge
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", pad_inches=0.1)
    _pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(kw_only=True)
class ReportSettings:
    out: str | None = setting(None, "The HTML file [default: RUN/report.html].", path={"dir_okay": False})
    main: str | None = setting(None, "The ranking folder the report leads with, relative to the run (rank-less-mmlu_val, "
                                     "compare-mmlu_val/trak) [default: the only one, else the latest LESS ranking, "
                                     "else the latest].")


def write_report(run_dir: str | Path, out: str | Path | None = None, main: str | None = None) -> Path:
    """A self-contained HTML page of the run (see the module docstring); ``main`` names the ranking folder it leads
    with (default: :func:`~influence.report.figures.main_ranking`). Returns its path."""
    from .status import run_status, status_text

    run = Run(run_dir)
    target = Path(out) if out is not None else run.path / "report.html"
    check_writable(target)
    rankings = run_rankings(run.path)
    foreign = [name for name, (_, summary) in rankings.items() if not ranking_belongs(run, summary)]
    rankings = {name: ranking for name, ranking in rankings.items() if name not in foreign}
    if main is not None and main not in rankings:
        raise InfluenceError(f"no ranking '{main}' in {run.path}; the run's rankings: {', '.join(rankings) or 'none'}")
    why = "the ranking asked for" if main is not None else None
    main = main or main_ranking(run.path, rankings)
    pool = run.pool() if rankings else []
    by_id = {example.id: example for example in pool}
    status = run_status(run.path)

    sections: list[tuple[str, str, str]] = []
    if main is None:
        sections.append(("selection", "Selection", "<p>No ranking in this run yet: <code>influence rank --run RUN "
                                                   "--target TARGET</code> makes one.</p>"))
    else:
        sections.append(("selection", f"Selection: {title_of(rankings[main][1])}",
                         selection_section(main, rankings, by_id, why)))
    if foreign:  # copied in from another run, or of another pool: its examples are not this run's
        sections.append(("left-out", "Left out",
                         f"<p>{html.escape(', '.join(foreign))}: rankings of another run or pool</p>"))
    if len(rankings) > 1:
        sections.append(("agreement", "Agreement between rankings", agreement_section(run.path, main, rankings)))
    if rankings:
        sections.append(("explorer", "Example explorer", explorer_section(explorer_data(pool, rankings, main))))
    for number, name in enumerate(sorted(rankings, key=lambda n: n != main)):
        sections.append((f"ranking-{number}", f"Ranking {name}: {title_of(rankings[name][1])}",
                         ranking_section(run, name, *rankings[name], by_id)))
    for path in sorted(run.path.glob("select-*/report.json")):
        verdicts = json.loads(path.read_text(encoding="utf-8")).get("verdicts", [])
        body = "".join(f"<li>{rest_inline(str(line))}</li>" for line in verdicts)
        sections.append((f"verdicts-{path.parent.name}", f"Selection verdicts {path.parent.name}",
                         f"<ul>{body}</ul>" if body else "<p>none yet</p>"))
    for path in sorted(run.path.glob("**/lds.json")):
        sections.append((f"lds-{path.parent.name}", f"LDS {path.parent.relative_to(run.path)}",
                         lds_section(json.loads(path.read_text(encoding="utf-8")))))
    run_parts = ["<h3>Warm-up settings</h3>", settings_table(status["warmup"])]
    if status["checkpoints"]:
        run_parts += ["<h3>Checkpoints</h3>", _table_html(pd.DataFrame(status["checkpoints"]))]
    curves = warmup_curves(run.path)
    if curves is not None:
        run_parts.append(_img(curves, "warm-up loss and accuracy"))
    run_parts.append(f"<pre>{html.escape(status_text({**status, 'warmup': 'settings in the table above'}))}</pre>")
    sections.append(("run", "Run and settings", "\n".join(run_parts)))

    pool_size = status["pool"]["examples"]
    lead = (f"<p class=\"lead\">Model {html.escape(str(status['model']))}, a pool of {pool_size} examples; "
            f"run folder <code>{html.escape(str(run.path))}</code>.</p>")
    page = html_page(f"influence report: {run.path.name}", sections, lead)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return target


def selection_section(main: str, rankings: Rankings, by_id: dict[str, Example], why: str | None = None) -> str:
    """The answer: which examples the main ranking selects, with their text, score and rank; ``why`` it is the
    main one (default: :func:`~influence.report.figures.main_ranking`'s reason)."""
    table, summary = rankings[main]
    selected = table[table["id"].isin(summary["selected_ids"])].sort_values("rank", kind="stable")
    others = [name for name in rankings if name != main]
    why = why or ("the run's only ranking" if not others else "the run's LESS ranking" if summary["method"] == "less"
                  else "the most recent of the run's rankings")
    parts = [f"<p class=\"lead\"><b>{html.escape(summary['method'])}</b> selects <b>{summary['n_selected']}</b> of "
             f"the {summary['n_pool']} pool examples ({html.escape(_selection_words(summary))}); score: "
             f"{html.escape(higher_means(summary))}. Ranking <code>{html.escape(main)}</code>, {why}"
             + (f"; {len(others)} other ranking(s) below." if others else ".") + "</p>"]
    parts += [f"<p class=\"warn\"><b>warning:</b> {rest_inline(w)}</p>" for w in summary.get("warnings", [])]
    parts.append(f"<details><summary>What the {html.escape(summary['method'])} score means</summary>"
                 f"{rest_html(summary.get('score_meaning', ''))}</details>")
    if len(selected) > SHOWN_SELECTED:
        parts.append(f"<p>The first {SHOWN_SELECTED} of the {len(selected)} selected, by rank; every one is in the "
                     "<a href=\"#explorer\">explorer</a> (ranking <code>" + html.escape(main)
                     + "</code>, selected).</p>")
    parts.append(examples_table(selected.head(SHOWN_SELECTED), by_id))
    return "\n".join(parts)


def _selection_words(summary: dict) -> str:
    selection = summary["selection"]
    mode, target = selection["mode"], summary.get("target_name") or summary.get("target")
    if selection.get("top_k"):
        how = f"{mode} {selection['top_k']}"
    elif selection.get("fraction") is not None:
        how = f"{mode} {selection['fraction']:.0%}"
    else:
        how = f"{mode} {selection.get('threshold') if mode in ('above', 'below') else selection.get('band')}"
    return how + (f" for target {target}" if target else ", no target")


def examples_table(rows: pd.DataFrame, by_id: dict[str, Example]) -> str:
    """Ranked rows (``rank``, ``score``, ``id``) as a table of their examples' prompts and responses (cut at
    ``TEXT_CHARS``)."""
    lines = ["<table class=\"examples\"><thead><tr><th>rank</th><th>score</th><th>example</th><th>prompt</th>"
             "<th>response</th></tr></thead><tbody>"]
    for rank, score, example_id in zip(rows["rank"], rows["score"], rows["id"]):
        example = by_id.get(str(example_id))
        if example is None:
            where, prompt, response = "not in the run's pool", "", ""
        else:
            where = " · ".join(x for x in (example.source, example.task, f"{response_length(example)} chars") if x)
            prompt, response = _first_prompt(example), example.response
        lines.append(f"<tr><td>{int(rank)}</td><td>{_number(score)}</td><td><code>{html.escape(str(example_id))}"
                     f"</code><br><small>{html.escape(where)}</small></td><td class=\"text\">"
                     f"{html.escape(_cut(prompt, TEXT_CHARS))}</td><td class=\"text\">"
                     f"{html.escape(_cut(response, TEXT_CHARS))}</td></tr>")
    return "\n".join(lines) + "</tbody></table>"


def agreement_section(run_dir: Path, main: str, rankings: Rankings) -> str:
    """The agreement heat map of every pair of rankings, and each ranking against the main one: how much of the
    main selection it also selects, and the Spearman correlation of the scores."""
    main_table, main_summary = rankings[main]
    main_selected = set(main_summary["selected_ids"])
    rows = []
    for name, (table, summary) in rankings.items():
        if name == main:
            continue
        joined = main_table[["id", "score"]].merge(table[["id", "score"]], on="id", suffixes=("_main", ""))
        rho = spearman(joined["score_main"], joined["score"])
        rows.append({"ranking": name, "method": summary["method"], "selected": summary["n_selected"],
                     f"share of {main}'s selection it selects too":
                         len(main_selected & set(summary["selected_ids"])) / max(1, len(main_selected)),
                     f"Spearman with {main}": rho if rho is not None else float("nan")})
    parts = [_table_html(pd.DataFrame(rows), "{:.2f}")]
    figure = agreement_figure(run_dir, rankings)
    if figure is not None:
        parts.append(_img(figure, "top overlap between rankings"))
    return "\n".join(parts)


def ranking_section(run: Run, name: str, table: pd.DataFrame, summary: dict, by_id: dict[str, Example]) -> str:
    """One ranking's detail: what its score means, its figures, notes, settings and top examples."""
    parts = [rest_html(summary.get("score_meaning", "")),
             _img(score_distribution(table, summary), "score distribution"),
             _img(score_vs_length(table, summary), "score against response length")]
    coverage = subtask_coverage_figure(table, summary)
    if coverage is not None:
        parts.append(_img(coverage, "selected examples per subtask"))
    similarity = subtask_similarity_figure(table, summary)
    if similarity is not None:
        parts.append(_img(similarity, "subtasks clustered"))
    for label in ("warnings", "notes"):
        if summary.get(label):
            parts.append(f"<p><b>{label}:</b> " + "; ".join(rest_inline(w) for w in summary[label]) + "</p>")
    if summary["method"] == "less" and summary.get("target"):
        try:
            agreement = checkpoint_agreement(run.path, summary["target"])
        except InfluenceError:  # the stores changed since the ranking: nothing to show, not an error
            agreement = None
        if agreement is not None:
            parts.append("<p>Spearman correlation of the scores each checkpoint alone gives:</p>"
                         + agreement.to_html(float_format=lambda v: f"{v:+.3f}"))
    if summary.get("rank_settings"):
        parts.append("<details><summary>Settings of this ranking</summary>"
                     + settings_table(summary["rank_settings"]) + "</details>")
    parts.append("<p>Its first 10 examples:</p>" + examples_table(table[table["finite"]].head(10), by_id))
    if (run.path / name / "tokens.parquet").is_file():
        parts.append(token_shading(pd.read_parquet(run.path / name / "tokens.parquet")))
    return "\n".join(parts)


def lds_section(report: dict) -> str:
    """An LDS report (``lds.json``): each method's correlation, what it means, its notes and settings."""
    methods = pd.DataFrame(report.get("methods", []))
    parts = [_table_html(methods, "{:+.3f}")] if len(methods) else []
    if report.get("meaning"):
        parts.append(rest_html(report["meaning"]))
    parts += [f"<p><b>note:</b> {rest_inline(str(note))}</p>" for note in report.get("notes", [])]
    if report.get("settings"):
        parts.append("<details><summary>Settings</summary>" + settings_table(report["settings"]) + "</details>")
    return "\n".join(parts)


def settings_table(settings: dict) -> str:
    """Settings (nested dicts flattened to ``outer.inner``) as a two-column table; unset (None) ones left out."""
    rows = [(key, value) for key, value in _flattened(settings) if value is not None]
    body = "".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(_setting_text(value))}</td></tr>"
                   for key, value in rows)
    return f"<table class=\"settings\"><tbody>{body}</tbody></table>"


def _flattened(settings: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            rows += _flattened(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _setting_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# --- the example explorer ---------------------------------------------------------------------------------------


def explorer_data(pool: list[Example], rankings: Rankings, main: str | None = None) -> dict:
    """What the explorer shows, as column arrays (one entry per pool example, in pool order) to keep the page small:
    the example's id, source, subtask and response length; its first prompt and last response cut at
    ``PREVIEW_CHARS``; its full conversation once (``full``, None where the two cut texts are the whole example);
    and per ranking its score (None where unscorable), rank and whether it is selected."""
    ids = [example.id for example in pool]
    index = pd.Index(ids)
    if not index.is_unique:
        raise InfluenceError("the pool has duplicate ids; the explorer needs one row per example")
    if main is not None and main not in rankings:
        raise InfluenceError(f"no ranking '{main}'; the rankings: {', '.join(rankings) or 'none'}")
    sources = sorted({example.source for example in pool})
    tasks = sorted({example.task for example in pool if example.task is not None})
    source_of, task_of = {s: i for i, s in enumerate(sources)}, {t: i for i, t in enumerate(tasks)}
    prompts, responses, full = [], [], []
    for example in pool:
        prompt, response = _first_prompt(example), example.response
        prompts.append(_cut(prompt, PREVIEW_CHARS))
        responses.append(_cut(response, PREVIEW_CHARS))
        whole = ([m["role"] for m in example.messages] == ["user", "assistant"]
                 and len(prompt) <= PREVIEW_CHARS and len(response) <= PREVIEW_CHARS)
        full.append(None if whole else [[m["role"], m["content"]] for m in example.messages])
    columns = []
    for name, (table, summary) in rankings.items():
        position = index.get_indexer(table["id"].astype(str))
        if (position < 0).any():
            raise InfluenceError(f"ranking {name} ranks examples that are not in the pool (e.g. "
                                 f"{table['id'][position < 0].iloc[0]}): a ranking of another pool")
        score = np.full(len(pool), np.nan)
        score[position] = table["score"].to_numpy(dtype=np.float64)
        rank = np.zeros(len(pool), dtype=np.int64)
        rank[position] = table["rank"].to_numpy()
        chosen = np.zeros(len(pool), dtype=np.int8)
        picked = index.get_indexer(pd.Index(summary["selected_ids"], dtype=object).astype(str))
        chosen[picked[picked >= 0]] = 1
        columns.append({"name": name, "title": title_of(summary), "method": summary["method"],
                        "higher": higher_means(summary), "score": _json_numbers(score),
                        "rank": [int(r) if r > 0 else None for r in rank], "selected": chosen.tolist()})
    return {"main": list(rankings).index(main) if main is not None else None, "rankings": columns,
            "id": ids, "sources": sources, "source": [source_of[e.source] for e in pool], "tasks": tasks,
            "task": [task_of[e.task] if e.task is not None else -1 for e in pool],
            "length": [response_length(e) for e in pool], "prompt": prompts, "response": responses, "full": full}


def explorer_section(data: dict) -> str:
    """The explorer: its controls, the table (Tabulator: virtual scrolling, so a pool of 100k examples stays fast),
    the panel showing the clicked example, the data as JSON and the scripts, all inline (no network)."""
    folder = resources.files("influence.resources").joinpath("explorer")
    code = {name: re.sub(r"\n?/[/*]# sourceMappingURL=\S+( \*/)?\s*$", "", folder.joinpath(name).read_text("utf-8"))
            for name in EXPLORER_FILES}
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return ("<p>Every pool example under every ranking. Click a column's title to sort, a row to see the whole "
            "example; the filters and the search (id and text, every turn) narrow the rows.</p>\n"
            "<div id=\"explorer-controls\">"
            "<label>Ranking <select id=\"explorer-ranking\"><option value=\"\">all rankings</option></select></label>"
            "<label>Subtask or source <select id=\"explorer-group\"><option value=\"\">all</option></select></label>"
            "<label>Selected <select id=\"explorer-selected\"><option value=\"\">any</option>"
            "<option value=\"yes\">selected</option><option value=\"no\">not selected</option></select></label>"
            "<label>Search <input id=\"explorer-search\" type=\"search\" placeholder=\"text or id\"></label>"
            "<span id=\"explorer-count\"></span></div>\n"
            "<div id=\"explorer-table\"></div>\n<div id=\"explorer-example\" hidden></div>\n"
            f"<style>{code['tabulator.min.css']}</style>\n<style>{code['explorer.css']}</style>\n"
            f"<script type=\"application/json\" id=\"explorer-data\">{payload}</script>\n"
            f"<script>{code['tabulator.min.js']}</script>\n<script>{code['explorer.js']}</script>")


def _json_numbers(values: np.ndarray) -> list[float | None]:
    """Floats for JSON: 6 significant digits (the page stays small), None for NaN and infinities."""
    return [float(f"{v:.6g}") if math.isfinite(v) else None for v in values.tolist()]


# --- text ---------------------------------------------------------------------------------------------------------


def rest_inline(text: str) -> str:
    """reST inline markup as HTML, escaped: ``code``, :role:`name` and `name` as <code>, **strong**, *emphasis*;
    a paragraph's closing ``::`` (it announces a literal block) as ``:``, or dropped after a space."""
    parts, end = [], 0
    for match in INLINE_MARKUP.finditer(text):
        parts.append(_emphasis(html.escape(text[end : match.start()])))
        code = next(group for group in match.groups() if group is not None)
        parts.append(f"<code>{html.escape(code)}</code>")
        end = match.end()
    parts.append(_emphasis(html.escape(text[end:])))
    return re.sub(r"(\s*)::(?=\s|$)", lambda m: "" if m.group(1) else ":", "".join(parts))


def _emphasis(text: str) -> str:
    text = re.sub(r"\*\*(\S(?:.*?\S)?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])", r"<em>\1</em>", text)


def rest_html(text: str) -> str:
    """A docstring's reST as HTML, the little of it the package's docstrings use: paragraphs, bullet lists, the
    indented literal block after ``::`` as <pre>, and :func:`rest_inline`'s inline markup."""
    blocks = [block for block in re.split(r"\n[ \t]*\n", text.strip("\n")) if block.strip()]
    out = []
    for block in blocks:
        lines = block.split("\n")
        if all(line[:1] in (" ", "\t") for line in lines):  # indented: a literal block (after "::")
            out.append(f"<pre>{html.escape(_dedented(lines))}</pre>")
        elif re.match(r"[*-] ", lines[0]):
            items = re.split(r"\n[*-] ", "\n" + block)[1:]
            out.append("<ul>" + "".join(f"<li>{rest_inline(item)}</li>" for item in items) + "</ul>")
        else:
            out.append(f"<p>{rest_inline(block)}</p>")
    return "\n".join(out)


def _dedented(lines: list[str]) -> str:
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines)


def _first_prompt(example: Example) -> str:
    return next((m["content"] for m in example.messages if m["role"] == "user"), "")


def _cut(text: str, chars: int) -> str:
    text = text.strip()
    return text if len(text) <= chars else text[: chars - 1].rstrip() + "…"


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "–"


def _table_html(frame: pd.DataFrame, number_format: str = "{:.4g}") -> str:
    """A DataFrame as an HTML table: text cells escaped and their reST markup rendered, numbers formatted."""
    def cell(value: Any) -> str:
        if isinstance(value, (float, np.floating)):
            return number_format.format(value) if math.isfinite(value) else "–"
        return rest_inline(str(value))

    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def token_shading(tokens: pd.DataFrame, examples: int = 6) -> str:
    """The first ``examples`` target examples of a ranking's ``tokens.parquet`` (``rank --per-token K``), each response
    token shaded by its summed contribution to the example's influence with the top K pool examples: green where
    training on them lowers that token's loss, red where it raises it (the darkest: the largest magnitude of the
    example). The value shows on hover."""
    rows = []
    for target_id, part in list(tokens.groupby("target_id", sort=False))[:examples]:
        summed = part.groupby(["token_index", "token"], sort=True)["contribution"].sum().reset_index()
        scale = float(summed["contribution"].abs().max()) or 1.0
        spans = []
        for token, value in zip(summed["token"], summed["contribution"]):
            alpha = min(1.0, abs(value) / scale)
            colour = f"rgba(0,150,0,{alpha:.2f})" if value >= 0 else f"rgba(200,0,0,{alpha:.2f})"
            spans.append(f'<span class="token" style="background:{colour}" title="{value:+.4g}">{html.escape(token)}'
                         "</span>")
        prompt = str(part["prompt"].iloc[0]) if "prompt" in part else ""
        rows.append(f"<p><b>{html.escape(str(target_id))}</b> ({part['pool_id'].nunique()} top pool examples): "
                    f'<span class="prompt">{html.escape(prompt)}</span> ' + "".join(spans) + "</p>")
    return ("<p>Each target example's response tokens, shaded by their share of its influence with the ranking's top "
            "pool examples (green: training on them lowers the token's loss; red: raises it):</p>" + "".join(rows))


def _img(fig, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png(fig)}">'


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
         "img{max-width:100%;display:block;margin:1em 0}table{border-collapse:collapse;font-size:90%}"
         "td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top;text-align:left}"
         "pre{background:#f6f6f6;padding:1em;overflow-x:auto}code{background:#f3f3f3;padding:0 2px}"
         "nav{margin-bottom:1em;font-size:90%}nav a{margin-right:1em}.lead{font-size:105%}"
         ".warn{color:#a40000}.examples td.text{white-space:pre-wrap;max-width:28em;font-size:95%}"
         ".settings th{font-weight:normal;color:#555}details{margin:.5em 0}"
         ".token{white-space:pre;font-family:monospace;border-radius:2px}.prompt{color:#777}")


def html_page(title: str, sections: list[tuple[str, str, str]], lead: str = "") -> str:
    """A whole page: ``sections`` as (anchor, heading, HTML body), linked from a contents line at the top."""
    nav = " ".join(f"<a href=\"#{anchor}\">{html.escape(heading.split(':')[0])}</a>"
                   for anchor, heading, _ in sections)
    body = "\n".join(f"<section id=\"{anchor}\"><h2>{html.escape(heading)}</h2>\n{content}</section>"
                     for anchor, heading, content in sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{lead}<nav>{nav}</nav>\n{body}\n"
            "</body></html>\n")
