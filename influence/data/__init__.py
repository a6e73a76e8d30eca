"""Stage 1, data: the pool's formats read into examples, chat templates and tokenisation, the target registry."""
