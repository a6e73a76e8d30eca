"""``python -m influence ...``: the command line (also what ``torchrun -m influence`` starts per process)."""

from .cli import main

main(prog_name="influence")
