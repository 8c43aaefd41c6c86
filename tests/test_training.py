"""The training scripts of the bundled models, run for real on tiny CPU models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from training import train_guide, train_tiny
from training.trainer import DEFAULT_TOKENIZER, default_workers
from training.tasks import held_out_set
from training.tasks.batches import BatchSpec, PackedBatch, batches, chat_prompt, load_tokenizer
from unmask.engine.models import load_model
from unmask.engine.models.checkpoint import load_weights

TOKENIZER = str(DEFAULT_TOKENIZER)
TINY = ["--device", "cpu", "--hidden", "32", "--layers", "2", "--heads", "2", "--batch-tokens", "2048", "--row-length", "512",
        "--log-every", "10", "--workers", "0"]


def _first_and_last_loss(out) -> tuple[float, float]:
    history = json.loads((out / "training.json").read_text())["loss_history"]
    return history[0][1], history[-1][1]


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    train_tiny.main(["--out", str(out), "--steps", "40", "--lr", "3e-3", "--eval-n", "2", "--eval-batch", "2", *TINY])
    return out


def test_diffusion_training_reduces_the_loss(diffusion_run):
    first, last = _first_and_last_loss(diffusion_run)
    assert last < 0.7 * first


def test_diffusion_checkpoint_loads_with_the_engine_and_is_self_contained(diffusion_run):
    loaded = load_model(diffusion_run, dtype="float32", device="cpu")
    assert loaded.config.arch == "llada" and loaded.config.vocab_size % 64 == 0
    assert loaded.config.mask_token_id == loaded.tokenizer.mask_token_id
    assert loaded.config.eos_token_id == loaded.tokenizer.eos_token_id
    hf = json.loads((diffusion_run / "config.json").read_text())
    assert hf["model_type"] == "llada" and hf["torch_dtype"] == "bfloat16"
    summary = json.loads((diffusion_run / "training.json").read_text())
    assert set(summary["eval"]) == {"arithmetic", "recall", "lists", "count"}
    assert all(f.stat().st_size <= 16 * 2**20 for f in diffusion_run.iterdir())


def test_reference_sampler_gives_each_row_the_same_result_alone_or_batched(diffusion_run):
    model = load_weights(diffusion_run, torch.float32, "cpu")
    tok = load_tokenizer(diffusion_run)
    examples = held_out_set("count", 2) + held_out_set("lists", 1)
    prompts = [tok.encode(chat_prompt(ex.prompt)).ids for ex in examples]
    batched = train_tiny.reference_generate(model, prompts, gen_length=20, block_length=8)
    alone = [train_tiny.reference_generate(model, [p], gen_length=20, block_length=8)[0] for p in prompts]
    assert batched == alone
    eos = model.cfg.eos_token_id
    # Everything up to the first end-of-text is decoded (later blocks may be skipped).
    assert all(model.cfg.mask_token_id not in (row[: row.index(eos)] if eos in row else row) for row in batched)


def _segments(batch):
    """(row, example) -> the example's canvas mask within the row, for every packed example."""
    for r in range(batch.input_ids.shape[0]):
        for s in range(int(batch.segment[r].max()) + 1):
            yield r, (batch.segment[r] == s) & (batch.canvas_pos[r] >= 0)


def test_packed_rows_hold_whole_examples_with_their_own_positions_and_canvas():
    spec = BatchSpec(tokens=4096, row_length=512)
    batch = next(batches(TOKENIZER, spec, seed=0))
    tok = load_tokenizer(TOKENIZER)
    assert batch.input_ids.shape == (8, 512)
    assert batch.num_examples == sum(int(batch.segment[r].max()) + 1 for r in range(8))
    for r, canvas in _segments(batch):
        example = batch.segment[r] == batch.segment[r][canvas][0]
        assert batch.positions[r][example].tolist() == list(range(int(example.sum())))
        text = tok.decode(batch.input_ids[r][example].tolist(), skip_special_tokens=False)
        assert text.startswith("<|user|>") and "<|assistant|>\n" in text
        length = int(canvas.sum())
        assert (batch.canvas_len[r][canvas] == length).all()
        assert batch.canvas_pos[r][canvas].tolist() == list(range(length))
        answer = batch.answer[r] & example
        assert answer.sum() < length and (batch.input_ids[r][canvas & ~answer] == 0).all()  # end-of-text padding
    mask = batch.same_segment()
    assert mask.shape == (8, 1, 512, 512) and torch.equal(mask[0, 0].diagonal(), torch.ones(512, dtype=torch.bool))


