"""Train the small autoregressive guide model (a transformers Llama) on the same tasks and tokenizer.

    python benchmarks/train_guide.py --out models/unmask-tiny-guide --minutes 2 --device cuda

Guided diffusion lets a small causal LM check the diffusion model's proposals
for the current block left to right. So the guide sees exactly the diffusion
model's training sequences (chat prompt + response + end-of-text padding) and
learns next-token prediction on the canvas only; predicting end-of-text after
end-of-text lets it agree with the padding too. Saved with `save_pretrained`
(safetensors, bf16) next to the shared tokenizer files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.tasks import FAMILIES, is_correct, held_out_set
from benchmarks.tasks.batches import EOS, BatchSpec, PackedBatch, batch_loader, chat_prompt, load_tokenizer
from benchmarks.train_tiny import (
    DEFAULT_TOKENIZER,
    MAX_FILE_BYTES,
    Clock,
    autocast,
    canvas_text,
    copy_tokenizer,
    family_list,
    lr_at,
    resolve_device,
)

IGNORE = -100  # transformers' label value for "no loss here"


@dataclass
class GuideConfig:
    out: str
    tokenizer: str = str(DEFAULT_TOKENIZER)
    device: str = "auto"
    steps: int | None = None
    minutes: float | None = None
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 704
    batch_tokens: int = 16384
    max_canvas: int = 128
    row_length: int = 640
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.03
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1
    workers: int = 0
    log_every: int = 50
    eval_n: int = 200
    eval_gen: int = 64
    eval_batch: int = 128
    families: str = ""  # comma-separated subset of task families to train and evaluate on; "" = all
    easy_fraction: float = 0.3  # share of training-only smaller problems (see benchmarks.tasks.EASY)


def build_model(cfg: GuideConfig, tok: Tokenizer) -> LlamaForCausalLM:
    """A small Llama causal LM over the shared tokenizer (embedding padded to a multiple of 64)."""
    eos = tok.token_to_id(EOS)
    config = LlamaConfig(
        vocab_size=-(-tok.get_vocab_size() // 64) * 64,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return LlamaForCausalLM(config)


def labels_for(batch: PackedBatch) -> torch.Tensor:
    """Next-token targets on the canvas only (transformers shifts labels by one itself)."""
    return torch.where(batch.canvas_pos >= 0, batch.input_ids, torch.full_like(batch.input_ids, IGNORE))


def train(cfg: GuideConfig) -> tuple[LlamaForCausalLM, dict]:
    """Train for the configured budget; returns the model (fp32) and a summary of the run."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.tokenizer)
    # Start the data workers before CUDA is initialised: forking a CUDA process is fragile.
    # Packed rows (see PackedBatch), as for the diffusion model; examples in a row may see
    # earlier ones (no per-example mask), as in usual causal-LM packing: harmless, since
    # every example ends in end-of-text padding and the model learns to ignore what precedes a prompt.
    spec = BatchSpec(tokens=cfg.batch_tokens, max_canvas=cfg.max_canvas, families=family_list(cfg.families),
                     easy_fraction=cfg.easy_fraction, row_length=cfg.row_length)
    data = batch_loader(cfg.tokenizer, spec, cfg.seed, cfg.workers, pin_memory=device.type == "cuda")
    model = build_model(cfg, tok).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    print(f"guide: {params / 1e6:.2f}M params", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    clock = Clock(cfg.steps, cfg.minutes)
    step, tokens, window, history, data_wait = 0, 0, [], [], 0.0
    while clock.progress(step) < 1.0:
        lr = lr_at(clock.progress(step), cfg.lr, cfg.warmup, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        t_data = time.perf_counter()
        batch = next(data)
        data_wait += time.perf_counter() - t_data
        batch = batch.to(device)
        with autocast(device):
            loss = model(input_ids=batch.input_ids, labels=labels_for(batch)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens += batch.num_tokens
        window.append(loss.detach())
        if step % cfg.log_every == 0:
            mean = torch.stack(window).mean().item()
            window.clear()
            history.append((step, mean))
            el = clock.elapsed()
            print(f"step {step:6d}  {el:7.1f}s  loss {mean:.4f}  lr {lr:.2e}  {step / el:.1f} steps/s  "
                  f"{tokens / el / 1e3:.0f}k tok/s  waiting for data {100 * data_wait / el:.0f}%", flush=True)
    wall = clock.elapsed()
    if window:
        history.append((step, torch.stack(window).mean().item()))
    return model.eval(), {"steps": step, "tokens": tokens, "train_seconds": round(wall, 1),
                          "data_wait_seconds": round(data_wait, 1), "loss_history": history, "params": params}


@torch.no_grad()
def greedy_generate(model: LlamaForCausalLM, prompts: list[list[int]], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (left-padded, so generation appends in step)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), eos_id, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, device=device)
        attn[i, width - len(p) :] = 1
    with autocast(device):
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos_id, pad_token_id=eos_id)
    return [row[width:].tolist() for row in out]


def evaluate(model: LlamaForCausalLM, tok: Tokenizer, n: int, gen_length: int, batch_size: int,
             families: tuple[str, ...] = tuple(FAMILIES)) -> dict[str, float]:
    """Exact-match accuracy of greedy decoding on the first `n` held-out problems of each family."""
    eos = tok.token_to_id(EOS)
    accuracy = {}
    for family in families:
        examples = held_out_set(family, n)
        correct = 0
        for i in range(0, n, batch_size):
            chunk = examples[i : i + batch_size]
            outs = greedy_generate(model, [tok.encode(chat_prompt(ex.prompt)).ids for ex in chunk], gen_length, eos)
            correct += sum(is_correct(canvas_text(tok, o, eos), ex.answer) for o, ex in zip(outs, chunk))
        accuracy[family] = correct / n
    return accuracy


def save(model: LlamaForCausalLM, out: str | Path, tokenizer_dir: str | Path, summary: dict) -> Path:
    """`save_pretrained` in bf16 safetensors, plus the tokenizer files and `training.json`."""
    out = Path(out)
    model.to(torch.bfloat16).save_pretrained(str(out), max_shard_size=MAX_FILE_BYTES)
    copy_tokenizer(tokenizer_dir, out)
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


_OPTIONAL_TYPES = {"steps": int, "minutes": float}


def parse_args(argv: list[str] | None = None) -> GuideConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to write the guide model into")
    for field, default in asdict(GuideConfig(out="")).items():
        if field != "out":
            p.add_argument("--" + field.replace("_", "-"), type=_OPTIONAL_TYPES.get(field) or type(default), default=default)
    return GuideConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    model, summary = train(cfg)
    summary["config"] = asdict(cfg)
    if cfg.eval_n > 0:
        t0 = time.perf_counter()
        summary["eval"] = evaluate(model, load_tokenizer(cfg.tokenizer), cfg.eval_n, cfg.eval_gen, cfg.eval_batch,
                                   family_list(cfg.families) or tuple(FAMILIES))
        summary["eval_seconds"] = round(time.perf_counter() - t0, 1)
        summary["eval_setup"] = f"{cfg.eval_n} held-out problems per family, greedy autoregressive decoding"
        print("held-out accuracy: " + "  ".join(f"{f} {a:.3f}" for f, a in summary["eval"].items()), flush=True)
    save(model, cfg.out, cfg.tokenizer, summary)
    print(f"wrote {cfg.out}", flush=True)


if __name__ == "__main__":
    main()
