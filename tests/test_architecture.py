"""The pipeline's stages keep their order: each imports only the stages below it (the import-linter contracts in
pyproject.toml), no module imports another in a circle, and the kernels import nothing of the package."""

from __future__ import annotations

import ast
import graphlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stages_import_only_earlier_stages(capsys):
    from importlinter.cli import lint_imports

    previous = Path.cwd()
    os.chdir(ROOT)  # the contracts name the package, found from the repository root
    try:
        status = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    finally:
        os.chdir(previous)
    assert status == 0, capsys.readouterr().out[-4000:]


def test_no_module_imports_another_in_a_circle():
    import grimp

    graph = grimp.build_graph("influence")
    order = graphlib.TopologicalSorter({m: graph.find_modules_directly_imported_by(m) for m in graph.modules})
    try:
        order.prepare()
    except graphlib.CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_the_kernels_import_nothing_of_the_package():
    """influence.kernels is a namespace package import-linter does not see: checked here instead."""
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 or not (node.module or "").startswith("influence"), f"{path.name}: {ast.unparse(node)}"
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("influence") for alias in node.names), path.name
