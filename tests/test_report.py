"""influence report: a self-contained HTML page of a run, leading with the main ranking's selection, with an
explorer of every pool example; in a real headless browser (make test-browser) it loads without console errors,
shows its figures, and the explorer searches, sorts and opens an example (also on a synthetic pool of 100k)."""

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from influence.cli import main
from influence.data.formats import Example
from influence.gradients.curvature import fit_curvature
from influence.report.figures import main_ranking, plain_text, run_rankings, selection_edges, subtask_coverage
from influence.report.html import PREVIEW_CHARS, explorer_data, explorer_section, html_page, rest_html
from influence.selection.outputs import load_rankings
from influence.selection.rank import rank
from influence.train.run import Run


@pytest.fixture(scope="module")
def reported_run(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("reported") / "run"
    shutil.copytree(tiny_run["run"], run, ignore=shutil.ignore_patterns("rank-*", "select-*", "lds*"))
    rank(run, tiny_run["target"], fraction=0.2, space="none")
    rank(run, tiny_run["target"], method="random", fraction=0.2, space="none")
    rank(run, None, method="el2n", fraction=0.3, mode="bottom", space="none")
    fit_curvature(run, progress=False)
    rank(run, tiny_run["target"], method="ekfac", per_token=2, fraction=0.2, space="none")
    result = CliRunner().invoke(main, ["report", "--run", str(run)])
    assert result.exit_code == 0, result.output
    return run


def test_report_is_self_contained(reported_run):
    page = (reported_run / "report.html").read_text(encoding="utf-8")
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert "warm-up loss and accuracy" in images and "top overlap between rankings" in images
    assert images.count("score distribution") == 4 and "selected examples per subtask" in images
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', page)  # nothing fetched from the network
    assert "el2n (bottom, 6 selected)" in page and "higher = harder" in page
    assert "Spearman correlation of the scores each checkpoint alone gives" in page
    # rank --per-token: each of the target's 6 examples with its response tokens shaded, the value on hover
    tokens = re.findall(r'<span class="token" style="background:rgba\((\d+),\d+,0,([0-9.]+)\)" title="([^"]+)">', page)
    assert page.count("top pool examples): ") == 6 and len(tokens) >= 6
    assert {alpha for _, alpha, _ in tokens} >= {"1.00"} and all(float(value) == float(value) for *_, value in tokens)


def test_checkpoint_agreement(reported_run, tiny_run):
    from influence.report.figures import checkpoint_agreement

    agreement = checkpoint_agreement(reported_run, tiny_run["target"])
    assert list(agreement.columns) == ["epoch-1", "epoch-2"] and agreement.iloc[0, 0] == 1
    assert -1 <= agreement.iloc[0, 1] <= 1


def test_subtask_coverage_shows_a_starved_subtask(reported_run):
    table = load_rankings(reported_run / "rank-less-tgt")
    summary = {"selected_ids": table.head(2)["id"].tolist()}
    coverage = subtask_coverage(table, summary)
    assert coverage["selected"].sum() == 2 and coverage["pool"].sum() == int(table["finite"].sum())


def test_selection_edges_follow_the_mode():
    import pandas as pd

    chosen = pd.DataFrame({"score": [0.2, 0.5, 0.9]})
    edges = {mode: selection_edges(chosen, {"selection": {"mode": mode, "threshold": 0.1}})
             for mode in ("top", "bottom", "middle", "above")}
    assert edges["top"] == [(0.2, "lowest selected")] and edges["bottom"] == [(0.9, "highest selected")]
    assert [v for v, _ in edges["middle"]] == [0.2, 0.9] and edges["above"] == [(0.1, "threshold (keep above)")]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _chromium_or_skip() -> str:
    """The chromium to test in; without one the test skips, or fails under INFLUENCE_REQUIRE_BROWSER=1."""
    found = _chromium()
    if found is None:
        if os.environ.get("INFLUENCE_REQUIRE_BROWSER"):
            pytest.fail("no chromium on PATH")
        pytest.skip("no chromium (make test-browser installs it)")
    return found


@pytest.mark.browser
def test_report_in_a_headless_browser(reported_run, tmp_path):
    chromium = _chromium_or_skip()
    page = (reported_run / "report.html").resolve()
    shot = tmp_path / "report.png"
    common = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
              f"--user-data-dir={tmp_path / 'profile'}"]
    logged = subprocess.run(common + ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
                                      "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert logged.returncode == 0, logged.stderr[-2000:]
    assert logged.stdout.count("data:image/png;base64,") >= 5  # the page as the browser built it
    console = [line for line in logged.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    # every image decoded: the browser's own measure of each one
    script = ("document.title = [...document.images].every(i => i.complete && i.naturalWidth > 0) ? 'ok' : 'broken'")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", f"<script>{script}</script></body>"))
    checked = subprocess.run(common + ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=120)
    assert "<title>ok</title>" in checked.stdout
    subprocess.run(common + ["--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.is_file() and shot.stat().st_size > 20_000  # a rendered page with figures, not a blank one
    target = os.environ.get("INFLUENCE_SCREENSHOT")
    if target:  # keep the screenshot to look at (make test-browser sets it)
        shutil.copy(shot, target)


def _visible_text(page: str) -> str:
    """The page without its scripts and styles (the explorer's data and the vendored library)."""
    return re.sub(r"<(script|style)\b[^>]*>.*?</\1>", "", page, flags=re.DOTALL)


def _explorer_json(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page, re.DOTALL)
    assert found, "no explorer data in the page"
    return json.loads(found.group(1))


def test_report_leads_with_the_main_selection(reported_run):
    page = (reported_run / "report.html").read_text(encoding="utf-8")
    anchors = re.findall(r'<section id="([\w-]+)">', page)
    assert anchors[:3] == ["selection", "agreement", "explorer"] and anchors[-1] == "run"
    assert anchors.index("ranking-0") > anchors.index("explorer")
    # the main ranking: LESS among several; its selected examples with their text, score and rank
    first = page[page.index('<section id="selection">'):page.index('<section id="agreement">')]
    assert "Selection: less for tgt" in first
    pool = {example.id: example for example in Run(reported_run).pool()}
    summary = json.loads((reported_run / "rank-less-tgt" / "summary.json").read_text(encoding="utf-8"))
    table = load_rankings(reported_run / "rank-less-tgt").set_index("id")
    for example_id in summary["selected_ids"]:
        row = f"<tr><td>{table.loc[example_id, 'rank']}</td><td>{table.loc[example_id, 'score']:.4g}</td>"
        assert row in first and pool[example_id].messages[0]["content"] in first and pool[example_id].response in first
    # docstrings rendered: no raw reST markers, the literal block a <pre>
    visible = _visible_text(page)
    assert "``" not in visible and "::" not in visible
    assert "<code>x</code>" in first and "<pre>task_score(x, s)" in first
    # the warm-up settings a table, not a dict
    settings = page[page.index('<section id="run">'):]
    assert '<table class="settings">' in settings and "<tr><th>learning_rate</th><td>0.005</td></tr>" in settings
    assert "{'epochs'" not in page


def test_report_refuses_an_unknown_main_ranking(reported_run, tmp_path):
    from influence.errors import InfluenceError
    from influence.report.html import write_report

    with pytest.raises(InfluenceError, match="no ranking 'rank-nope'.*rank-less-tgt"):
        write_report(reported_run, tmp_path / "report.html", main="rank-nope")
    out = tmp_path / "random-first.html"
    result = CliRunner().invoke(main, ["report", "--run", str(reported_run), "--out", str(out), "--main",
                                       "rank-random-tgt", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["report"] == str(out)
    assert "<section id=\"selection\"><h2>Selection: random" in out.read_text(encoding="utf-8")


def test_explorer_holds_every_example_under_every_ranking(reported_run):
    page = (reported_run / "report.html").read_text(encoding="utf-8")
    data = _explorer_json(page)
    pool = Run(reported_run).pool()
    assert data["id"] == [example.id for example in pool]
    rankings = run_rankings(reported_run)
    assert [r["name"] for r in data["rankings"]] == list(rankings)
    assert data["rankings"][data["main"]]["name"] == "rank-less-tgt"
    where = {example_id: i for i, example_id in enumerate(data["id"])}
    for column in data["rankings"]:
        table, summary = rankings[column["name"]]
        assert len(column["score"]) == len(column["rank"]) == len(column["selected"]) == len(pool)
        for example_id, score, rank_ in zip(table["id"], table["score"], table["rank"]):
            assert column["rank"][where[example_id]] == rank_
            assert column["score"][where[example_id]] == pytest.approx(score, rel=1e-5)
        assert {data["id"][i] for i, chosen in enumerate(column["selected"]) if chosen} == set(summary["selected_ids"])
    assert {data["sources"][s] for s in data["source"]} == {"chat.jsonl", "p3.jsonl"}
    assert data["prompt"][0] == pool[0].messages[0]["content"] and data["length"][0] == len(pool[0].response)
    assert "Tabulator" in page and "new Tabulator(" in page  # the vendored library and its glue, inline


def test_explorer_data_cuts_rows_and_keeps_each_full_text_once():
    long_prompt = "why " * 400
    pool = [Example("short", "a.jsonl", [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."}],
                    {}),
            Example("long", "a.jsonl", [{"role": "user", "content": long_prompt},
                                        {"role": "assistant", "content": "Because."}], {}, task="logic"),
            Example("chat", "b.jsonl", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1?"},
                                        {"role": "assistant", "content": "2"}], {})]
    table = pd.DataFrame({"id": ["long", "chat", "short"], "score": [0.5, np.nan, -1.0], "rank": [1, 3, 2]})
    data = explorer_data(pool, {"rank-x": (table, {"method": "x", "selected_ids": ["long"], "n_selected": 1,
                                                   "selection": {"mode": "top"}})})
    assert data["full"][0] is None and data["prompt"][0] == "Hi?"  # the row's text is the whole example
    assert len(data["prompt"][1]) == PREVIEW_CHARS and data["full"][1] == [["user", long_prompt],
                                                                         ["assistant", "Because."]]
    assert data["full"][2][0] == ["system", "Be brief."] and data["tasks"] == ["logic"] and data["task"] == [-1, 0, -1]
    assert data["rankings"][0]["score"] == [-1.0, 0.5, None] and data["rankings"][0]["rank"] == [2, 1, 3]
    assert data["rankings"][0]["selected"] == [0, 1, 0] and data["main"] is None
    html_text = explorer_section(data)
    assert long_prompt not in html_text.replace(json.dumps(long_prompt)[1:-1], "", 1)  # the full text once
    from influence.errors import InfluenceError

    with pytest.raises(InfluenceError, match="duplicate ids"):
        explorer_data(pool + pool[:1], {})
    with pytest.raises(InfluenceError, match="not in the pool"):
        explorer_data(pool[:2], {"rank-x": (table, {"method": "x", "selected_ids": [], "selection": {"mode": "top"},
                                                    "n_selected": 0})})


def test_docstrings_are_rendered_not_shown_as_rest():
    doc = ("Scores ``x`` with :func:`~influence.score` and `y`::\n\n    a = b::c\n    d\n\n"
           "* one ``k``\n* two\n\nA <b> ends here ::\n\n    block\n\nSo **bold** and *this*; a * b stays.")
    rendered = rest_html(doc)
    assert rendered.startswith("<p>Scores <code>x</code> with <code>influence.score</code> and <code>y</code>:</p>")
    assert "<pre>a = b::c\nd</pre>" in rendered and "<ul><li>one <code>k</code></li><li>two</li></ul>" in rendered
    assert "<p>A &lt;b&gt; ends here</p>" in rendered and "<b>bold</b> and <em>this</em>; a * b stays" in rendered
    assert plain_text("train ``x`` (see :class:`Run`)::") == "train x (see Run):"


def test_main_ranking_is_the_only_one_else_less_else_the_latest(tmp_path):
    for name, method, age in (("rank-a", "el2n", 30), ("rank-b", "random", 10), ("compare-t/less", "less", 20),
                              ("rank-less-t", "less", 40)):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(json.dumps({"method": method}))
        os.utime(tmp_path / name / "summary.json", (time.time() - age, time.time() - age))
    summaries = {"rank-a": "el2n", "rank-b": "random", "compare-t/less": "less", "rank-less-t": "less"}
    rankings = {name: (None, {"method": method}) for name, method in summaries.items()}
    assert main_ranking(tmp_path, {"rank-a": rankings["rank-a"]}) == "rank-a"
    assert main_ranking(tmp_path, rankings) == "compare-t/less"  # LESS, the more recent of the two
    assert main_ranking(tmp_path, {n: rankings[n] for n in ("rank-a", "rank-b")}) == "rank-b"
    assert main_ranking(tmp_path, {}) is None


def test_figure_labels_fit_inside_the_figure(reported_run):
    from influence.report.figures import _pyplot, score_distribution, score_vs_length, subtask_coverage_figure

    plt = _pyplot()
    table = load_rankings(reported_run / "rank-less-tgt")
    summary = json.loads((reported_run / "rank-less-tgt" / "summary.json").read_text(encoding="utf-8"))
    summary["score_meaning"] += " Or: higher = " + "a much longer description of the most helpful examples " * 2
    for draw in (score_distribution, score_vs_length, subtask_coverage_figure):
        fig = draw(table, summary)
        fig.canvas.draw()
        drawn, canvas = fig.get_tightbbox(fig.canvas.get_renderer()), fig.bbox_inches  # in inches
        assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01 and drawn.x1 <= canvas.x1 + 0.01 and \
            drawn.y1 <= canvas.y1 + 0.01, f"{draw.__name__}: a label runs past the figure's edge ({drawn} in {canvas})"
        plt.close(fig)


def _kept_screenshot(suffix: str) -> Path | None:
    """Where to keep a screenshot, beside INFLUENCE_SCREENSHOT's (make test-browser sets it); None when unset."""
    target = os.environ.get("INFLUENCE_SCREENSHOT")
    return Path(target).with_name(f"{Path(target).stem}-{suffix}.png") if target else None


class DevTools:
    """A headless chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: it reads
    commands on fd 3 and writes replies and events on fd 4, each a JSON message ended by a NUL byte): no
    websocket client, no browser download. One page; its console errors and warnings are collected."""

    def __init__(self, chromium: str, folder: Path, width: int = 1280, height: int = 900):
        commands_in, self._commands = os.pipe()
        self._replies, replies_out = os.pipe()

        def on_fds_3_and_4():  # in the child, before chromium starts
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_in, replies_out)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self._log = folder / "chromium.log"
        with open(self._log, "wb") as log:
            self.process = subprocess.Popen(
                [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                 "--allow-file-access-from-files", f"--user-data-dir={folder / 'profile'}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=False, preexec_fn=on_fds_3_and_4)
        os.close(commands_in)
        os.close(replies_out)
        self._buffer, self._last_id, self.events, self.session = b"", 0, [], None
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.session = None
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._replies)

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._replies], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe: " + self._log.read_text(errors="replace")[-2000:])
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        """Send one command (to the page once attached) and return its result; events met on the way are kept."""
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params or {}}
        if self.session is not None:
            message["sessionId"] = self.session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._commands, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        """The expression's value once it is truthy (polled)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            time.sleep(0.05)

    def open(self, url: str, timeout: float = 120) -> None:
        self.send("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'", timeout)

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element (scrolled into view first)."""
        x, y = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                             "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
                             "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def type(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", {"text": text})

    def screenshot(self, path: Path) -> None:
        self.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))

    def console_problems(self) -> list[str]:
        """The page's console errors and warnings, and its uncaught exceptions, so far."""
        self.evaluate("0")  # collect the events sent meanwhile
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning", "assert"):
                found.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"]))
            elif event.get("method") == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details.get("text"))
            elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                found.append(params["entry"]["text"])
        return found


