"""An independent dense reference for the mixture-of-experts families (LLaDA-MoE, LLaDA2, SDAR-MoE), for the tests.

It reads a checkpoint directory's `config.json` and safetensors by their
Hugging Face names and computes the forward in plain fp32 PyTorch, with no
code of the engine's model, router, kernels or pages. Every expert runs on
every token and the experts' outputs are weighted by a dense [tokens, experts]
routing matrix, zero outside each token's chosen experts, built as the
families' reference code routes:

- LLaDA-MoE: softmax of the router's logits (plus the expert bias when the
  config enables it), the top k as they are, never renormalised;
- SDAR-MoE (Qwen3-MoE): softmax, the top k over their sum when `norm_topk_prob`;
- LLaDA2: sigmoid scores; the bias added for choosing only; experts in
  `n_group` groups scored by their two best biased scores, the best `topk_group`
  groups eligible; the chosen unbiased scores over their sum, times
  `routed_scaling_factor`.

Attention is bidirectional (LLaDA-MoE) or block-causal in LLaDA2's blocks of
32 or SDAR-MoE's `block_size`; RoPE rotates each head's leading `partial_rotary_factor` part. Decoding
reuses `QwenReference`'s block loop (LLaDA2, SDAR-MoE) or `dense_decode` (LLaDA-MoE,
through `as_loaded`); `dual_decode` is Fast-dLLM's dual cache over this forward.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from block_reference import QwenReference, StaleKV
from safetensors import safe_open

LLADA2_BLOCK = 32


class MoEReference(QwenReference):
    def __init__(self, model_dir: Path):
        self.hf = hf = json.loads((Path(model_dir) / "config.json").read_text())
        self.w: dict[str, torch.Tensor] = {}
        for file in Path(model_dir).glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                self.w.update({k: f.get_tensor(k).float() for k in f.keys()})
        self.llada2 = hf["model_type"] == "llada2_moe"
        self.shifted, self.sub_block = False, None
        self.sdar = hf["model_type"] == "sdar_moe"
        self.block = LLADA2_BLOCK if self.llada2 else hf["block_size"] if self.sdar else None
        self.heads, self.kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
        self.head_dim = hf.get("head_dim") or hf["hidden_size"] // self.heads
        self.rotary_dim = int(self.head_dim * hf.get("partial_rotary_factor", 1.0))
        self.mask_id = hf["mask_token_id"]

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, heads, D]: rotate_half RoPE of the leading rotary_dim features at positions 0..L-1."""
        d = self.rotary_dim
        inv = 1.0 / (self.hf["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles = torch.arange(x.shape[0], dtype=torch.float64)[:, None] * inv[None]
        cos, sin = (torch.cat([f(angles)] * 2, -1).float()[:, None, :] for f in (torch.cos, torch.sin))
        rot, rest = x[..., :d], x[..., d:]
        half = torch.cat([-rot[..., d // 2 :], rot[..., : d // 2]], -1)
        return torch.cat([rot * cos + half * sin, rest], -1)

    def _qkv(self, h: torch.Tensor, p: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, hd = h.shape[0], self.head_dim
        if self.llada2:
            qkv = self._linear(h, f"{p}.attention.query_key_value").view(n, self.heads + 2 * self.kv_heads, hd)
            q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
            return self._norm(q, f"{p}.attention.query_layernorm.weight"), self._norm(k, f"{p}.attention.key_layernorm.weight"), v
        q = self._linear(h, f"{p}.self_attn.q_proj").view(n, self.heads, hd)
        k = self._linear(h, f"{p}.self_attn.k_proj").view(n, self.kv_heads, hd)
        v = self._linear(h, f"{p}.self_attn.v_proj").view(n, self.kv_heads, hd)
        if f"{p}.self_attn.q_norm.weight" in self.w:
            q, k = self._norm(q, f"{p}.self_attn.q_norm.weight"), self._norm(k, f"{p}.self_attn.k_norm.weight")
        return q, k, v

    def _swiglu(self, h: torch.Tensor, p: str) -> torch.Tensor:
        return self._linear(F.silu(self._linear(h, f"{p}.gate_proj")) * self._linear(h, f"{p}.up_proj"), f"{p}.down_proj")

    def routing_matrix(self, h: torch.Tensor, p: str) -> torch.Tensor:
        """[L, E]: each token's weight for every expert, zero for the experts it does not go to."""
        hf, k = self.hf, self.hf["num_experts_per_tok"]
        logits = h @ self.w[f"{p}.mlp.gate.weight"].T
        dense = torch.zeros_like(logits)
        if not self.llada2:
            probs = logits.softmax(-1)
            if f"{p}.mlp.expert_bias" in self.w:
                probs = probs + self.w[f"{p}.mlp.expert_bias"]
            top, ids = probs.topk(k, dim=-1)
            if self.sdar and hf["norm_topk_prob"]:
                top = top / top.sum(-1, keepdim=True)
            return dense.scatter(1, ids, top)
        scores = logits.sigmoid()
        biased = scores + self.w[f"{p}.mlp.gate.expert_bias"]
        groups = biased.view(len(h), hf["n_group"], -1)
        group_score = groups.topk(2, dim=-1).values.sum(-1)
        kept = torch.zeros_like(group_score).scatter(1, group_score.topk(hf["topk_group"], dim=-1).indices, 1.0)
        eligible = groups.masked_fill(kept[:, :, None] == 0, float("-inf")).view(len(h), -1)
        ids = eligible.topk(k, dim=-1).indices
        chosen = scores.gather(1, ids)
        chosen = chosen / chosen.sum(-1, keepdim=True) * hf["routed_scaling_factor"]
        return dense.scatter(1, ids, chosen)

    def _feed_forward(self, h: torch.Tensor, i: int, p: str) -> torch.Tensor:
        hf = self.hf
        if self.llada2:
            dense_layer = i < hf.get("first_k_dense_replace", 0)
        else:
            dense_layer = i in hf["mlp_only_layers"] if self.sdar else not hf["moe_layer_freq"][i]
        if dense_layer:
            return self._swiglu(h, f"{p}.mlp")
        routing = self.routing_matrix(h, p)
        every_expert = torch.stack([self._swiglu(h, f"{p}.mlp.experts.{e}") for e in range(hf["num_experts"])], 1)
        out = torch.einsum("le,led->ld", routing, every_expert)
        shared = f"{p}.mlp.shared_experts" if self.llada2 else f"{p}.shared_expert"
        return out + self._swiglu(h, shared) if f"{shared}.gate_proj.weight" in self.w else out

    def logits(self, ids: list[int], stale: StaleKV | None = None, record: list | None = None) -> torch.Tensor:
        """[L, V] fp32 logits of one sequence (the engine's model is not involved).

        `stale`: at its positions, every layer's keys and values are the given ones
        instead of this forward's (a cache holding older K/V). `record`: every
        layer's (k, v) [L, kv_heads, D] is appended to it.
        """
        n = len(ids)
        if self.block is None:
            visible = torch.ones(n, n, dtype=torch.bool)
        else:
            block_of = torch.arange(n) // self.block
            visible = block_of[None, :] <= block_of[:, None]
        embed = self.w.get("model.word_embeddings.weight", self.w.get("model.embed_tokens.weight"))
        x = embed[torch.tensor(ids)]
        for i in range(self.hf["num_hidden_layers"]):
            p = f"model.layers.{i}"
            h = self._norm(x, f"{p}.input_layernorm.weight")
            q, k, v = self._qkv(h, p)
            q, k = self._rope(q), self._rope(k)
            k, v = self._through_cache(i, k, v, stale, record)
            group = self.heads // self.kv_heads
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / self.head_dim**0.5
            attended = torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible[None], float("-inf")).softmax(-1), v)
            out_proj = f"{p}.attention.dense" if self.llada2 else f"{p}.self_attn.o_proj"
            x = x + self._linear(attended.reshape(n, -1), out_proj)
            x = x + self._feed_forward(self._norm(x, f"{p}.post_attention_layernorm.weight"), i, p)
        x = self._norm(x, "model.norm.weight")
        return x @ self.w.get("lm_head.weight", embed).T

    def dual_decode(self, prompt: list[int], max_tokens: int, block_length: int, threshold: float) -> list[int]:
        """Fast-dLLM's dual cache with its threshold rule, for a full-attention model: each block's first step
        runs everything and keeps every layer's K/V; its later steps give every position outside the block
        those kept K/V. Per step, the block's masked positions with confidence >= `threshold` are committed,
        at least the most confident one; the mask token is never proposed."""
        x = prompt + [self.mask_id] * max_tokens
        for start in range(len(prompt), len(x), block_length):
            end = min(start + block_length, len(x))
            outside = torch.tensor([i for i in range(len(x)) if not start <= i < end])
            kept: list = []
            while self.mask_id in x[start:end]:
                stale = StaleKV(outside, kept) if kept else None
                logits = self.logits(x, stale=stale, record=None if kept else kept)
                logits[:, self.mask_id] = float("-inf")
                confidence, tokens = logits.softmax(-1).max(-1)
                masked = [i for i in range(start, end) if x[i] == self.mask_id]
                best = max(masked, key=lambda i: float(confidence[i]))
                for i in {best} | {i for i in masked if confidence[i] >= threshold}:
                    x[i] = int(tokens[i])
        return x[len(prompt) :]

    def as_loaded(self) -> SimpleNamespace:
        """This reference in the shape `decoding_reference.dense_decode` takes (a config and a dense forward)."""
        config = SimpleNamespace(mask_token_id=self.mask_id, logits_shift=0)
        model = SimpleNamespace(forward_dense=lambda x: torch.stack([self.logits(row.tolist()) for row in x]))
        return SimpleNamespace(config=config, model=model)
