"""Train Unmask's bundled diffusion LM (LLaDA checkpoint layout) on the task mixture.

    python training/train_tiny.py --out models/unmask-tiny --minutes 5 --device cuda

Objective: LLaDA's masked-diffusion SFT. A sequence is prompt + canvas, the
canvas holding the response and end-of-text padding. Only canvas tokens are
masked, each independently with probability t ~ U(eps, 1) drawn per sequence;
the loss is the cross-entropy on masked tokens weighted by 1/t and divided by
the canvas length (LLaDA's normalisation by the padded answer length).

One addition to the paper: a fraction of sequences (`--block-mask-prob`) are
masked the way blockwise decoding sees them: the canvas before a random
block (of a length from `--block-mask-lengths`) is clean, the block is masked
with probability t, everything after it is fully masked. Each masked token is weighted by 1/(its masking
probability), so the objective stays an importance-weighted mean. It teaches
the semi-autoregressive states that i.i.d. masking almost never produces.

Alongside it, every step (`--in-place-weight`): each response token is also
predicted at a masked copy of its own position from its clean prefix, all
tokens of a row in one pass (`in_place_ar_loss`). Masked diffusion alone
learns these tasks far more slowly than next-token training, and a causal
next-token warm start is mostly lost when the objective switches to in-place
prediction (benchmarks/RESULTS.md); this term is next-token training in the
diffusion model's own output layout (token i predicted at position i).

Examples are packed into fixed-length rows with attention kept inside each
example (`PackedBatch`): every batch mixes all task families (length-sorted
batches would alternate between long recall prompts and short problems) and
the fixed shape suits `--compile`.

At the end the script decodes held-out problems with the reference sampler
(no cache, low-confidence, one token per step, blocks of 32) and prints the
exact-match accuracy per family.

`--arch sdar` trains a block-diffusion model instead (SDAR's Qwen3 layout,
block-causal attention in blocks of `--attention-block`) with SDAR's objective
(`training/block_diffusion.py`): i.i.d. masking per example, every block
denoised from the clean blocks before it. The in-place term, whose clean
tokens attend token-causally, does not apply to it. Its evaluation decodes
with the block-causal reference sampler (one token per step, no cache).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from training.block_diffusion import block_diffusion_loss, block_reference_generate
from training.tasks import Example
from training.tasks.batches import EOS, MASK, PackedBatch, chat_prompt, load_tokenizer
from training.trainer import (
    MAX_FILE_BYTES,
    RunConfig,
    autocast,
    count_params,
    evaluate_into,
    finish_output,
    fit,
    parse_config,
    start,
)
from unmask.engine.models.checkpoint import load_weights, save_checkpoint
from unmask.engine.models.config import ModelConfig
from unmask.engine.models.transformer import DenseAttention, DiffusionTransformer


@dataclass
class TrainConfig(RunConfig):
    """`RunConfig` plus the diffusion model's shape and objective."""

    init: str | None = None  # start from this checkpoint instead of a fresh model
    hidden: int = 384
    layers: int = 8
    heads: int = 6
    kv_heads: int | None = None
    intermediate: int | None = None
    in_place_weight: float = 1.0  # weight of `in_place_ar_loss` beside the diffusion loss (0: LLaDA's objective alone)
    in_place_copies: int = 256  # masked copies per row (response tokens beyond them are left out of that term)
    compile: bool = False  # torch.compile the training forward (fixed [B, L] shapes make it pay)
    eps: float = 1e-3
    block_mask_prob: float = 0.3
    block_mask_lengths: str = "32"  # comma-separated block lengths of the block-structured masking
    block_length: int = 32  # decoding block of the evaluation; canvases are mostly multiples of it
    arch: str = "llada"  # "llada" (full attention) or "sdar" (block diffusion)
    attention_block: int = 4  # --arch sdar: the trained block size


# --------------------------------------------------------------------------- model


