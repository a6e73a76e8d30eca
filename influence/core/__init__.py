"""The run's plumbing, below every stage: where stores live (local folders or fsspec URLs), the one chunked
store format and its publication, store naming, the writer lock, and the one unit-of-work mechanism."""
