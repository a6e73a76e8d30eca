"""Stage 8, reporting: what a run holds (``status``), its figures, the HTML report and the exploration notebook."""
