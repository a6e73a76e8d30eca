"""Training: the LoRA warm-up (LESS, step 1) and the models trained on subsets of the pool."""
