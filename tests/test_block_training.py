"""`train_tiny.py --arch sdar`: SDAR's block-diffusion objective, run for real on a tiny CPU model."""

from __future__ import annotations

import json

import pytest
import torch
from test_training import TINY, TOKENIZER

from training import train_tiny
from training.block_diffusion import block_reference_generate, twin_rows
from training.tasks.batches import BatchSpec, batches
from unmask.engine.llm import LLM
from unmask.engine.models import load_model
from unmask.engine.models.checkpoint import load_weights
from unmask.engine.models.make_random import make_random_checkpoint
from unmask.engine.params import SamplingParams


@pytest.fixture(scope="module")
def block_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-sdar")
    train_tiny.main(["--out", str(out), "--arch", "sdar", "--attention-block", "4", "--steps", "40", "--lr", "3e-3",
                     "--eval-n", "2", "--eval-batch", "2", "--eval-gen", "16", *TINY])
    return out


def test_block_diffusion_training_reduces_the_loss(block_run):
    history = json.loads((block_run / "training.json").read_text())["loss_history"]
    assert history[-1][1] < 0.7 * history[0][1]


def test_the_trained_checkpoint_is_an_sdar_layout_block_causal_model(block_run):
    loaded = load_model(block_run, dtype="float32", device="cpu")
    assert loaded.config.arch == "sdar" and loaded.config.attention_block_size == 4 and loaded.config.qk_norm
    assert json.loads((block_run / "config.json").read_text())["model_type"] == "sdar"


def test_the_training_reference_decoder_writes_what_the_engines_block_cache_writes(tmp_path):
    """On a random checkpoint whose predictions depend on context, rows of different block alignments batched."""
    model_dir = make_random_checkpoint(tmp_path, arch="sdar", layers=2, hidden=64, heads=4, layer_std=0.2)
    prompts = [[10, 40, 41, 42, 43, 44], [11, 40, 41, 42, 43, 44, 45, 46], [12, 40, 41]]
    expected = block_reference_generate(load_weights(model_dir, torch.float32, "cpu"), prompts, gen_length=12)
    out = LLM(str(model_dir)).generate(prompts, [SamplingParams(max_tokens=12, cache="block", ignore_eos=True)] * 3)
    assert [o.token_ids for o in out] == expected
    assert len({tuple(row) for row in expected}) == 3


def test_noisy_tokens_see_their_block_and_earlier_clean_blocks_only():
    batch = next(batches(TOKENIZER, BatchSpec(tokens=2048, row_length=512), seed=0))
    length = batch.input_ids.shape[1]
    rows = twin_rows(batch, batch.input_ids, block_size=4).attention[0, 0]
    seg, pos = batch.segment[0], batch.positions[0]
    i = int(torch.nonzero((seg == 0) & (pos == 9))[0])  # block 2 of the row's first example
    noisy_keys, clean_keys = rows[i, :length], rows[i, length:]
    first = seg == 0
    assert torch.equal(noisy_keys, first & (pos // 4 == 2))
    assert torch.equal(clean_keys, first & (pos // 4 < 2))
    clean_query = rows[length + i]
    assert not clean_query[:length].any() and torch.equal(clean_query[length:], first & (pos // 4 <= 2))