def build_config(cfg: TrainConfig, tok: Tokenizer) -> ModelConfig:
    """A LLaDA- or SDAR-architecture config; the embedding is padded to a multiple of 64 rows."""
    if cfg.arch not in ("llada", "sdar"):
        raise ValueError(f"--arch must be llada or sdar, got {cfg.arch!r}")
    vocab = -(-tok.get_vocab_size() // 64) * 64
    block_diffusion = {"qk_norm": True, "attention_block_size": cfg.attention_block} if cfg.arch == "sdar" else {}
    return ModelConfig(
        arch=cfg.arch,
        hidden_size=cfg.hidden,
        num_layers=cfg.layers,
        num_heads=cfg.heads,
        num_kv_heads=cfg.kv_heads or cfg.heads,
        intermediate_size=cfg.intermediate or _swiglu_width(cfg.hidden),
        vocab_size=vocab,
        mask_token_id=tok.token_to_id(MASK),
        eos_token_id=tok.token_to_id(EOS),
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position=2048,
        **block_diffusion,
    )


def _swiglu_width(hidden: int) -> int:
    """8/3 of the width (the usual SwiGLU ratio), rounded up to a multiple of 64."""
    return -(-(8 * hidden // 3) // 64) * 64


def init_weights(model: DiffusionTransformer) -> None:
    """GPT-style init: N(0, 0.02), residual output projections scaled down by depth."""
    depth_scale = 1.0 / math.sqrt(2 * model.cfg.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                continue
            std = 0.02 * (depth_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
            p.normal_(0.0, std)


# --------------------------------------------------------------------------- objective


@dataclass
class Noised:
    """A masked batch: the model input, which canvas tokens are masked and their loss weights."""

    input_ids: torch.Tensor  # [B, L]
    masked: torch.Tensor  # [B, L] bool
    weight: torch.Tensor  # [B, L] float: 1 / (masking probability) / canvas length


def noise_batch(batch: PackedBatch, mask_id: int, eps: float, block_prob: float, block_lengths: tuple[int, ...],
                gen: torch.Generator) -> Noised:
    """Mask canvas tokens: i.i.d. with ratio t per example, or block-structured for `block_prob` of examples.

    A block-structured example draws its block length from `block_lengths`
    (length 1 gives the left-to-right state: clean prefix, one token to guess,
    everything after masked). Per-example draws come from a [B, L] table
    indexed by each token's example, so the batch is masked without a host round trip.
    """
    ids, seg = batch.input_ids, batch.segment.clamp_min(0)
    b, length = ids.shape
    dev = ids.device

    def per_example() -> torch.Tensor:
        return torch.rand(b, length, generator=gen, device=dev).gather(1, seg)

    t = eps + (1.0 - eps) * per_example()
    structured = per_example() < block_prob
    pos = batch.canvas_pos
    choices = torch.tensor(block_lengths, device=dev, dtype=torch.float32)
    block_length = choices[(per_example() * len(block_lengths)).long().clamp_max(len(block_lengths) - 1)]
    block_from = torch.floor(per_example() * torch.ceil(batch.canvas_len / block_length)) * block_length
    block_map = torch.where(pos < block_from, 0.0, torch.where(pos < block_from + block_length, t, 1.0))
    prob = torch.where(pos >= 0, torch.where(structured, block_map, t), 0.0)
    masked = torch.rand(b, length, generator=gen, device=dev) < prob
    weight = torch.where(masked, 1.0 / prob.clamp_min(eps), 0.0) / batch.canvas_len
    return Noised(torch.where(masked, torch.full_like(ids, mask_id), ids), masked, weight)


def diffusion_loss(model: torch.nn.Module, batch: PackedBatch, noised: Noised) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted CE on the masked positions, summed per example, averaged over examples.

    Also returns the argmax accuracy on the masked *response* tokens (not the
    end-of-text padding): the number that shows whether the model reads its prompt.
    """
    b, length = batch.input_ids.shape
    attention = DenseAttention(b, length, batch.same_segment())
    hidden = model(noised.input_ids.reshape(-1), batch.positions.reshape(-1), attention)
    # Logits everywhere, zero weight off the masked positions: the vocabulary is small,
    # and selecting rows would need the mask count on the host (a GPU sync every step).
    logits = model.compute_logits(hidden)
    targets = batch.input_ids.reshape(-1)
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    loss = (ce * noised.weight.reshape(-1)).sum() / batch.num_examples
    scored = (noised.masked & batch.answer).reshape(-1)
    hits = (logits.argmax(dim=-1) == targets) & scored
    return loss, hits.sum() / scored.sum().clamp_min(1)


@dataclass
class InPlaceRows:
    """Packed rows extended by masked copies of their response tokens (see `in_place_ar_loss`)."""

    input_ids: torch.Tensor  # [B, L + C]: the clean row, then C mask tokens
    positions: torch.Tensor  # [B, L + C]: each copy at its token's position
    attention: torch.Tensor  # [B, 1, L + C, L + C] bool, True = attend
    targets: torch.Tensor  # [B, C]: the token each copy must predict
    valid: torch.Tensor  # [B, C] bool: a copy of a response token or of the first end-of-text


def in_place_rows(batch: PackedBatch, mask_id: int, copies: int) -> InPlaceRows:
    """Append `copies` mask tokens to each row, one per response token (and first end-of-text), in row order.

    Visibility: a prompt token sees its prompt; a clean canvas token sees the
    prompt and the canvas up to itself; a copy of canvas token i sees the
    prompt, the clean canvas before i and itself. Not the other copies: the
    copy of a later token sees token i, so attending to it would pass token i
    to its own copy through two layers. A fixed number of copies keeps shapes static.
    """
    ids, order = batch.input_ids, batch.canvas_pos  # order: -1 on the prompt (and row padding)
    b, length = ids.shape
    after_answer = torch.cat((torch.zeros_like(batch.answer[:, :1]), batch.answer[:, :-1]), dim=1) | (order == 0)
    chosen = batch.answer | ((order >= 0) & after_answer)
    idx = torch.argsort((~chosen).long() * length + torch.arange(length, device=ids.device), dim=1)[:, :copies]
    valid = chosen.gather(1, idx)
    copy_seg = torch.where(valid, batch.segment.gather(1, idx), -2)
    copy_order = order.gather(1, idx)
    clean_to_clean = batch.same_segment()[:, 0] & (order[:, None, :] <= order[:, :, None])
    copy_to_clean = (copy_seg[:, :, None] == batch.segment[:, None, :]) & (order[:, None, :] < copy_order[:, :, None])
    itself = torch.eye(copies, dtype=torch.bool, device=ids.device)[None].expand(b, -1, -1)
    attention = torch.cat((torch.cat((clean_to_clean, torch.zeros_like(copy_to_clean.transpose(1, 2))), dim=2),
                           torch.cat((copy_to_clean, itself), dim=2)), dim=1)
    return InPlaceRows(
        input_ids=torch.cat((ids, torch.full_like(idx, mask_id)), dim=1),
        positions=torch.cat((batch.positions, batch.positions.gather(1, idx)), dim=1),
        attention=attention[:, None],
        targets=ids.gather(1, idx),
        valid=valid,
    )


def in_place_ar_loss(model: torch.nn.Module, batch: PackedBatch, mask_id: int, copies: int) -> torch.Tensor:
    """Every response token predicted at its own masked position from a clean prefix, all in one pass.

    Causal next-token training learns these tasks fast but predicts token i
    at position i-1, while the diffusion model predicts a masked token in
    place (a causal warm start followed by diffusion training kept little of
    it: benchmarks/RESULTS.md). Predicting masked copies (`in_place_rows`)
    trains what a left-to-right decoding step asks, for all response tokens
    at once: block diffusion's vectorised training with blocks of one token.
    Returns the mean loss over the copies.
    """
    rows = in_place_rows(batch, mask_id, copies)
    b, total = rows.input_ids.shape
    hidden = model(rows.input_ids.reshape(-1), rows.positions.reshape(-1), DenseAttention(b, total, rows.attention))
    logits = model.compute_logits(hidden.view(b, total, -1)[:, total - copies :]).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows.targets.reshape(-1), reduction="none")
    return (ce.view(b, copies) * rows.valid).sum() / rows.valid.sum().clamp_min(1)


def train(cfg: TrainConfig) -> tuple[DiffusionTransformer, dict]:
    """Train for the configured budget; returns the model (fp32) and a summary of the run."""
    device, data = start(cfg, canvas_multiple=cfg.block_length)
    if cfg.init:
        model = load_weights(cfg.init, torch.float32, device).train()
    else:
        model = DiffusionTransformer(build_config(cfg, load_tokenizer(cfg.tokenizer)))
        init_weights(model)
        model.to(device)
    print(f"model: {count_params(model) / 1e6:.2f}M params, {model.cfg}", flush=True)
    forward = torch.compile(model) if cfg.compile else model
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    block_lengths = tuple(int(x) for x in cfg.block_mask_lengths.split(","))

    block_size = model.cfg.attention_block_size

    def loss_fn(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if block_size is not None:  # later blocks are invisible: block-structured masking adds nothing
            noised = noise_batch(batch, model.cfg.mask_token_id, cfg.eps, 0.0, block_lengths, gen)
            return block_diffusion_loss(forward, batch, noised.input_ids, noised.masked, noised.weight, block_size)
        noised = noise_batch(batch, model.cfg.mask_token_id, cfg.eps, cfg.block_mask_prob, block_lengths, gen)
        loss, accuracy = diffusion_loss(forward, batch, noised)
        if cfg.in_place_weight > 0:
            loss = loss + cfg.in_place_weight * in_place_ar_loss(forward, batch, model.cfg.mask_token_id, cfg.in_place_copies)
        return loss, accuracy

    summary = fit(model, cfg, device, data, loss_fn)
    return model.eval(), summary


# --------------------------------------------------------------------------- reference decoding


@torch.no_grad()
def reference_generate(model: DiffusionTransformer, prompts: list[list[int]], gen_length: int,
                       block_length: int = 32) -> list[list[int]]:
    """LLaDA's reference sampler: full forward every step, low-confidence, one token per step.

    Greedy (temperature 0). Blocks of `block_length` are denoised left to right;
    generation stops after a block once every row has committed end-of-text
    (later blocks cannot change earlier tokens, so the text is the same).
    Returns each row's canvas (`gen_length` ids, masks left where it stopped early).
    """
    cfg = model.cfg
    device = next(model.parameters()).device
    b = len(prompts)
    plens = torch.tensor([len(p) for p in prompts], device=device)
    length = int(plens.max()) + gen_length
    x = torch.full((b, length), cfg.eos_token_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        x[i, : len(p)] = torch.tensor(p, device=device)
        x[i, len(p) : len(p) + gen_length] = cfg.mask_token_id
    pos = torch.arange(length, device=device)
    attention = DenseAttention(b, length, (pos[None, :] < (plens + gen_length)[:, None])[:, None, None, :])
    positions = pos.repeat(b)
    rows = torch.arange(b, device=device)
    for block_start in range(0, gen_length, block_length):
        width = min(block_length, gen_length - block_start)
        cols = plens[:, None] + block_start + torch.arange(width, device=device)[None, :]
        for _ in range(width):
            with autocast(device):
                hidden = model(x.reshape(-1), positions, attention).view(b, length, -1)
                logits = model.compute_logits(hidden[rows[:, None], cols])
            conf, x0 = torch.softmax(logits.float(), dim=-1).max(dim=-1)
            conf = conf.masked_fill(x[rows[:, None], cols] != cfg.mask_token_id, -math.inf)
            j = conf.argmax(dim=-1)
            x[rows, cols[rows, j]] = x0[rows, j]
        done_cols = plens[:, None] + torch.arange(block_start + width, device=device)[None, :]
        if (x[rows[:, None], done_cols] == cfg.eos_token_id).any(dim=1).all():
            break
    return [x[i, plens[i] : plens[i] + gen_length].tolist() for i in range(b)]


def canvas_text(tok: Tokenizer, canvas: list[int], eos_id: int) -> str:
    """The response text of a canvas: tokens before the first end-of-text, specials skipped."""
    if eos_id in canvas:
        canvas = canvas[: canvas.index(eos_id)]
    return tok.decode(canvas, skip_special_tokens=True)


def decoder(model: DiffusionTransformer, tok: Tokenizer, gen_length: int, block_length: int):
    """Held-out examples -> response texts, by `reference_generate`."""

    def decode(examples: list[Example]) -> list[str]:
        prompts = [tok.encode(chat_prompt(ex.prompt)).ids for ex in examples]
        if model.cfg.block_causal:
            canvases = block_reference_generate(model, prompts, gen_length)
        else:
            canvases = reference_generate(model, prompts, gen_length, block_length)
        return [canvas_text(tok, canvas, model.cfg.eos_token_id) for canvas in canvases]

    return decode


# --------------------------------------------------------------------------- output


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(TrainConfig, __doc__.splitlines()[0], argv)
    model, summary = train(cfg)
    decode = decoder(model, load_tokenizer(cfg.tokenizer), cfg.eval_gen, cfg.block_length)
    block = model.cfg.attention_block_size or cfg.block_length
    evaluate_into(summary, cfg, decode, f"reference decoding: no cache, low_confidence, 1 token/step, "
                                        f"block {block}, gen {cfg.eval_gen}")
    out = Path(cfg.out)
    save_checkpoint(model, out, dtype=torch.bfloat16, max_shard_bytes=MAX_FILE_BYTES)
    finish_output(out, cfg, summary)


if __name__ == "__main__":
    main()
