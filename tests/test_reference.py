"""The engine reproduces LLaDA's reference sampler token for token (no cache, low confidence)."""

from __future__ import annotations

import pytest
import torch

from dense_reference import dense_logits
from unmask.engine.llm import LLM
from unmask.engine.models import load_model
from unmask.engine.params import SamplingParams


def llada_reference(model, cfg, prompt: list[int], gen_length: int, block_length: int, steps_per_block: int) -> list[int]:
    """LLaDA's blockwise low-confidence remasking on full sequences, as LLaDA defines it (no pages, no cache).

    Shifted models (Dream) read position i from the output at i - 1. The mask token is
    never proposed (a trained model never predicts it; random weights might).
    """
    x = torch.tensor(prompt + [cfg.mask_token_id] * gen_length)
    p = len(prompt)
    num_blocks = -(-gen_length // block_length)
    for b in range(num_blocks):
        start, end = p + b * block_length, min(p + (b + 1) * block_length, p + gen_length)
        steps = max(1, -(-(end - start) * steps_per_block // block_length))
        base, extra = divmod(end - start, steps)
        for i in range(steps):
            logits = dense_logits(model, cfg, x)
            x0 = logits.argmax(-1)
            confidence = logits.softmax(-1).gather(-1, x0[:, None]).squeeze(-1)
            outside = torch.ones_like(x, dtype=torch.bool)
            outside[start:end] = False
            confidence[outside | (x != cfg.mask_token_id)] = float("-inf")
            k = base + (1 if i < extra else 0)
            chosen = torch.topk(confidence, k).indices
            x[chosen] = x0[chosen]
    return x[p:].tolist()


@pytest.mark.parametrize("gen_length,block_length,steps", [(32, 16, 16), (40, 16, 4), (24, 8, 3)])
def test_engine_matches_the_reference_loop(model_dir, gen_length, block_length, steps):
    loaded = load_model(model_dir)
    prompt = loaded.tokenizer.encode("What is 12 plus 30?")
    expected = llada_reference(loaded.model, loaded.config, prompt, gen_length, block_length, steps)
    if loaded.config.eos_token_id in expected:
        expected = expected[: expected.index(loaded.config.eos_token_id)]
    llm = LLM(str(model_dir))
    # LLaDA's schedule, chosen explicitly: a Dream checkpoint defaults to Dream's (tests/test_dream_decoding.py).
    params = SamplingParams(max_tokens=gen_length, block_length=block_length, steps=steps, schedule="llada")
    out = llm.generate(prompt, params)[0]
    assert out.token_ids == expected
