"""Slips in the model-side rules that no other test would catch, each made to fail a test here:

- top-p keeps the smallest set of tokens whose mass reaches p: at an exact boundary (the mass before
  a token equals p) that token is out, so `>=` turning into `>` keeps one token too many;
- generating the evaluation sample runs in eval mode: a train-mode model would sample through
  dropout, drawing from the global RNG that training owns (and a different sample).
"""

from __future__ import annotations

import pytest
import torch

from engine.evaluate import generate_sample
from engine.runtime import Runtime
from model import GPT, ModelConfig
from model.generate import sample_logits

CPU_FP32 = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), precision="fp32", compile=False)


@pytest.mark.parametrize("top_p,kept", [(0.5, 2), (0.25, 1), (0.75, 3), (0.5001, 3)])
def test_top_p_keeps_the_smallest_set_reaching_p_even_at_an_exact_boundary(top_p, kept):
    # Four equal logits: probabilities exactly 0.25, cumulative mass exactly 0.25, 0.5, 0.75, 1.0.
    logits = torch.zeros(1, 4)
    g = torch.Generator().manual_seed(0)
    picks = {sample_logits(logits, 1.0, top_p=top_p, generator=g).item() for _ in range(300)}
    assert len(picks) == kept


def test_the_evaluation_sample_runs_in_eval_mode_and_leaves_the_training_rng_alone():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.5))
    model.eval()
    want = generate_sample(model, [1, 2, 3], 12, CPU_FP32, seed=5)
    model.train()
    rng = torch.get_rng_state()
    got = generate_sample(model, [1, 2, 3], 12, CPU_FP32, seed=5)
    assert model.training  # given back in the mode it came in
    assert torch.equal(torch.get_rng_state(), rng), "dropout drew from the global RNG: the sample ran in train mode"
    assert got == want
