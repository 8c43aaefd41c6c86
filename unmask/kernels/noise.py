"""The one Gumbel noise source of every sampling path: a counter-based hash of (seed, position, token id).

A row of logits is one position of one request at one step, so its noise is
keyed by the request's 31-bit step seed s and the position p, which
`row_keys` packs into one int64 row key (s << 32 | p) with no arithmetic (the
host prepares thousands per step). The noise of token t in that row is

    k    = mix32(s ^ mix32(p))                  (once per row; mix32: the "lowbias32" integer finalizer)
    bits = mix32(mix32(t ^ k) ^ s)
    u    = (bits >> 9 + 1/2) / 2^23             (exact in fp32, strictly inside (0, 1))
    g    = -log(-log u)                         (fp32; a series for -log u near u = 1)

and a sampled row's proposal is argmax over t of l_t / T + g_t (Gumbel-max:
a draw from softmax(l / T)). The same integer steps and the same fp32
formula run in Triton (`gumbel_bits` and `gumbel_from_bits`, inside the
confidence kernel) and in PyTorch (`gumbel_keys`: the kernel's reference, the
general sampling path and the tensor-parallel reduction), so a fixed seed
proposes the same tokens on CPU and GPU, alone or batched, with or without
tensor parallelism. The integer bits agree exactly; the floating-point keys
may differ in their last bits (GPU and CPU logarithms round differently), so
only keys within rounding of each other can come out in another order.
"""

from __future__ import annotations

import torch

from unmask.kernels._triton import tl, triton

__all__ = ["SEED_BITS", "gumbel_keys", "gumbel_noise", "row_keys"]

SEED_BITS = 31  # of a step seed: the row key s << 32 | p stays a non-negative int64
_M32 = 0xFFFFFFFF
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers
_LN2 = 0.6931471805599453
# Rows are keyed in chunks of about this many logits, which bounds the int64 temporaries.
_CHUNK_ELEMENTS = 2**22


# ----------------------------------------------------------------------------- PyTorch (int64 words holding uint32)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), without overflowing int64: c in two 16-bit halves."""
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX2)
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each row's noise key (int64): its step seed (< 2^SEED_BITS) and its position (< 2^32), packed."""
    return (seeds << 32) | positions


def _bits(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """bits [R, C] (uint32 values in int64) of rows with `keys` [R] at `token_ids` [C]."""
    seed = (keys >> 32) & _M32
    row = _mix32(seed ^ _mix32(keys & _M32))
    return _mix32(_mix32(token_ids[None, :] ^ row[:, None]) ^ seed[:, None])


def _gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) in fp32 from 32 random bits: the kernel's formula, step for step."""
    b = (bits >> 9).to(torch.float32)
    u = (b + 0.5) * (1.0 / 8388608.0)
    w = (8388607.5 - b) * (1.0 / 8388608.0)
    series = w * (1.0 + w * (0.5 + w * (0.3333333333 + w * 0.25)))
    e = torch.where(w < 0.015625, series, -torch.log2(u) * _LN2)
    return -torch.log2(e) * _LN2


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [R, C] (fp32) of rows with `keys` [R] (int64) at global `token_ids` [C]."""
    return _gumbel_from_bits(_bits(keys.long(), token_ids.long()))


def gumbel_keys(logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor, first_token: int = 0) -> torch.Tensor:
    """l / T + g (fp32 [R, C]) for sampled rows (`temperature` [R] > 0); column c is token `first_token + c`."""
    x = logits.float()
    inv_temp = (1.0 / temperature.float())[:, None]
    token_ids = first_token + torch.arange(x.shape[1], device=x.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1]))
    parts = [
        x[i : i + step] * inv_temp[i : i + step] + gumbel_noise(keys[i : i + step], token_ids)
        for i in range(0, x.shape[0], step)
    ]
    return torch.cat(parts) if parts else x.clone()


# ----------------------------------------------------------------------------- Triton (uint32)


@triton.jit
def _mix32_triton(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def gumbel_bits(key, cols):
    """The 32 random bits (uint32) of columns `cols` (token ids) of a row with noise key `key` (int64)."""
    seed = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    row = _mix32_triton(seed ^ _mix32_triton((key & 0xFFFFFFFF).to(tl.uint32)))
    return _mix32_triton(_mix32_triton(cols.to(tl.uint32) ^ row) ^ seed)


@triton.jit
def gumbel_from_bits(bits):
    """Gumbel(0, 1) in fp32 from 32 random bits (`_gumbel_from_bits`, step for step)."""
    b = (bits >> 9).to(tl.float32)
    u = (b + 0.5) * (1.0 / 8388608.0)
    w = (8388607.5 - b) * (1.0 / 8388608.0)
    # Near u = 1 a fast log loses E = -log(u) ~ w to rounding, and E is what the top of the Gumbel
    # tail (the likely winners) is made of: there use the series -log(1 - w) = w + w^2/2 + w^3/3 + w^4/4.
    series = w * (1.0 + w * (0.5 + w * (0.3333333333 + w * 0.25)))
    e = tl.where(w < 0.015625, series, -tl.log2(u) * 0.6931471805599453)
    return -tl.log2(e) * 0.6931471805599453
