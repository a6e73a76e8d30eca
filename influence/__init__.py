"""influence: which training examples matter for the ability you care about.

The pipeline as Python calls (the CLI is a thin layer over these)::

    from influence import WarmupConfig, LoraSettings, warmup, project_grads, rank
    warmup(WarmupConfig(model="smollm2-135m", train_files=["pool.jsonl"], out="runs/x"))
    project_grads("runs/x", target="mmlu_val")
    table = rank("runs/x", target="mmlu_val", method="less", fraction=0.05, out="runs/x/sel")
    head = less_top_k("runs/x", target="mmlu_val", k=1000)  # memory independent of the pool size
"""

__version__ = "0.1.0"

_API = {
    "WarmupConfig": "training",
    "warmup": "training",
    "LoraSettings": "models",
    "project_grads": "collect",
    "compute_forward_scores": "scoring.forward",
    "rank": "selection",
    "less_top_k": "scoring.less",
    "load_rankings": "selection",
    "load_pool": "data",
    "load_target": "targets",
    "evaluate_noisy": "evaluation",
}


def __getattr__(name: str):
    """Import the API lazily so `import influence` stays cheap."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'influence' has no attribute {name!r}")


__all__ = list(_API)
