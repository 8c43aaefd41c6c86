"""An independent dense reference for the block-causal families (SDAR, Fast-dLLM v2), for the tests.

It reads a checkpoint directory's `config.json` and safetensors by their
Hugging Face names and computes the Qwen2 / Qwen3 forward in plain fp32
PyTorch with an explicit block-causal mask: no code of the engine's model,
pages or kernels. `reference_decode` is the families' reference decoding on
top of it, recomputing everything at every step (no cache), as their public
generation loops define it:

- blocks of the trained size counted from position 0 (the first one holds
  the prompt's tail), the canvas running on to the end of the last block;
- keys end at the current block's end;
- SDAR reads position i from output i; Fast-dLLM v2 from output i - 1, and
  writes each block's first token alone (greedy) from the previous block's
  last output before denoising the block, sub-block by sub-block;
- per step, among the masked positions of the current (sub-)block:
  `threshold` commits those above tau and at least the most confident one;
  `one_per_step` commits the most confident one;
- the mask token is never proposed;
- with `block_cache` (Fast-dLLM v2's `use_block_cache`), a step whose
  sub-block's first token is already committed recomputes only the sub-block:
  the rest of the block keeps the keys and values of the block's last whole
  forward (`StaleKV`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


@dataclass
class StaleKV:
    """Per-layer (k, v) of a whole earlier forward, and the positions that read them instead of fresh ones."""

    positions: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]


class QwenReference:
    def __init__(self, model_dir: Path):
        self.hf = json.loads((Path(model_dir) / "config.json").read_text())
        self.w: dict[str, torch.Tensor] = {}
        for file in Path(model_dir).glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                self.w.update({k: f.get_tensor(k).float() for k in f.keys()})
        hf = self.hf
        self.shifted = hf["model_type"] == "Fast_dLLM_Qwen"
        self.block = hf["bd_size"] if self.shifted else hf["block_size"]
        self.sub_block = hf.get("small_block_size") if self.shifted else None
        self.heads, self.kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
        self.head_dim = hf.get("head_dim") or hf["hidden_size"] // self.heads
        self.mask_id = hf["mask_token_id"]

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        eps = self.hf["rms_norm_eps"]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.w[name]

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ self.w[f"{name}.weight"].T
        return y + self.w[f"{name}.bias"] if f"{name}.bias" in self.w else y

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, heads, D]: rotate_half RoPE at positions 0..L-1."""
        d = self.head_dim
        inv = 1.0 / (self.hf["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles = torch.arange(x.shape[0], dtype=torch.float64)[:, None] * inv[None]
        cos, sin = (torch.cat([f(angles)] * 2, -1).float()[:, None, :] for f in (torch.cos, torch.sin))
        half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
        return x * cos + half * sin

    @staticmethod
    def _through_cache(
        layer: int, k: torch.Tensor, v: torch.Tensor, stale: StaleKV | None, record: list | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s k/v with `stale`'s positions given their kept K/V; appended to `record` if given."""
        if stale is not None:
            k, v = k.clone(), v.clone()
            k[stale.positions], v[stale.positions] = stale.kv[layer][0][stale.positions], stale.kv[layer][1][stale.positions]
        if record is not None:
            record.append((k, v))
        return k, v

    def logits(self, ids: list[int], stale: StaleKV | None = None, record: list | None = None) -> torch.Tensor:
        """[L, V] fp32 logits of one sequence, unshifted, block-causal attention.

        `stale`: at its positions, every layer's keys and values are the given
        ones instead of this forward's (a cache holding older K/V). `record`:
        every layer's (k, v) [L, kv_heads, D] is appended to it.
        """
        n = len(ids)
        block_of = torch.arange(n) // self.block
        visible = block_of[None, :] <= block_of[:, None]
        x = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        for i in range(self.hf["num_hidden_layers"]):
            p = f"model.layers.{i}"
            h = self._norm(x, f"{p}.input_layernorm.weight")
            q = self._linear(h, f"{p}.self_attn.q_proj").view(n, self.heads, self.head_dim)
            k = self._linear(h, f"{p}.self_attn.k_proj").view(n, self.kv_heads, self.head_dim)
            v = self._linear(h, f"{p}.self_attn.v_proj").view(n, self.kv_heads, self.head_dim)
            if f"{p}.self_attn.q_norm.weight" in self.w:
                q, k = self._norm(q, f"{p}.self_attn.q_norm.weight"), self._norm(k, f"{p}.self_attn.k_norm.weight")
            q, k = self._rope(q), self._rope(k)
            k, v = self._through_cache(i, k, v, stale, record)
            group = self.heads // self.kv_heads
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / self.head_dim**0.5
            scores = scores.masked_fill(~visible[None], float("-inf"))
            attended = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1)
            x = x + self._linear(attended, f"{p}.self_attn.o_proj")
            h = self._norm(x, f"{p}.post_attention_layernorm.weight")
            gate, up = self._linear(h, f"{p}.mlp.gate_proj"), self._linear(h, f"{p}.mlp.up_proj")
            x = x + self._linear(torch.nn.functional.silu(gate) * up, f"{p}.mlp.down_proj")
        x = self._norm(x, "model.norm.weight")
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        return x @ head.T

    def _proposals(
        self, x: list[int], end: int, stale: StaleKV | None = None, record: list | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, probability) proposed for every position < end, keys ending at `end`."""
        logits = self.logits(x[:end], stale, record)
        if self.shifted:
            logits = torch.cat([logits[:1], logits[:-1]])
        logits[:, self.mask_id] = float("-inf")
        probs = logits.softmax(-1)
        confidence, tokens = probs.max(-1)
        return tokens, confidence

    def reference_decode(
        self, prompt: list[int], max_tokens: int, rule: str, threshold: float = 0.9, block_cache: bool = False
    ) -> list[int]:
        """The decoding loop; `block_cache` is Fast-dLLM v2's `use_block_cache`: a step whose sub-block's
        first token is committed recomputes only that sub-block, the rest of the block keeping the K/V of
        the block's last whole forward."""
        p, b = len(prompt), self.block
        total = -(-(p + max_tokens) // b) * b
        x = prompt + [self.mask_id] * (total - p)
        for block_start in range(p // b * b, total, b):
            block_end = block_start + b
            if self.shifted and x[block_start] == self.mask_id:
                x[block_start] = self._first_token(x, block_start)
            sub = self.sub_block or b
            whole: list | None = None  # the K/V of the block's last whole forward
            for sub_start in range(block_start, block_end, sub):
                while True:
                    masked = [i for i in range(sub_start, sub_start + sub) if x[i] == self.mask_id]
                    if not masked:
                        break
                    if block_cache and whole is not None and x[sub_start] != self.mask_id:
                        outside = [i for i in range(block_start, block_end) if not sub_start <= i < sub_start + sub]
                        tokens, confidence = self._proposals(x, block_end, StaleKV(torch.tensor(outside), whole))
                    else:
                        whole = []
                        tokens, confidence = self._proposals(x, block_end, record=whole)
                    conf = confidence[masked]
                    chosen = {masked[int(conf.argmax())]}
                    if rule == "threshold":
                        chosen |= {i for i, c in zip(masked, conf.tolist()) if c > threshold}
                    for i in chosen:
                        x[i] = int(tokens[i])
        return x[p : p + max_tokens]

    def _first_token(self, x: list[int], block_start: int) -> int:
        """A block's first token, greedy, from the previous block's last output (keys end at block_start)."""
        logits = self.logits(x[:block_start])[-1]
        logits[self.mask_id] = float("-inf")
        return int(logits.argmax())
