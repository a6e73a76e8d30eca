"""mem against a token-by-token greedy decoding written here (argmax of the next-token logits, no generate())."""

import numpy as np
import torch

from influence.data.templates import prompt_ids
from influence.models.loading import load_adapter
from influence.scoring.base import get_method
from influence.scoring.extraction import memorization_score, response_tokens
from influence.train.run import Run


def test_mem_equals_a_hand_greedy_decoding(tiny_run):
    run = Run(tiny_run["run"])
    method = get_method("mem")
    scores = method.scores(run, None, method.options({"window": 6}))
    base, tokenizer, _ = run.load_base_model(torch.device("cpu"))
    model = load_adapter(base, run.checkpoints()[-1].path).eval()
    for index, example in enumerate(run.pool()[:6]):
        ids = torch.tensor([prompt_ids(example, tokenizer, run.max_length)])
        generated = []
        with torch.no_grad():
            for _ in range(6):
                token = int(model(input_ids=ids).logits[0, -1].argmax())
                generated.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        reference = response_tokens(example, tokenizer)[:6]
        expected = np.mean([g == r for g, r in zip(generated, reference)])
        assert scores.score[index] == expected
    assert memorization_score([1, 2, 9], [1, 2, 3, 4], 4) == 0.5 and np.isnan(memorization_score([1], [], 4))
