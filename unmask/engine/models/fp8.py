"""FP8 weights (`quantization="fp8"`): a loaded bf16/fp16 model's projections quantized to e4m3.

`quantize_fp8` runs once, after the weights are loaded and fused: each block's
stacked q/k/v and gate/up weights (`FusedRows`), its o_proj and its down_proj
become e4m3 with one float32 scale per output channel (each fused output
channel keeps its own scale), and every call quantizes its input per token
(`kernels.fp8_linear`). The embedding, the LM head, the norms and a
mixture-of-experts layer's experts stay in the model's dtype. The
bf16 weights are dropped, so the projections take one byte per weight.

FP8 products need a GPU of compute capability 8.9 or newer (Ada, Hopper);
`check_fp8_support` refuses the rest at startup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from unmask.engine.models.arch import CheckpointError
from unmask.engine.models.config import ModelConfig
from unmask.engine.models.swiglu import FusedRows, SwiGLU
from unmask.engine.models.transformer import DiffusionTransformer
from unmask.kernels.fp8_linear import fp8_linear
from unmask.kernels.fp8_quant import quantize_rows

FP8_MIN_CAPABILITY = (8, 9)
FP8_MODEL_DTYPES = (torch.bfloat16, torch.float16)
GEMM_ALIGNMENT = 16  # torch._scaled_mm wants K and N multiples of 16

Reduce = Callable[[torch.Tensor], torch.Tensor]


def check_fp8_support(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse `quantization="fp8"` where it cannot run: not on CUDA, a GPU older than Ada/Hopper, or fp32."""
    if device.type != "cuda":
        raise CheckpointError(
            f"quantization fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); the device is {device}"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise CheckpointError(
            f"quantization fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); {name} has {major}.{minor}"
        )
    if dtype not in FP8_MODEL_DTYPES:
        raise CheckpointError(f"quantization fp8 quantizes bfloat16 or float16 weights; the dtype is {dtype}")


def check_fp8_shapes(cfg: ModelConfig, tensor_parallel_size: int = 1) -> None:
    """Refuse a model whose projections (one tensor-parallel shard's) are not multiples of 16 wide, as FP8 GEMMs need."""
    tp = tensor_parallel_size
    widths = {
        "hidden_size": cfg.hidden_size,
        "the query heads' width": cfg.num_heads * cfg.head_dim // tp,
        "the KV heads' width": cfg.num_kv_heads * cfg.head_dim // tp,
        "intermediate_size": cfg.intermediate_size // tp,
    }
    for name, width in widths.items():
        if width % GEMM_ALIGNMENT:
            shard = f" per tensor-parallel rank ({tp})" if tp > 1 else ""
            raise CheckpointError(
                f"quantization fp8 needs the projections' dimensions to be multiples of {GEMM_ALIGNMENT}; "
                f"{name}{shard} is {width}"
            )


class Fp8Linear(nn.Module):
    """A linear layer with e4m3 weights [out, in], a float32 scale per output channel and dynamic per-token input scales.

    `reduce`, if given, is applied to the output: a tensor-parallel row-parallel
    layer's sum over ranks.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, reduce: Reduce | None = None):
        super().__init__()
        self.register_buffer("weight", weight)  # e4m3 [out, in]
        self.register_buffer("weight_scale", weight_scale)  # float32 [1, out]
        self.register_buffer("bias", bias)  # bf16 [out] (the FP8 GEMM's epilogue adds bf16) or None
        self.reduce = reduce

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, reduce: Reduce | None = None) -> Fp8Linear:
        """The FP8 layer of a float weight [out, in] (and bias): one scale per output channel."""
        _check_alignment(weight)
        with torch.no_grad():
            q, scale = quantize_rows(weight)
        return cls(q, scale.reshape(1, -1), None if bias is None else bias.detach().to(torch.bfloat16), reduce)

    def rows(self, start: int, stop: int) -> Fp8Linear:
        """The layer of output channels [start, stop): the weight a view (no copy), the scales their own."""
        bias = None if self.bias is None else self.bias[start:stop]
        _check_alignment(self.weight[start:stop])
        return Fp8Linear(self.weight[start:stop], self.weight_scale[:, start:stop].contiguous(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fp8_linear(x, self.weight, self.weight_scale, self.bias)
        return out if self.reduce is None else self.reduce(out)


@dataclass
class Fp8Rows:
    """`FusedRows` with FP8 weights: several layers' output channels in one FP8 GEMM, each channel its own scale."""

    linear: Fp8Linear
    sizes: list[int]

    @classmethod
    def quantize(cls, fused: FusedRows) -> Fp8Rows:
        return cls(Fp8Linear.quantize(fused.weight, fused.bias), list(fused.sizes))

    def layers(self) -> list[Fp8Linear]:
        """Each fused layer on its own, its weight a view of the stacked one (for code that calls one layer)."""
        bounds = [0]
        for size in self.sizes:
            bounds.append(bounds[-1] + size)
        return [self.linear.rows(start, stop) for start, stop in zip(bounds, bounds[1:])]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, dim=-1)


def quantize_fp8(model: DiffusionTransformer, reduce: Reduce | None = None) -> None:
    """Quantize `model`'s projections to FP8 in place and free their float weights.

    `reduce` is the all-reduce of a tensor-parallel shard's row-parallel layers
    (o_proj, down_proj), None on one device. A block whose MLP is not a
    SwiGLU (a mixture of experts) keeps its MLP as it is.
    """
    for block in model.layers:
        attn = block.attn
        if attn.qkv is None:
            attn.fuse_projections()
        qkv = Fp8Rows.quantize(attn.qkv)
        attn.qkv = qkv  # type: ignore[assignment]  (called like FusedRows)
        attn.q_proj, attn.k_proj, attn.v_proj = qkv.layers()
        attn.o_proj = Fp8Linear.quantize(attn.o_proj.weight, attn.o_proj.bias, reduce)
        if isinstance(block.mlp, SwiGLU):
            _quantize_swiglu(block.mlp, reduce)
    if model.lm_head.weight.is_cuda:
        torch.cuda.empty_cache()  # hand the float weights back, so the KV pool can take their memory


def _quantize_swiglu(mlp: SwiGLU, reduce: Reduce | None) -> None:
    if mlp.gate_up is None:
        mlp.fuse_projections()
    gate_up = Fp8Rows.quantize(mlp.gate_up)
    mlp.gate_up = gate_up  # type: ignore[assignment]
    mlp.gate_proj, mlp.up_proj = gate_up.layers()
    mlp.down_proj = Fp8Linear.quantize(mlp.down_proj.weight, mlp.down_proj.bias, reduce)


def _check_alignment(weight: torch.Tensor) -> None:
    out_features, in_features = weight.shape
    if out_features % GEMM_ALIGNMENT or in_features % GEMM_ALIGNMENT:
        raise CheckpointError(
            f"quantization fp8 needs every projection's dimensions to be multiples of {GEMM_ALIGNMENT} "
            f"(the FP8 GEMM's constraint); this model (or its tensor-parallel shard) has one of "
            f"{out_features} x {in_features}"
        )
