"""Stage 6, selection: ``rank`` orders the pool by a method's scores and writes the ranking and the selected
subset (selection modes, diversity-aware selection, outputs), and ``compare`` sets methods side by side."""
