"""Triton kernels with torch fallbacks, installed as ``influence.kernels``.

Every kernel here has a torch path that gives the same numbers and is the default on CPU. Set
``TRITON_INTERPRET=1`` before importing to run the Triton kernels on CPU (slow; for tests).
"""

from .projection import HAVE_TRITON  # noqa: F401
