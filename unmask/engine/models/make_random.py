"""Write a random model directory in the exact layout of a family Unmask serves, with a tokenizer.

    python -m unmask.engine.models.make_random OUT_DIR --arch llada|dream|sdar|fastdllm-v2|llada-moe|llada2|sdar-moe [--layers N ...]
    python -m unmask.engine.models.make_random OUT_DIR --preset llada-8b --config-only

Tests use the first form to exercise the loader and the engine on both layouts
without any download. The weights are random but scaled so that logits are
peaked, which keeps greedy decoding away from near-ties.

`--config-only` writes no weights: only `config.json` and a tokenizer, the
directory `unmask serve DIR --load-format dummy` serves with random weights
drawn on the device, to load-test a model's shapes (`--preset llada-8b`)
without its checkpoint. There is no LLaDA tokenizer offline, so the tokenizer
is the bundled model's: the config takes its mask and end-of-text ids, and its
vocabulary is padded with filler words up to the model's so that every token
the model writes decodes to some text. That text is meaningless.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import string
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from unmask.engine.models.arch import CheckpointError
from unmask.engine.bundled import bundled_model_dir
from unmask.engine.models.checkpoint import save_checkpoint, write_config
from unmask.engine.models.config import ModelConfig, MoEConfig
from unmask.engine.models.loader import load_tokenizer
from unmask.engine.models.transformer import DiffusionTransformer

BUNDLED_TOKENIZER = bundled_model_dir("unmask-tiny")
PRESETS: dict[str, ModelConfig] = {
    # GSAI-ML/LLaDA-8B-Instruct's config.json: shapes, special token ids, RoPE base and context.
    "llada-8b": ModelConfig(
        arch="llada", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=12288,
        vocab_size=126464, mask_token_id=126336, eos_token_id=126081, rope_theta=500000.0, max_position=4096,
    ),
    # JetLM/SDAR-8B-Chat and -1.7B-Chat (Qwen3-8B / -1.7B shapes, block size 4).
    "sdar-8b": ModelConfig(
        arch="sdar", hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, intermediate_size=12288,
        vocab_size=151936, mask_token_id=151669, eos_token_id=151643, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position=32768, explicit_head_dim=128, qk_norm=True, attention_block_size=4,
    ),
    "sdar-1.7b": ModelConfig(
        arch="sdar", hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=6144,
        vocab_size=151936, mask_token_id=151669, eos_token_id=151643, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position=32768, explicit_head_dim=128, qk_norm=True, tie_word_embeddings=True, attention_block_size=4,
    ),
    # Efficient-Large-Model/Fast_dLLM_v2_7B and _1.5B (Qwen2.5-7B / -1.5B-Instruct shapes, blocks of 32 in sub-blocks of 8).
    "fastdllm-v2-7b": ModelConfig(
        arch="fastdllm-v2", hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944,
        vocab_size=152064, mask_token_id=151665, eos_token_id=151645, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position=32768, qkv_bias=True, logits_shift=1, attention_block_size=32, sub_block_size=8,
    ),
    "fastdllm-v2-1.5b": ModelConfig(
        arch="fastdllm-v2", hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960,
        vocab_size=151936, mask_token_id=151665, eos_token_id=151645, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position=32768, qkv_bias=True, tie_word_embeddings=True, logits_shift=1, attention_block_size=32,
        sub_block_size=8,
    ),
    # inclusionAI/LLaDA-MoE-7B-A1B-Instruct: 64 experts of width 1024, 8 per token, every layer routed.
    "llada-moe-7b": ModelConfig(
        arch="llada-moe", hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16, intermediate_size=8192,
        vocab_size=157184, mask_token_id=156895, eos_token_id=156892, rope_theta=50000.0, max_position=8192,
        qk_norm=True, moe=MoEConfig(num_experts=64, top_k=8, expert_intermediate_size=1024),
    ),
    # inclusionAI/LLaDA2.0-mini (and LLaDA2.1-mini): 256 experts of width 512 in 8 groups, 8 per token from the
    # best 4 groups, a shared expert, the first layer dense; half of each head rotated; blocks of 32.
    "llada2-mini": ModelConfig(
        arch="llada2", hidden_size=2048, num_layers=20, num_heads=16, num_kv_heads=4, intermediate_size=5120,
        vocab_size=157184, mask_token_id=156895, eos_token_id=156892, rope_theta=600000.0, rms_norm_eps=1e-6,
        max_position=32768, explicit_head_dim=128, qk_norm=True, attention_block_size=32, explicit_rotary_dim=64,
        moe=MoEConfig(
            num_experts=256, top_k=8, expert_intermediate_size=512, shared_intermediate_size=512, dense_layers=(0,),
            scoring="sigmoid", expert_bias="selection", num_groups=8, top_groups=4, normalize=True,
            routed_scaling_factor=2.5, router_float32=True,
        ),
    ),
    # JetLM/SDAR-30B-A3B-Chat (Qwen3-30B-A3B shapes: 128 experts of width 768, 8 per token; blocks of 4).
    "sdar-30b-a3b": ModelConfig(
        arch="sdar-moe", hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4, intermediate_size=6144,
        vocab_size=151936, mask_token_id=151669, eos_token_id=151643, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position=32768, explicit_head_dim=128, qk_norm=True, attention_block_size=4,
        moe=MoEConfig(num_experts=128, top_k=8, expert_intermediate_size=768, normalize=True),
    ),
    "tiny": ModelConfig(
        arch="llada", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=384,
        vocab_size=512, mask_token_id=1, eos_token_id=0, rope_theta=10000.0, max_position=2048,
    ),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
BYTE_LEVEL_SPACE = "\u0120"  # how byte-level BPE writes a leading space ("Ġ")
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


def random_model(cfg: ModelConfig, seed: int, layer_std: float = 0.02) -> DiffusionTransformer:
    """Random weights: unit embeddings, N(0, `layer_std`) layers, a peaked LM head.

    A larger `layer_std` (tests use 0.2) makes attention far from uniform, so
    that what a position predicts depends on its context. Per-head q/k norms
    are drawn near 1 rather than left at 1, so swapping them is visible.
    """
    torch.manual_seed(seed)
    model = DiffusionTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(1.0, 0.2)
                continue
            if name.endswith("norm.weight"):
                continue
            std = 3.0 / cfg.hidden_size**0.5 if name == "lm_head.weight" else layer_std if "layers" in name else 1.0
            p.normal_(0.0, std)
    return model


def random_config(
    arch: str = "llada",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int | None = None,
    vocab: int = 512,
    intermediate: int | None = None,
) -> ModelConfig:
    """A small config in the family's defaults; mask and end-of-text are `build_tokenizer`'s ids."""
    return ModelConfig(
        arch=arch,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads or (heads if arch == "llada" else max(1, heads // 2)),
        intermediate_size=intermediate or hidden * 3,
        vocab_size=vocab,
        mask_token_id=SPECIAL_TOKENS.index(MASK),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        rope_theta=10000.0 if arch == "llada" else 1e6,
        rms_norm_eps=1e-5 if arch == "llada" else 1e-6,
        max_position=2048,
        qkv_bias=arch in ("dream", "fastdllm-v2"),
        logits_shift=1 if arch in ("dream", "fastdllm-v2") else 0,
        **_block_diffusion_fields(arch, hidden, heads),
        **_moe_fields(arch, hidden, heads),
    )


def _block_diffusion_fields(arch: str, hidden: int, heads: int) -> dict:
    """Small block-causal geometry: SDAR blocks of 4 with a stated head_dim unlike hidden / heads;
    Fast-dLLM v2 blocks of 8 in sub-blocks of 4."""
    if arch == "sdar":
        return dict(explicit_head_dim=2 * hidden // heads, qk_norm=True, attention_block_size=4)
    if arch == "fastdllm-v2":
        return dict(attention_block_size=8, sub_block_size=4)
    return {}


def _moe_fields(arch: str, hidden: int, heads: int) -> dict:
    """Small mixture-of-experts geometry exercising each family's router: LLaDA-MoE 8 experts, 2 per token,
    softmax, every layer routed, per-head q/k norms; LLaDA2 8 experts in 4 groups (2 kept), 2 per token,
    a shared expert, its first layer dense, half of each head rotated, its trained blocks of 32; SDAR-MoE
    8 experts, 2 per token, renormalised, in SDAR's geometry."""
    if arch == "llada-moe":
        return dict(qk_norm=True, moe=MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=hidden // 2))
    if arch == "sdar-moe":
        moe = MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=hidden // 2, normalize=True)
        return dict(explicit_head_dim=2 * hidden // heads, qk_norm=True, attention_block_size=4, moe=moe)
    if arch == "llada2":
        moe = MoEConfig(
            num_experts=8, top_k=2, expert_intermediate_size=hidden // 2, shared_intermediate_size=hidden // 2,
            dense_layers=(0,), scoring="sigmoid", expert_bias="selection", num_groups=4, top_groups=2,
            normalize=True, routed_scaling_factor=2.5, router_float32=True,
        )
        return dict(qk_norm=True, attention_block_size=32, explicit_rotary_dim=hidden // heads // 2, moe=moe)
    return {}


def resize(
    base: ModelConfig,
    layers: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    vocab: int | None = None,
    intermediate: int | None = None,
) -> ModelConfig:
    """`base` with the given dimensions; the rest keep its ratios (FFN to hidden width, heads to KV heads)."""
    hidden = hidden or base.hidden_size
    heads = heads or base.num_heads
    layers = layers or base.num_layers
    return replace(
        base,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads or max(1, heads * base.num_kv_heads // base.num_heads),
        intermediate_size=intermediate or hidden * base.intermediate_size // base.hidden_size,
        vocab_size=vocab or base.vocab_size,
        moe=_resize_experts(base, hidden, layers),
    )


def _resize_experts(base: ModelConfig, hidden: int, layers: int) -> MoEConfig | None:
    """`base`'s experts with their widths in its ratio to the hidden width, its dense layers those that remain."""
    moe = base.moe
    if moe is None:
        return None
    return replace(
        moe,
        expert_intermediate_size=max(1, hidden * moe.expert_intermediate_size // base.hidden_size),
        shared_intermediate_size=hidden * moe.shared_intermediate_size // base.hidden_size,
        dense_layers=tuple(i for i in moe.dense_layers if i < layers),
    )


def make_random_checkpoint(
    out_dir: str | Path,
    arch: str = "llada",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 16 * 2**20,
    layer_std: float = 0.02,
    **dims: int | None,
) -> Path:
    """A random checkpoint of `random_config(arch, **dims)` (layers, hidden, heads, kv_heads, vocab, intermediate)."""
    return write_random_checkpoint(out_dir, random_config(arch, **dims), seed, dtype, max_shard_bytes, layer_std)


def write_random_checkpoint(
    out_dir: str | Path,
    cfg: ModelConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 16 * 2**20,
    layer_std: float = 0.02,
) -> Path:
    """A checkpoint of `cfg`'s shapes with random weights (`random_model`) and a small trained tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(cfg.vocab_size, out)
    cfg = replace(
        cfg,
        vocab_size=max(cfg.vocab_size, len(tokenizer)),
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    save_checkpoint(random_model(cfg, seed, layer_std), out, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return out


def write_config_only(
    out_dir: str | Path, cfg: ModelConfig, tokenizer_dir: str | Path = BUNDLED_TOKENIZER, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """`config.json` of `cfg` and `tokenizer_dir`'s tokenizer, no weights: a directory for `--load-format dummy`.

    The tokenizer's files are copied as they are (so any transformers version
    reads them) but for its vocabulary, padded up to the model's
    (`pad_vocabulary`), and its context; the config takes its mask and
    end-of-text ids.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    settings = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(settings | {"model_max_length": cfg.max_position}, indent=2))
    tokenizer = load_tokenizer(out)
    if tokenizer.mask_token_id is None or tokenizer.eos_token_id is None:
        raise CheckpointError(f"the tokenizer of {str(tokenizer_dir)!r} lacks a mask or an end-of-text token")
    vocab = max(cfg.vocab_size, len(tokenizer))
    pad_vocabulary(out / "tokenizer.json", vocab)
    cfg = replace(cfg, vocab_size=vocab, mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id)
    write_config(cfg, out, dtype)
    return out


def pad_vocabulary(tokenizer_file: Path, size: int) -> None:
    """Give a byte-level BPE tokenizer `size` ids by adding filler words (" ab", " ac", ...).

    A random model writes any id of its vocabulary; with the filler each one
    decodes to some text, as in a real vocabulary of that size. No merge makes
    the filler words, so encoding is unchanged.
    """
    data = json.loads(tokenizer_file.read_text())
    vocab = data["model"].get("vocab")
    if data["model"].get("type") != "BPE" or not isinstance(vocab, dict):
        raise CheckpointError(f"{tokenizer_file} is not a BPE tokenizer: cannot pad its vocabulary")
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    next_id = max([*vocab.values(), *added.values()]) + 1
    letters = itertools.chain.from_iterable(
        itertools.product(string.ascii_lowercase, repeat=n) for n in itertools.count(2)
    )
    for word in (BYTE_LEVEL_SPACE + "".join(chars) for chars in letters):
        if next_id >= size:
            break
        if word not in vocab and word not in added:
            vocab[word] = next_id
            next_id += 1
    tokenizer_file.write_text(json.dumps(data, ensure_ascii=False))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--arch", choices=["llada", "dream", "sdar", "fastdllm-v2", "llada-moe", "llada2", "sdar-moe"], default="llada")
    shape.add_argument("--preset", choices=list(PRESETS), help="a named model's shapes (the options below override them)")
    p.add_argument("--layers", type=int, default=None, help="default 2, or the preset's")
    p.add_argument("--hidden", type=int, default=None, help="default 64, or the preset's")
    p.add_argument("--heads", type=int, default=None, help="default 4, or the preset's")
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None, help="FFN width (default 3 x hidden, or the preset's ratio)")
    p.add_argument("--vocab", type=int, default=None, help="default 512, or the preset's")
    p.add_argument("--config-only", action="store_true",
                   help="write config.json and the bundled tokenizer, no weights (for --load-format dummy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="of the weights (default float32); with --config-only, only what config.json says (bfloat16)")
    p.add_argument("--max-shard-mb", type=float, default=16.0)
    a = p.parse_args(argv)
    dims = {k: getattr(a, k) for k in ("layers", "hidden", "heads", "kv_heads", "vocab", "intermediate")}
    dims = {k: v for k, v in dims.items() if v is not None}
    cfg = resize(PRESETS[a.preset], **dims) if a.preset else random_config(a.arch, **dims)
    name = a.preset or a.arch
    if a.config_only:
        out = write_config_only(a.out_dir, cfg, dtype=getattr(torch, a.dtype or "bfloat16"))
        print(f"wrote config.json and a tokenizer of {name}'s shapes to {out} (serve it with --load-format dummy)")
    else:
        dtype = getattr(torch, a.dtype or "float32")
        out = write_random_checkpoint(a.out_dir, cfg, a.seed, dtype, int(a.max_shard_mb * 2**20))
        print(f"wrote a random {name} checkpoint to {out}")


if __name__ == "__main__":
    main()
