"""Stage 4, per-example vectors: exact per-example LoRA gradients, the projector, the gradient stores and their
collection (``project-grads``), representations, and the spaces diversity is measured in."""
