"""The architecture of a diffusion LM, independent of checkpoint naming."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts feed-forward of LLaDA-MoE, LLaDA2.x and SDAR-MoE (see `models.moe`).

    Every layer not in `dense_layers` replaces its dense SwiGLU by `num_experts`
    routed SwiGLU experts of width `expert_intermediate_size`, `top_k` of them per
    token, plus a shared expert of width `shared_intermediate_size` that every
    token goes through (0: none). The router:

    - `scoring`: "softmax" (LLaDA-MoE, Qwen3-MoE) or "sigmoid" (LLaDA2.x) of its logits;
    - `expert_bias`: None, or how a learned per-expert bias enters: "selection" adds it
      to the scores for choosing the experts only (LLaDA2.x), "weights" adds it to the
      scores before the top-k, so the chosen weights include it (LLaDA-MoE's code);
    - `num_groups` / `top_groups`: group-limited top-k: the experts fall into
      `num_groups` equal groups, each scored by the sum of its two best scores, and
      only the best `top_groups` groups are eligible (1 / 1: plain top-k);
    - `normalize`: the chosen weights are divided by their sum;
    - `routed_scaling_factor` multiplies the chosen weights;
    - `router_float32`: the router's logits are computed in float32 from float32
      weights (LLaDA2.x); otherwise in the model's dtype, and the chosen weights
      are rounded to it before weighting the experts (LLaDA-MoE, Qwen3-MoE).
    """

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_intermediate_size: int = 0
    dense_layers: tuple[int, ...] = ()
    scoring: str = "softmax"
    expert_bias: str | None = None
    num_groups: int = 1
    top_groups: int = 1
    normalize: bool = False
    routed_scaling_factor: float = 1.0
    router_float32: bool = False

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"MoE router scoring {self.scoring!r} is not softmax or sigmoid")
        if self.expert_bias not in (None, "selection", "weights"):
            raise ValueError(f"MoE expert bias {self.expert_bias!r} is not None, 'selection' or 'weights'")
        if self.num_experts % self.num_groups or not 1 <= self.top_groups <= self.num_groups:
            raise ValueError(f"{self.num_experts} experts do not form {self.num_groups} groups of which {self.top_groups} are kept")
        if not 1 <= self.top_k <= self.num_experts * self.top_groups // self.num_groups:
            raise ValueError(f"top_k {self.top_k} is not between 1 and the experts of the kept groups")


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

    `explicit_rotary_dim` is the leading part of each head that RoPE rotates
    when it is not all of it (LLaDA2.x's `partial_rotary_factor`); `moe` is the
    mixture-of-experts feed-forward, None for dense models.
    """

    arch: str  # "llada" | "dream" | "sdar" | "fastdllm-v2" | "llada-moe" | "llada2"
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
    explicit_rotary_dim: int | None = None
    moe: MoEConfig | None = None

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return self.explicit_rotary_dim or self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer not in self.moe.dense_layers

    @property
    def block_causal(self) -> bool:
        return self.attention_block_size is not None

    def __post_init__(self) -> None:
        if self.explicit_head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim {self.rotary_dim} is not an even number of at most head_dim {self.head_dim}")
