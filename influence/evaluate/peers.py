"""Kronfluence (Bae, Grosse et al.; PyPI ``kronfluence``, the ``parity`` extra) run on a run's model and examples:
the reference our EK-FAC and K-FAC are checked against (``tests/test_curvature.py``) and a peer in the LDS head to
head (``scripts/lds_peers.py``). Its own ``Analyzer`` and ``Task``, tracking the LoRA linears of the run's last
checkpoint; its scores keep its sign, which is ours (positive = training on the pool example lowers the target
example's loss)."""

from __future__ import annotations

from pathlib import Path
import numpy as np

from ..data.formats import Example
from ..data.templates import IGNORE_INDEX, collate, encode_example
from ..models.loading import load_adapter
from ..train.run import Run


def kronfluence_scores(run: Run, fit: list[Example], pool: list[Example], targets: dict[str, list[Example]],
                       folder: str | Path, strategy: str = "ekfac", damping: float | None = None, empirical: bool = False,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """Per target (name -> examples), the (n_pool x n_target) pairwise scores from Kronfluence fitted once on ``fit``:
    the training loss of an example summed over its response tokens (as Kronfluence's language-model examples have
    it, and as our training weighs examples), the measurement a target example's mean loss; sampled labels unless
    ``empirical``; ``damping`` (None = its heuristic, 0.1 x the mean eigenvalue per module)."""
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    base, tokenizer, _ = run.load_base_model()
    model = load_adapter(base, run.checkpoints()[-1].path).eval()
    tracked = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and ("lora_A" in n or "lora_B" in n)]

    def loss(batch, model, sample: bool = False, summed: bool = True):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        if sample:  # the true Fisher: each response label drawn from the model's prediction
            with torch.no_grad():
                drawn = torch.multinomial(torch.softmax(logits.reshape(-1, logits.shape[-1]), -1), 1)
                labels = torch.where(labels != IGNORE_INDEX, drawn.view(labels.shape), labels)
        tokens = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                                   reduction="none")
        if summed:
            return tokens.sum()
        return (tokens.sum(1) / (labels != IGNORE_INDEX).sum(1).clamp(min=1)).sum()

    class ResponseLoss(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return loss(batch, model, sample)

        def compute_measurement(self, batch, model):
            return loss(batch, model, summed=False)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    def dataset(examples: list[Example]) -> list[dict]:
        return [{k: v[0] for k, v in collate([encode_example(e, tokenizer, run.max_length)],
                                             tokenizer.pad_token_id).items()} for e in examples]

    def pad(items: list[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in items)
        fills = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {key: torch.stack([torch.nn.functional.pad(item[key], (0, width - len(item[key])), value=fill)
                                  for item in items]) for key, fill in fills.items()}

    task = ResponseLoss()
    model = prepare_model(model, task)
    analyzer = Analyzer("influence", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=str(folder))
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0, collate_fn=pad))
    torch.manual_seed(seed)
    analyzer.fit_all_factors(strategy, dataset(fit), per_device_batch_size=8, overwrite_output_dir=True,
                             factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=empirical))
    scores = {}
    for name, examples in targets.items():
        analyzer.compute_pairwise_scores(f"scores-{name}", strategy, query_dataset=dataset(examples),
                                         train_dataset=dataset(pool), per_device_query_batch_size=len(examples),
                                         per_device_train_batch_size=8, score_args=ScoreArguments(damping_factor=damping),
                                         overwrite_output_dir=True)
        scores[name] = analyzer.load_pairwise_scores(f"scores-{name}")["all_modules"].double().numpy().T
    return scores
