"""The API reference builds from the docstrings (what `make docs` does), and the docs pages link up."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    for page in ("docs/troubleshooting.md", "docs/scaling.md", "docs/architecture.md"):
        assert (ROOT / page).is_file() and page in readme
