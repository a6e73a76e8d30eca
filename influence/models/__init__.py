"""Stage 2, models: base models and LoRA adapters, the response-only forward pass and its losses, what a model
does on examples (outcomes, generation), and per-example passes over a chunked store."""
