"""influence: which training examples matter for the ability you care about."""

__version__ = "0.1.0"