VISIBLE_IDS = ("[...document.querySelectorAll('#explorer-table .tabulator-row')]"
               ".map(row => row.querySelector('[tabulator-field=id]').textContent)")


@pytest.mark.browser
def test_explorer_searches_sorts_and_shows_an_example(reported_run, tmp_path):
    chromium = _chromium_or_skip()
    data = _explorer_json((reported_run / "report.html").read_text(encoding="utf-8"))
    names = [column["name"] for column in data["rankings"]]
    by_random = load_rankings(reported_run / "rank-random-tgt")["id"].tolist()
    with DevTools(chromium, tmp_path) as browser:
        browser.open((reported_run / "report.html").resolve().as_uri())
        browser.wait_for("window.influenceExplorer && window.influenceExplorer.readyMs !== null")
        first_screen = _kept_screenshot("first-screen")
        if first_screen:
            browser.screenshot(first_screen)
        assert browser.evaluate("document.getElementById('explorer-count').textContent") == "23 of 23 examples"
        main_order = load_rankings(reported_run / "rank-less-tgt")["id"].tolist()
        shown = browser.evaluate(VISIBLE_IDS)
        assert len(shown) >= 10 and shown == main_order[:len(shown)]  # first sorted by the main ranking
        # sort: a click on the random ranking's rank column
        browser.click(f".tabulator-col[tabulator-field=r{names.index('rank-random-tgt')}] .tabulator-col-title")
        shown = browser.wait_for(f"(ids => ids[0] === {json.dumps(by_random[0])} && ids)({VISIBLE_IDS})", 10)
        assert shown == by_random[:len(shown)]
        # search: the p3 examples ("Colour i?"), still in the random ranking's order
        browser.type("#explorer-search", "colour")
        browser.wait_for("document.getElementById('explorer-count').textContent === '9 of 23 examples'", 10)
        shown = browser.evaluate(VISIBLE_IDS)
        assert shown == [example_id for example_id in by_random if example_id.startswith("p3.jsonl")]
        # a click on a row shows the whole example, with its score under every ranking
        browser.click("#explorer-table .tabulator-row [tabulator-field=prompt]")
        panel = browser.wait_for("!document.getElementById('explorer-example').hidden && "
                                 "document.getElementById('explorer-example').innerText", 10)
        assert panel.startswith(shown[0]) and "Colour" in panel and all(name in panel for name in names)
        explorer = _kept_screenshot("explorer")
        if explorer:
            browser.evaluate("document.getElementById('explorer').scrollIntoView()")
            browser.screenshot(explorer)
        # filters: one ranking (the others' columns hidden, rows in its order), its selection, one source
        random_index, less_index = names.index("rank-random-tgt"), names.index("rank-less-tgt")
        for control, value in (("search", ""), ("ranking", str(random_index)), ("selected", "yes")):
            browser.evaluate(f"(e => {{ e.value = {json.dumps(value)}; e.dispatchEvent(new Event("
                             f"e.tagName === 'SELECT' ? 'change' : 'input')); }})(document.getElementById("
                             f"'explorer-{control}'))")
        selected = json.loads((reported_run / "rank-random-tgt" / "summary.json").read_text())["selected_ids"]
        browser.wait_for(f"document.getElementById('explorer-count').textContent === '{len(selected)} of 23 examples'",
                         10)
        assert browser.evaluate(VISIBLE_IDS) == [i for i in by_random if i in selected]
        assert browser.evaluate(f"document.querySelector('.tabulator-col[tabulator-field=s{less_index}]')"
                                ".offsetParent === null")
        browser.evaluate("(e => { e.value = 's:p3.jsonl'; e.dispatchEvent(new Event('change')); })"
                         "(document.getElementById('explorer-group'))")
        p3_selected = [i for i in by_random if i in selected and i.startswith("p3.jsonl")]
        browser.wait_for("document.getElementById('explorer-count').textContent === "
                         f"'{len(p3_selected)} of 23 examples'", 10)
        assert browser.evaluate(VISIBLE_IDS) == p3_selected
        assert not browser.console_problems(), browser.console_problems()


