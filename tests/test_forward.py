"""The active-positions forward: packing, paging and cache reuse compute the right thing."""

from __future__ import annotations

import torch

from unmask.engine.config import EngineConfig
from unmask.engine.engine import LLMEngine
from unmask.engine.params import SamplingParams
from unmask.engine.runner import SequenceWork


def _engine(model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=str(model_dir), kv_cache_memory=8 * 2**20))


def _admit(engine: LLMEngine, prompt: list[int], max_tokens: int, **params):
    seq = engine.add_request(f"r{len(engine.scheduler.running)}-{len(prompt)}", prompt, SamplingParams(max_tokens=max_tokens, **params))
    engine.scheduler.admit()
    return seq


def _fill_canvas(seq, generator: torch.Generator, vocab: int, fraction: float = 0.5) -> None:
    """Commit random tokens at some canvas positions, as a run in progress would have."""
    canvas = torch.arange(seq.prompt_len, seq.length)
    keep = canvas[torch.rand(canvas.numel(), generator=generator) < fraction]
    seq.tokens[keep] = torch.randint(2, vocab - 1, (keep.numel(),), generator=generator)


def test_packed_forward_equals_each_sequence_alone(model_dir):
    engine = _engine(model_dir)
    g = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    seqs = [_admit(engine, torch.randint(2, vocab, (n,), generator=g).tolist(), m) for n, m in ((5, 16), (11, 24), (3, 40))]
    for seq in seqs:
        _fill_canvas(seq, g, vocab)
    work = [SequenceWork(s, torch.arange(s.length), torch.arange(s.length)) for s in seqs]
    packed = engine.runner.run(work).split([w.logit_positions.numel() for w in work])
    for w, logits in zip(work, packed):
        alone = engine.runner.run([w])
        torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)
        dense = engine.loaded.model.forward_dense(w.seq.tokens[None])[0]
        torch.testing.assert_close(logits, dense, rtol=1e-4, atol=1e-4)


def test_partial_step_over_refreshed_pages_equals_the_full_forward(model_dir):
    """With K/V refreshed for the same tokens, recomputing only the block (dual) or the
    block and suffix (prefix) reads the cached K/V and gives the full forward's logits."""
    engine = _engine(model_dir)
    g = torch.Generator().manual_seed(1)
    vocab = engine.model_config.vocab_size
    seq = _admit(engine, torch.randint(2, vocab, (9,), generator=g).tolist(), 48, block_length=16)
    _fill_canvas(seq, g, vocab)
    seq.block = 1
    start, end = seq.block_bounds()
    block = torch.arange(start, end)
    full = engine.runner.run([SequenceWork(seq, torch.arange(seq.length), block)])
    for active in (torch.arange(start, end), torch.arange(start, seq.length)):
        partial = engine.runner.run([SequenceWork(seq, active, block)])
        torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5)


def test_refresh_step_of_prefix_and_dual_equals_the_none_step(model_dir):
    """At a block start the cached policies recompute everything: their first step is the reference's."""
    prompt = [5, 9, 13, 17, 21, 25]
    firsts = {}
    for cache in ("none", "prefix", "dual"):
        engine = _engine(model_dir)
        seq = engine.add_request("r", prompt, SamplingParams(max_tokens=32, block_length=16, cache=cache, seed=3))
        engine.step()
        firsts[cache] = seq.tokens.clone()
    assert torch.equal(firsts["prefix"], firsts["none"])
    assert torch.equal(firsts["dual"], firsts["none"])
