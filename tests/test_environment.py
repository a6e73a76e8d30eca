"""A fresh machine installs and passes: nothing of ours shadows an installed package when Python starts in the
repository root, every module the package imports is declared in pyproject.toml (and every declared one is
used), the lock is well formed, and the notebooks are generated from their one source."""

from __future__ import annotations

import ast
import importlib.machinery
import os
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
OUR_DISTRIBUTION = "influence"

# Declared dependencies that no module of ours imports by name, and why they are declared all the same.
USED_INDIRECTLY = {
    "gguf": "transformers reads GGUF checkpoints (the embedded SmolLM2) through it",
    "distributed": "imported as dask.distributed, dask's front for it",
    "ipykernel": "the kernel nbclient runs the notebooks in",
    "einconv": "kronfluence's own dependency (the Makefile installs kronfluence without its dependencies)",
    "opt-einsum": "kronfluence's own dependency (the Makefile installs kronfluence without its dependencies)",
}


def _from_root(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c code`` started in the repository root, which Python puts first on ``sys.path``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_python_started_in_the_repository_root_loads_a_model(tmp_path):
    """transformers imports Hugging Face's ``kernels`` while loading any model; a folder of ours must not stand in."""
    code = (
        "import sys\n"
        "import transformers.modeling_utils, influence.kernels.projection, influence.kernels.scoring\n"
        "from transformers import AutoModelForCausalLM\n"
        "from influence.models.loading import build_tiny_llama\n"
        "model, _ = build_tiny_llama()\n"
        "model.save_pretrained(sys.argv[1])\n"
        "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)\n"
    )
    result = _from_root(code, str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "LlamaForCausalLM"


def test_the_kernels_folder_is_never_imported_as_kernels():
    result = _from_root("import kernels.scoring")
    assert result.returncode != 0
    # Hugging Face's package, where it is installed, has no such module; elsewhere the module refuses the name.
    assert "No module named 'kernels.scoring'" in result.stderr or "import influence.kernels.scoring" in result.stderr


# Top-level names a distribution ships by mistake, which nothing imports: kronfluence's and textstat's wheels install
# their own test suites as a package named `tests`, which ours shadows in the repository root only.
STRAY = {"tests": {"kronfluence", "textstat"}}


def test_no_top_level_name_of_ours_shadows_an_installed_distribution():
    """Every top-level name an installed distribution provides resolves, from the repository root, to that
    distribution: the root holds no regular package or module of that name (a folder without ``__init__.py``
    is at most a namespace portion, which never shadows a regular package)."""
    shadowing = []
    for name, providers in sorted(packages_distributions().items()):
        if set(providers) <= {OUR_DISTRIBUTION} or set(providers) <= STRAY.get(name, set()):
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, [str(ROOT)])
        if spec is not None and spec.loader is not None:
            shadowing.append(f"{spec.origin} shadows {name!r} of {sorted(set(providers))}")
    assert not shadowing, shadowing


# --- every import declared, every declaration used --------------------------------------------------------------


def _name(requirement: str) -> str:
    return _normalized(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    """The runtime dependencies and each extra's, by normalised distribution name (self-references expanded)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    raw = project.get("optional-dependencies", {})

    def expand(extra: str) -> set[str]:
        names = set()
        for requirement in raw[extra]:
            if _name(requirement) == OUR_DISTRIBUTION:
                for other in re.search(r"\[(.*)\]", requirement).group(1).split(","):
                    names |= expand(other.strip())
            else:
                names.add(_name(requirement))
        return names

    return runtime, {extra: expand(extra) for extra in raw}


def _imports(folders: list[str]) -> dict[str, dict[str, bool]]:
    """Third-party top-level modules imported by the ``.py`` files under ``folders``: module -> {file: whether
    the import runs when the file is imported (outside any function)}."""
    local = {p.stem for folder in folders for p in (ROOT / folder).glob("*.py")} | {OUR_DISTRIBUTION, "tests"}
    found: dict[str, dict[str, bool]] = {}

    def visit(node: ast.AST, path: str, at_import: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                modules = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                modules = [child.module]
            else:
                visit(child, path, at_import and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, {})
                    found[top][path] = found[top].get(path, False) or at_import

    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            visit(ast.parse(path.read_text(encoding="utf-8")), str(path.relative_to(ROOT)), True)
    return found


def _distributions(module: str) -> set[str]:
    """The distributions that provide a top-level module (its own name when none is installed, e.g. tomli)."""
    return {_normalized(d) for d in packages_distributions().get(module, [module])}


def test_every_module_the_package_imports_is_declared():
    runtime, extras = _declared()
    optional = set().union(*extras.values())
    problems = []
    for module, files in _imports(["influence", "kernels"]).items():
        provided = _distributions(module)
        at_import = sorted(f for f, eager in files.items() if eager)
        if at_import and not provided & runtime:
            problems.append(f"{module} (imported when {at_import[0]} loads) is not a runtime dependency")
        elif not provided & (runtime | optional):
            problems.append(f"{module} (imported in {sorted(files)[0]}) is not declared in pyproject.toml")
    assert not problems, problems


def test_every_module_the_tests_and_benchmarks_import_is_declared():
    runtime, extras = _declared()
    missing = [f"{module} ({sorted(files)[0]})" for module, files in _imports(["tests", "scripts"]).items()
               if not _distributions(module) & (runtime | extras["dev"] | extras["parity"] | extras["peers"])]
    assert not missing, f"imported but not declared (runtime, the dev, parity or peers extra): {missing}"


def test_every_declared_dependency_is_used():
    runtime, extras = _declared()
    package = set().union(*(_distributions(m) for m in _imports(["influence", "kernels"])))
    anywhere = package | set().union(*(_distributions(m) for m in _imports(["tests", "scripts"])))
    unused_at_run_time = sorted(runtime - package - set(USED_INDIRECTLY))
    assert not unused_at_run_time, f"runtime dependencies the package never imports: {unused_at_run_time}"
    for extra, names in extras.items():
        unused = sorted(names - anywhere - set(USED_INDIRECTLY))
        assert not unused, f"[{extra}] declares {unused}, which nothing imports"
    assert not (runtime & {"traker", "pytest", "pdoc", "psutil"}), "test and benchmark tools belong in the dev extra"


def test_the_lock_pins_every_declared_distribution_but_the_machine_specific_builds():
    # `make test-latest` deselects this test: its environment is the newest releases, and the lock is written
    # from it only after it passes (`make lock`).
    lock = ROOT / "constraints.txt"
    assert lock.is_file(), "no constraints.txt: `make lock` writes it"
    pins = {_normalized(name): version for name, version
            in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", lock.read_text(encoding="utf-8"), flags=re.M)}
    assert not {"torch", "triton"} & set(pins), "the lock must not choose a CPU or a CUDA build of torch"
    assert not [name for name in pins if name.startswith(("nvidia-", "cuda-"))]
    runtime, extras = _declared()
    unpinned = sorted((runtime | extras["dev"] | extras["parity"]) - set(pins) - {"torch", "triton", "tomli"})
    assert not unpinned, f"declared but not in constraints.txt (run `make lock`): {unpinned}"


# --- the notebooks ------------------------------------------------------------------------------------------------


def test_the_notebooks_are_generated_from_their_one_source():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_notebook.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (ROOT / "notebooks" / "explore_rankings.ipynb").is_file()
