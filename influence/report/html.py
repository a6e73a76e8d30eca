"""The HTML report of a run: every figure embedded, viewable offline (``influence report``)."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import setting
from ..core.storage import check_writable
from ..errors import InfluenceError
from ..selection.outputs import ranking_belongs
from ..train.run import Run, atomic_write
from .figures import (
    _pyplot,
    agreement_figure,
    checkpoint_agreement,
    run_rankings,
    score_distribution,
    score_vs_length,
    subtask_coverage_figure,
    subtask_similarity_figure,
    title_of,
    warmup_curves,
)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(kw_only=True)
class ReportSettings:
    out: str | None = setting(None, "The HTML file [default: RUN/report.html].", path={"dir_okay": False})


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """A self-contained HTML page of the run: its status, the warm-up curves, every ranking's figures
    and tables, the method agreement, the LDS and selection verdicts. Returns its path."""
    from .status import run_status, status_text

    run = Run(run_dir)
    target = Path(out) if out is not None else run.path / "report.html"
    check_writable(target)
    sections = [("Run", f"<pre>{html.escape(status_text(run_status(run.path)))}</pre>")]
    curves = warmup_curves(run.path)
    if curves is not None:
        sections.append(("Warm-up", _img(curves, "warm-up loss and accuracy")))
    rankings = run_rankings(run.path)
    foreign = [name for name, (_, summary) in rankings.items() if not ranking_belongs(run, summary)]
    rankings = {name: ranking for name, ranking in rankings.items() if name not in foreign}
    if foreign:  # copied in from another run, or of another pool: its examples are not this run's
        sections.append(("Left out", f"<p>{html.escape(', '.join(foreign))}: rankings of another run or pool</p>"))
    for name, (table, summary) in rankings.items():
        parts = [f"<p>{html.escape(summary['score_meaning'])}</p>",
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
                parts.append(f"<p><b>{label}:</b> " + "; ".join(html.escape(w) for w in summary[label]) + "</p>")
        if summary["method"] == "less" and summary.get("target"):
            try:
                agreement = checkpoint_agreement(run.path, summary["target"])
            except InfluenceError:  # the stores changed since the ranking: nothing to show, not an error
                agreement = None
            if agreement is not None:
                parts.append("<p>Spearman correlation of the scores each checkpoint alone gives:</p>"
                             + agreement.to_html(float_format=lambda v: f"{v:+.3f}"))
        head = table[table["finite"]].head(10)[["rank", "id", "score"]]
        parts.append(head.to_html(index=False, float_format=lambda v: f"{v:.4f}"))
        if (run.path / name / "tokens.parquet").is_file():
            parts.append(token_shading(pd.read_parquet(run.path / name / "tokens.parquet")))
        sections.append((f"Ranking {name}: {title_of(summary)}", "\n".join(parts)))
    agreement = agreement_figure(run.path, rankings)
    if agreement is not None:
        sections.append(("Agreement between rankings", _img(agreement, "top overlap between rankings")))
    for path in sorted(run.path.glob("select-*/report.json")):
        verdicts = json.loads(path.read_text(encoding="utf-8")).get("verdicts", [])
        body = "".join(f"<li>{html.escape(str(line))}</li>" for line in verdicts)
        sections.append((f"Selection verdicts {path.parent.name}", f"<ul>{body}</ul>" if body else "<p>none yet</p>"))
    for path in sorted(run.path.glob("**/lds.json")):
        methods = pd.DataFrame(json.loads(path.read_text(encoding="utf-8")).get("methods", []))
        sections.append((f"LDS {path.parent.relative_to(run.path)}",
                         methods.to_html(index=False, float_format=lambda v: f"{v:+.3f}") if len(methods) else ""))
    page = _page(f"influence report: {run.path.name}", sections)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return target



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


def _page(title: str, sections: list[tuple[str, str]]) -> str:
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%;display:block;margin:1em 0}table{border-collapse:collapse;font-size:90%}"
             "td,th{border:1px solid #ccc;padding:2px 6px}pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
             ".token{white-space:pre;font-family:monospace;border-radius:2px}.prompt{color:#777}")
    body = "\n".join(f"<section><h2>{html.escape(name)}</h2>\n{content}</section>" for name, content in sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
