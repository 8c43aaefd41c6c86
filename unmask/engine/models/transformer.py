"""The transformer shared by LLaDA and Dream: plain modules over packed tokens.

Both families are Llama-shaped (RMSNorm, RoPE, SwiGLU, optional GQA); they
differ only in checkpoint names, q/k/v bias and the logits shift, which live in
`llada.py` / `dream.py`. The model works on a flat batch of tokens and leaves
attention to an `AttentionBackend`, so the same weights serve the paged engine
(`engine.attention.PagedAttention`) and dense full-sequence training
(`DenseAttention` below).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from unmask.engine.models.config import ModelConfig
from unmask.engine.models.moe import MoEFeedForward
from unmask.engine.models.swiglu import FusedRows, SwiGLU
from unmask.kernels.rms_norm import add_rms_norm, rms_norm
from unmask.kernels.rotary import rotary, rotary_table
from unmask.kernels.silu_mul import silu_mul


class AttentionBackend(Protocol):
    """Turns one layer's fresh q/k/v of the packed tokens into attention output."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] -> [T, H, D]."""
        ...


class SublayerReuse(Protocol):
    """Runs a block's two sublayers on some rows only, reusing stored outputs for the others (dLLM-Cache).

    The block keeps its own norms and residual adds; only its attention and
    MLP sublayers go through this seam (`Block.forward`).
    """

    def attention(
        self, block: "Block", h: torch.Tensor, positions: torch.Tensor, rotary: "Rotary", attention: AttentionBackend, layer: int
    ) -> torch.Tensor:
        """The attention sublayer's output [T, hidden] for the normed input h [T, hidden]."""
        ...

    def mlp(self, block: "Block", h: torch.Tensor, layer: int) -> torch.Tensor:
        """The MLP sublayer's output [T, hidden] for the normed input h [T, hidden]."""
        ...


class DenseAttention:
    """Bidirectional attention over whole sequences of a [B, L] batch (training, references).

    `mask` (True = attend), if given, says which keys each query sees: [B, 1, L, L]
    (e.g. examples packed in a row) or [B, 1, 1, L] (right-padded rows).
    """

    def __init__(self, batch: int, length: int, mask: torch.Tensor | None = None):
        self.batch, self.length, self.mask = batch, length, mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n = self.batch, self.length
        q, k, v = (t.view(b, n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2).reshape(b * n, q.shape[1], q.shape[3])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a residual add and this norm in one pass."""
        return add_rms_norm(x, residual, self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary position embedding, half-split ("rotate_half") layout as in Llama/LLaDA/Qwen2.

    The cos/sin of every position up to `max_position` are computed once here;
    each call gathers the rows of its positions (`kernels.rotary`). `rotary_dim`
    (LLaDA2's partial rotary) rotates only each head's leading `rotary_dim`
    features, with frequencies of that width, and passes the rest through.
    """

    def __init__(self, rotary_dim: int, theta: float, max_position: int):
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
        cos, sin = rotary_table(inv_freq.float(), max_position)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D]; positions: [T] absolute positions within each sequence (< max_position)."""
        if x.shape[-1] == self.rotary_dim:
            return rotary(x, positions, self.cos, self.sin)
        rotated = rotary(x[..., : self.rotary_dim].contiguous(), positions, self.cos, self.sin)
        return torch.cat([rotated, x[..., self.rotary_dim :]], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.qkv: FusedRows | None = None  # set by `fuse_projections`
        # Qwen3 (SDAR) normalises each head's q and k before the rotation.
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None

    def fuse_projections(self) -> None:
        self.qkv = FusedRows.of(self.q_proj, self.k_proj, self.v_proj)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H, D], k and v [T, KVH, D], before the rotation (views of one output when fused)."""
        t = x.shape[0]
        q, k, v = (self.q_proj(x), self.k_proj(x), self.v_proj(x)) if self.qkv is None else self.qkv(x)
        hd = self.head_dim
        q, k, v = q.view(t, self.num_heads, hd), k.view(t, self.num_kv_heads, hd), v.view(t, self.num_kv_heads, hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = _per_head(self.q_norm, q), _per_head(self.k_norm, k)
        return q, k, v

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary, attention: AttentionBackend, layer: int
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.project(x)
        out = attention.attend(layer, rotary(q, positions), rotary(k, positions), v)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


def _per_head(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm` over the head dimension of x [T, heads, D] (rows made contiguous for the kernel)."""
    return norm(x.reshape(-1, x.shape[-1])).view(x.shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = SelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # A mixture-of-experts model's layers route each token to experts, but those its config keeps dense.
        dense = not cfg.is_moe_layer(layer)
        self.mlp: SwiGLU | MoEFeedForward = SwiGLU(cfg.hidden_size, cfg.intermediate_size) if dense else MoEFeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: Rotary,
        attention: AttentionBackend,
        layer: int,
        reuse: SublayerReuse | None = None,
    ) -> torch.Tensor:
        """Pre-norm attention and MLP with residual adds; `reuse` computes the sublayers in its own way."""
        h = self.attn_norm(x)
        if reuse is None:
            attended = self.attn(h, positions, rotary, attention, layer)
        else:
            attended = reuse.attention(self, h, positions, rotary, attention, layer)
        h, x = self.mlp_norm.add_and_norm(attended, x)
        return x + (self.mlp(h) if reuse is None else reuse.mlp(self, h, layer))


class DiffusionTransformer(nn.Module):
    """Embedding, `num_layers` blocks, final norm and LM head, over packed tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta, cfg.max_position)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionBackend,
        reuse: SublayerReuse | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden] (normed).

        `reuse` is passed to every block (`Block.forward`).
        """
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, self.rotary, attention, i, reuse)
        return self.final_norm(x)

    def fuse_projections(self) -> None:
        """Stack q/k/v and gate/up weights for serving (`FusedRows`); training keeps them apart.

        Call it on the final device and dtype: a later `.to()` gives the layers new
        parameters and leaves the stacked weights behind (the loader calls it last).
        """
        for block in self.layers:
            block.attn.fuse_projections()
            block.mlp.fuse_projections()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (in the model's dtype) for the given hidden rows only (the engine asks for few rows).

        They stay in the model's dtype: at LLaDA's 126k vocabulary an fp32 copy of a
        large batch's rows is a gigabyte, and the confidence kernel reads bf16 directly.
        """
        return self.lm_head(hidden)

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Forward of a [B, L] batch -> logits [B, L, V] (unshifted), with the model's attention pattern.

        Bidirectional for full-attention models; block-causal (`block_causal_mask`) for the others.
        """
        b, n = input_ids.shape
        positions = torch.arange(n, device=input_ids.device).repeat(b)
        block = self.cfg.attention_block_size
        mask = None if block is None else block_causal_mask(n, block, input_ids.device)[None, None]
        hidden = self.forward(input_ids.reshape(-1), positions, DenseAttention(b, n, mask))
        return self.compute_logits(hidden).float().view(b, n, -1)


def block_causal_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[length, length] bool, True where query i may attend key j: j's block (from position 0) is not after i's."""
    blocks = torch.arange(length, device=device) // block_size
    return blocks[None, :] <= blocks[:, None]
