"""Evaluations that say whether a score can be trusted."""
