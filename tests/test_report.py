"""influence report: a self-contained HTML page of a run; in a real headless browser (make test-browser)
it loads without console errors and shows its figures."""

import os
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from influence.cli import main
from influence.gradients.curvature import fit_curvature
from influence.report.figures import selection_edges, subtask_coverage
from influence.selection.outputs import load_rankings
from influence.selection.rank import rank


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


@pytest.mark.browser
def test_report_in_a_headless_browser(reported_run, tmp_path):
    if _chromium() is None:  # make test-browser installs it first, so there this fails rather than skips
        if os.environ.get("INFLUENCE_REQUIRE_BROWSER"):
            pytest.fail("no chromium on PATH")
        pytest.skip("no chromium (make test-browser installs it)")
    page = (reported_run / "report.html").resolve()
    shot = tmp_path / "report.png"
    common = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
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
