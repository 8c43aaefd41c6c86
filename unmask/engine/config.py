"""Engine-wide configuration, passed explicitly from the CLI or the offline API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from unmask.engine.params import EngineDefaults

if TYPE_CHECKING:
    import torch

DEFAULT_CPU_KV_BYTES = 512 * 2**20
DEFAULT_GPU_MEMORY_FRACTION = 0.85
LOAD_FORMATS = ("auto", "dummy")
QUANTIZATIONS = ("none", "fp8")
DUMMY_NEEDS = (
    "load format dummy reads the model's shapes from config.json and needs the tokenizer files beside it; "
    "write such a directory with `python -m unmask.engine.models.make_random OUT --preset llada-8b --config-only`"
)


@dataclass
class EngineConfig:
    """How the engine loads its model and bounds its work.

    `kv_cache_memory` (bytes) sizes the page pool; by default 512 MiB on the CPU
    and `gpu_memory_utilization` of the free GPU memory after loading weights.
    `max_num_batched_tokens` caps the active positions packed into one step.
    On CUDA, steps of up to `cuda_graph_max_tokens` active positions replay
    captured graphs (0 runs every step eagerly).
    `feature_cache` adds per-layer feature pages to the pool (needed by
    `cache=dllm-cache`). `guide_model` is the directory of the small causal
    LM behind `unmask=guided`; None means the bundled guide when it shares the
    model's tokenizer (and no guided decoding otherwise).
    `tensor_parallel_size` > 1 splits the model over that many GPUs of the host
    (or CPU processes), one process each (see `engine.parallel`); the KV budget
    is then per GPU.
    `load_format` "auto" reads the checkpoint's safetensors; "dummy" reads
    only `config.json` and the tokenizer and draws random weights (N(0, 0.02))
    on the device, on every rank its own shard: a load test of the model's
    shapes without its weights (the text it writes is meaningless).
    `quantization` "fp8" stores the projections' weights in FP8 (e4m3, a scale
    per output channel) and multiplies them with per-token FP8 activations on
    the GPU's FP8 tensor cores (`engine.models.fp8`): a CUDA GPU of compute
    capability 8.9 or newer and a bf16/fp16 model; with tensor parallelism each
    rank quantizes its own shard.
    `max_score_tokens` caps the prompts scored for prompt logprobs (`echo` +
    `logprobs`): scoring a prompt of L tokens costs L - 1 passes over L positions
    (see `engine.scoring`).
    """

    model_dir: str
    dtype: str = "auto"
    device: str = "auto"
    page_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_FRACTION
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 16384
    max_waiting: int = 256
    cuda_graph_max_tokens: int = 2048
    feature_cache: bool = False
    guide_model: str | None = None
    tensor_parallel_size: int = 1
    load_format: str = "auto"
    quantization: str = "none"
    max_score_tokens: int = 1024
    defaults: EngineDefaults = field(default_factory=EngineDefaults)

    def __post_init__(self) -> None:
        for name in (
            "page_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting", "tensor_parallel_size", "max_score_tokens"
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {self.load_format!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tensor_parallel_size > 1 and self.feature_cache:
            # dLLM-Cache's V-verify ranks tokens by the similarity of their whole V; each rank
            # holds only its heads' V, so the ranks would pick different tokens.
            raise ValueError("feature_cache (cache=dllm-cache) does not support tensor_parallel_size > 1")

    def kv_cache_bytes(self, device: torch.device) -> int:
        """The KV pool's budget on `device`: `kv_cache_memory`, else 512 MiB on the CPU or
        `gpu_memory_utilization` of the GPU memory free now."""
        if self.kv_cache_memory is not None:
            return self.kv_cache_memory
        if device.type == "cuda":
            import torch  # here, not at the top: the CLI reads this module without loading torch

            free, _ = torch.cuda.mem_get_info(device)
            return int(free * self.gpu_memory_utilization)
        return DEFAULT_CPU_KV_BYTES
