"""The architecture of a diffusion LM, independent of checkpoint naming."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and special tokens of a LLaDA- or Dream-style transformer.

    `logits_shift` is 0 for LLaDA (the token at position i is read from the
    output at i) and 1 for Dream (read from the output at i - 1).

    `attention_block_size` is None for full bidirectional attention (LLaDA,
    Dream) and the trained block size for block-causal models (SDAR, Fast-dLLM
    v2): blocks of that many positions, counted from position 0, attend to
    themselves and every earlier block. `sub_block_size` is the sub-block a
    block-causal model's own decoding commits in (Fast-dLLM v2), else None.
    """

    arch: str  # "llada" | "dream" | "sdar" | "fastdllm-v2"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int  # rows of the embedding / logits (may be padded past the tokenizer)
    mask_token_id: int
    eos_token_id: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 4096
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    logits_shift: int = 0
    explicit_head_dim: int | None = None  # Qwen3 states head_dim; None: hidden_size // num_heads
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)
    attention_block_size: int | None = None
    sub_block_size: int | None = None

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @property
    def block_causal(self) -> bool:
        return self.attention_block_size is not None

    def __post_init__(self) -> None:
        if self.explicit_head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
