"""Build the API reference from the docstrings with pdoc (``make docs``): ``docs/api/index.html``.

The top-level names are imported lazily by ``influence/__init__.py`` (so ``import influence`` stays
cheap); they are resolved here first so that pdoc documents them on the package's page. Every module
of the package gets its own page.
"""

from __future__ import annotations

import argparse
import pkgutil
from pathlib import Path

import pdoc

import influence


def modules() -> list[str]:
    """The package and its modules (the kernels live in their own folder, installed as influence.kernels)."""
    import influence.kernels

    names = ["influence"]
    for package, prefix in ((influence, "influence."), (influence.kernels, "influence.kernels.")):
        if package is influence.kernels:
            names.append("influence.kernels")
        for info in pkgutil.walk_packages(package.__path__, prefix=prefix):
            if not info.name.endswith("__main__") and ".resources" not in info.name:
                names.append(info.name)
    return list(dict.fromkeys(names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/api")
    args = parser.parse_args()
    for name in influence.__all__:  # the lazy names, resolved for pdoc
        setattr(influence, name, getattr(influence, name))
    pdoc.render.configure(docformat="restructuredtext", footer_text=f"influence {influence.__version__}")
    pdoc.pdoc(*modules(), output_directory=Path(args.out))
    print(f"API reference: {Path(args.out) / 'index.html'} ({len(modules())} modules)")


if __name__ == "__main__":
    main()
