"""influence: which training examples matter for the ability you care about.

The pipeline as Python calls (the CLI is a thin layer over these)::

    from influence import WarmupConfig, LoraSettings, warmup, project_grads, rank
    warmup(WarmupConfig(model="smollm2-135m", train_files=["pool.jsonl"], out="runs/x"))
    project_grads("runs/x", "mmlu_val")
    table = rank("runs/x", "mmlu_val", method="less", fraction=0.05, out="runs/x/sel")
    table = rank("runs/x", "mmlu_val", RankSettings(method="trak", top_k=100))  # a settings object
    scores = score("grand", "runs/x")  # one method's Scores, no ranking written
    head = less_top_k("runs/x", "mmlu_val", k=1000)  # memory independent of the pool size
    train_subsets("runs/x", k=64, alpha=0.5, targets=["mmlu_val"])  # the counterfactual engine
    evaluate_lds("runs/x", "mmlu_val", ["less", "trak", "datamodel", "random"], k=16)
    evaluate_select(["less", "random", "full"], run_dir="runs/x", target="mmlu_val")

Every verb takes its command's settings object (``RankSettings``, ``ProjectSettings``, ...) and/or its fields
as keywords: the same fields, ranges and messages as the command line's options.
"""

__version__ = "0.1.0"

_API = {
    "WarmupConfig": "train.warmup",
    "warmup": "train.warmup",
    "LoraSettings": "models.loading",
    "ModelLoading": "models.loading",
    "register_model": "models.loading",
    "project_grads": "gradients.collect",
    "ProjectSettings": "gradients.collect",
    "compute_forward_scores": "scoring.forward",
    "score": "scoring",
    "attribution": "scoring",
    "RankSettings": "selection.settings",
    "CompareSettings": "selection.compare",
    "compare_methods": "selection.compare",
    "rank": "selection.rank",
    "less_top_k": "scoring.less",
    "load_rankings": "selection.outputs",
    "load_pool": "data.formats",
    "load_target": "data.targets",
    "NoisySettings": "evaluate.noisy",
    "evaluate_noisy": "evaluate.noisy",
    "TrainSettings": "train.loop",
    "SubsetSettings": "train.subsets",
    "UnitSettings": "core.units",
    "train_subsets": "train.subsets",
    "train_masks": "train.subsets",
    "LdsSettings": "evaluate.lds",
    "evaluate_lds": "evaluate.lds",
    "SelectSettings": "evaluate.select",
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