def synthetic_explorer(n: int, rankings: int = 3) -> str:
    """A page holding only an explorer of ``n`` synthetic examples (a few long) under ``rankings`` rankings."""
    rng = np.random.default_rng(0)
    words = np.array("gradient target example model answer question data loss subtask token pool".split())
    pool = []
    for i in range(n):
        prompt = " ".join(words[rng.integers(0, len(words), 12 if i % 50 else 120)])
        pool.append(Example(f"ex-{i}", f"source-{i % 4}.jsonl",
                            [{"role": "user", "content": f"Question {i}: {prompt}?"},
                             {"role": "assistant", "content": f"Answer {i}."}], {}, task=f"task-{i % 7}"))
    ids = np.array([e.id for e in pool])
    tables = {}
    for k in range(rankings):
        score = rng.normal(size=n)
        order = np.argsort(-score)
        table = pd.DataFrame({"id": ids[order], "score": score[order], "rank": np.arange(1, n + 1)})
        tables[f"rank-method{k}"] = (table, {"method": f"method{k}", "n_selected": n // 10,
                                             "selected_ids": table["id"][: n // 10].tolist(),
                                             "selection": {"mode": "top"}})
    data = explorer_data(pool, tables, "rank-method0")
    return html_page("explorer of synthetic examples", [("explorer", "Example explorer", explorer_section(data))])


@pytest.mark.browser
def test_explorer_loads_100k_examples(tmp_path):
    chromium = _chromium_or_skip()
    page = tmp_path / "explorer.html"
    page.write_text(synthetic_explorer(100_000), encoding="utf-8")
    with DevTools(chromium, tmp_path) as browser:
        browser.open(page.as_uri())
        loaded = browser.wait_for("window.influenceExplorer && window.influenceExplorer.readyMs", 300)
        rows = browser.evaluate(VISIBLE_IDS)
        print(f"\n100k-example explorer ({page.stat().st_size / 2**20:.1f} MiB page): rows drawn {loaded:.0f} ms "
              f"after navigation start; {len(rows)} rows in the DOM")
        assert 0 < len(rows) < 1000  # virtual scrolling: only the rows in view are drawn
        assert browser.evaluate("document.getElementById('explorer-count').textContent") == "100000 of 100000 examples"
        browser.type("#explorer-search", "question 99999:")
        browser.wait_for("document.getElementById('explorer-count').textContent === '1 of 100000 examples'", 60)
        assert browser.evaluate(VISIBLE_IDS) == ["ex-99999"]
        kept = _kept_screenshot("explorer-100k")
        if kept:
            browser.screenshot(kept)
        assert not browser.console_problems(), browser.console_problems()
