"""Checks the tests of several model families share: the packed paged forward against a dense
reference, CUDA decoding against the CPU engine's, and a dummy checkpoint of a preset's real shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from unmask.engine.llm import LLM
from unmask.engine.models.make_random import main as make_random
from unmask.engine.params import SamplingParams
from unmask.engine.runner import SequenceWork
from unmask.engine.sequence import Sequence


class LogitsReference(Protocol):
    def logits(self, ids: list[int]) -> torch.Tensor: ...


def assert_whole_forward_matches(engine, seqs: list[Sequence], reference: LogitsReference, tolerance: float) -> None:
    """With half of each canvas committed (as in a run in progress), one packed paged forward over every
    position of every sequence gives the reference's logits."""
    g = torch.Generator().manual_seed(0)
    for seq in seqs:
        canvas = torch.arange(seq.prompt_len, seq.length)
        keep = canvas[torch.rand(canvas.numel(), generator=g) < 0.5]
        seq.tokens[keep] = torch.randint(2, 500, (keep.numel(),), generator=g)
    work = [SequenceWork(s, torch.arange(s.length), torch.arange(s.length)) for s in seqs]
    packed = engine.runner.run(work).split([s.length for s in seqs])
    for seq, logits in zip(seqs, packed):
        torch.testing.assert_close(logits.float(), reference.logits(seq.tokens.tolist()), rtol=tolerance, atol=tolerance)


def assert_cuda_decodes_like_the_cpu(checkpoint: Path, prompts: list[str], params: SamplingParams) -> None:
    """fp32 on CUDA (Triton kernels, CUDA graphs) gives the CPU engine's tokens (PyTorch references)."""
    cpu = LLM(str(checkpoint)).generate(prompts, [params] * len(prompts))
    cuda = LLM(str(checkpoint), device="cuda", dtype="float32", kv_cache_memory=64 * 2**20)
    assert [o.token_ids for o in cuda.generate(prompts, [params] * len(prompts))] == [o.token_ids for o in cpu]


def assert_dummy_preset_generates(directory: Path, preset: str, params: SamplingParams) -> None:
    """A `--config-only` directory of `preset`, loaded with dummy weights, writes every token asked and frees its pages."""
    make_random([str(directory), "--preset", preset, "--config-only"])
    llm = LLM(str(directory), device="cuda", load_format="dummy", kv_cache_memory=2 * 2**30)
    outs = llm.generate(["Hello"] * 4, params)
    assert all(len(o.token_ids) == params.max_tokens for o in outs)
    assert llm.engine.pool.num_free == llm.engine.pool.num_pages
