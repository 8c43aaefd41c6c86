"""Write a small random-weight checkpoint in the exact LLaDA or Dream layout, with a tokenizer.

    python -m engine.models.make_random OUT_DIR --arch llada|dream [--layers N ...]

Tests use it to exercise the loader and the engine on both layouts without any
download. The weights are random but scaled so that logits are peaked, which
keeps greedy decoding away from near-ties.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.models.checkpoint import save_checkpoint
from engine.models.config import ModelConfig
from engine.models.transformer import DiffusionTransformer

MASK, EOS = "<|mask|>", "<|endoftext|>"
SPECIAL_TOKENS = [EOS, MASK, "<|user|>", "<|assistant|>", "<|system|>", "<|eot|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eot|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Diffusion language models unmask a canvas of tokens block by block.",
    "What is 12 plus 30? The answer is 42. Sort: apple, banana, cherry.",
    "Hello world! How are you today? I am fine, thank you.",
] * 50


def build_tokenizer(vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the chat and diffusion special tokens, saved in HF format."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, mask_token=MASK, chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(str(out_dir))
    return fast


def random_model(cfg: ModelConfig, seed: int) -> DiffusionTransformer:
    torch.manual_seed(seed)
    model = DiffusionTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                continue
            std = 3.0 / cfg.hidden_size**0.5 if name == "lm_head.weight" else 0.02 if "layers" in name else 1.0
            p.normal_(0.0, std)
    return model


def make_random_checkpoint(
    out_dir: str | Path,
    arch: str = "llada",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int | None = None,
    vocab: int = 512,
    intermediate: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 16 * 2**20,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab, out)
    cfg = ModelConfig(
        arch=arch,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads or (heads if arch == "llada" else max(1, heads // 2)),
        intermediate_size=intermediate or hidden * 3,
        vocab_size=max(vocab, len(tokenizer)),
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rope_theta=10000.0 if arch == "llada" else 1e6,
        rms_norm_eps=1e-5 if arch == "llada" else 1e-6,
        max_position=2048,
        qkv_bias=arch == "dream",
        logits_shift=1 if arch == "dream" else 0,
    )
    save_checkpoint(random_model(cfg, seed), out, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--arch", choices=["llada", "dream"], default="llada")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--max-shard-mb", type=float, default=16.0)
    a = p.parse_args(argv)
    out = make_random_checkpoint(
        a.out_dir, a.arch, a.layers, a.hidden, a.heads, a.kv_heads, a.vocab, seed=a.seed,
        dtype=getattr(torch, a.dtype), max_shard_bytes=int(a.max_shard_mb * 2**20),
    )
    print(f"wrote a random {a.arch} checkpoint to {out}")


if __name__ == "__main__":
    main()