def test_noise_masks_only_the_canvas_with_weights_that_undo_the_masking_rate():
    batch = next(batches(TOKENIZER, BatchSpec(tokens=4096, row_length=512), seed=0))
    canvas = batch.canvas_pos >= 0
    totals = torch.zeros(batch.num_examples)
    draws = 300
    for seed in range(draws):
        noised = train_tiny.noise_batch(batch, mask_id=1, eps=1e-3, block_prob=0.0, block_lengths=(32,),
                                        gen=torch.Generator().manual_seed(seed))
        assert not (noised.masked & ~canvas).any()
        assert torch.equal(noised.input_ids == 1, noised.masked)
        assert torch.equal(noised.input_ids[~noised.masked], batch.input_ids[~noised.masked])
        totals += torch.stack([noised.weight[r][c].sum() for r, c in _segments(batch)])
    # E[sum over the canvas of 1{masked} / t] / canvas_length = 1 for every example.
    assert torch.allclose(totals / draws, torch.ones_like(totals), atol=0.35)


@pytest.mark.parametrize("block", [1, 8])
def test_block_structured_noise_keeps_earlier_blocks_clean_and_masks_later_ones(block):
    batch = next(batches(TOKENIZER, BatchSpec(tokens=4096, row_length=512), seed=1))
    noised = train_tiny.noise_batch(batch, mask_id=1, eps=1e-3, block_prob=1.0, block_lengths=(block,),
                                    gen=torch.Generator().manual_seed(0))
    for r, c in _segments(batch):
        canvas = noised.masked[r][c]
        masked_at = canvas.nonzero().squeeze(1)
        if len(masked_at) == 0:
            continue
        block_start = (masked_at[0].item() // block) * block
        assert not canvas[:block_start].any()  # blocks before the working one are clean
        assert canvas[block_start + block :].all()  # blocks after it are fully masked


def test_guide_training_reduces_the_loss_and_saves_a_loadable_model(tmp_path):
    train_guide.main(["--out", str(tmp_path), "--steps", "40", "--lr", "5e-3", "--intermediate", "64", "--eval-n", "2",
                      "--eval-batch", "2", *TINY])
    first, last = _first_and_last_loss(tmp_path)
    assert last < 0.7 * first
    model = LlamaForCausalLM.from_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert model.config.eos_token_id == tok.eos_token_id and model.config.vocab_size >= len(tok)
    assert model.dtype == torch.bfloat16


def test_in_place_copies_see_the_clean_prefix_and_not_their_own_token():
    batch = next(batches(TOKENIZER, BatchSpec(tokens=4096, row_length=512), seed=2))
    shape = train_tiny.TrainConfig(out="", hidden=32, layers=2, heads=2)
    cfg = train_tiny.build_config(shape, load_tokenizer(TOKENIZER))
    torch.manual_seed(0)
    model = train_tiny.DiffusionTransformer(cfg).double().eval()  # float64: a leak stands far above rounding

    def copy_logits(b) -> tuple[train_tiny.InPlaceRows, torch.Tensor]:
        rows = train_tiny.in_place_rows(b, cfg.mask_token_id, copies=200)
        n, total = rows.input_ids.shape
        attention = train_tiny.DenseAttention(n, total, rows.attention)
        with torch.no_grad():
            hidden = model(rows.input_ids.reshape(-1), rows.positions.reshape(-1), attention).view(n, total, -1)
        return rows, hidden[:, -200:]

    rows, before = copy_logits(batch)
    r, c = next(_segments(batch))
    canvas = c.nonzero().squeeze(1)
    response = canvas[batch.answer[r][canvas]]
    assert rows.valid[r].sum() >= len(response) + 1 and torch.equal(rows.targets[r][: len(response)],
                                                                    batch.input_ids[r][response])
    assert torch.equal(rows.positions[r][-200:][: len(response)], batch.positions[r][response])
    k = len(response) // 2  # change the response from its k-th token on
    changed = batch.input_ids.clone()
    changed[r, response[k:]] = (changed[r, response[k:]] + 7) % cfg.vocab_size
    _, after = copy_logits(PackedBatch(changed, *batch._tensors(lambda t: t)[1:], batch.num_examples))
    change = (after[r] - before[r]).abs().amax(dim=-1)
    assert change[: k + 1].max() < 1e-10  # copies up to k see nothing of tokens k, k+1, ..., not even indirectly
    assert change[k + 1 : len(response)].min() > 1e-6  # later copies see the changed prefix


def test_data_workers_default_to_none_on_the_cpu_and_some_beside_a_gpu():
    assert default_workers(torch.device("cpu")) == 0
    assert 1 <= default_workers(torch.device("cuda")) <= 12
