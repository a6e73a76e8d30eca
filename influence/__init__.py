"""influence: which training examples matter for the ability you care about.

The pipeline as Python calls (the CLI is a thin layer over these)::

    from influence import WarmupConfig, LoraSettings, warmup, project_grads, rank
    warmup(WarmupConfig(model="smollm2-135m", train_files=["pool.jsonl"], out="runs/x"))
    project_grads("runs/x", target="mmlu_val")
    table = rank("runs/x", target="mmlu_val", method="less", fraction=0.05, out="runs/x/sel")
    head = less_top_k("runs/x", target="mmlu_val", k=1000)  # memory independent of the pool size
    train_subsets("runs/x", k=64, alpha=0.5, targets=["mmlu_val"])  # the counterfactual engine
    evaluate_lds("runs/x", "mmlu_val", ["less", "trak", "datamodel", "random"], k=16)
    evaluate_select(["less", "random", "full"], run_dir="runs/x", target="mmlu_val")
"""

__version__ = "0.1.0"

_API = {
    "WarmupConfig": "train.warmup",
    "warmup": "train.warmup",
    "LoraSettings": "models.loading",
    "ModelLoading": "models.loading",
    "register_model": "models.loading",
    "project_grads": "gradients.collect",
    "compute_forward_scores": "scoring.forward",
    "rank": "selection.rank",
    "less_top_k": "scoring.less.stream",
    "load_rankings": "selection.outputs",
    "load_pool": "data.formats",
    "load_target": "data.targets",
    "evaluate_noisy": "evaluate.noisy",
    "TrainSettings": "train.loop",
    "train_subsets": "train.subsets",
    "train_masks": "train.subsets",
    "evaluate_lds": "evaluate.lds",
    "Grid": "evaluate.select",
    "evaluate_select": "evaluate.select",
    "Diversify": "selection.diversify",
    "load_space": "gradients.spaces",
    "run_status": "report.status",
    "Columns": "data.formats",
    "Run": "train.run",
}


def __getattr__(name: str):
    """Import the API lazily so `import influence` stays cheap."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'influence' has no attribute {name!r}")


__all__ = list(_API)


def __dir__() -> list[str]:
    """``dir(influence)`` lists the public API (the lazily imported names included)."""
    return sorted(set(globals()) | set(__all__))
