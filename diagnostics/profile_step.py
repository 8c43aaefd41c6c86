"""Where the time of one engine step goes: GPU kernels by kind, and the host's share.

    python diagnostics/profile_step.py --batch 64 --prompt 128 --cache dual --tokens-per-step 4
    python diagnostics/profile_step.py --batch 1 --cache dual --quantization fp8   # FP8 weights

Runs the same engine and random LLaDA-8B-shaped model as `throughput.py`,
times a few steady-state cached steps, profiles a few more with torch.profiler,
and prints the GPU time per kernel family, the total GPU busy time per step and
the unprofiled wall time per step: their difference is the host's share
(Python, launches, copies) that the GPU waits for.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.throughput import admit_random_requests, make_engine
from unmask.engine.params import SamplingParams

FAMILIES = (
    ("moe experts (fused)", ("_moe_",)),
    ("gemm", ("gemm", "cutlass", "sm90", "nvjet", "cublas")),
    ("attention", ("attn_fwd", "merge_splits")),
    ("fp8 input quantization", ("quantize_rows",)),
    ("kv write", ("write_kv",)),
    ("confidence", ("confidence",)),
    ("norm/rope/silu (fused)", ("rms_norm", "rotary", "silu_mul")),
    ("norm/rope/elementwise", ("elementwise", "vectorized", "reduce", "cat", "copy", "fill", "index")),
)


def family(name: str) -> str:
    lowered = name.lower()
    for label, keys in FAMILIES:
        if any(k in lowered for k in keys):
            return label
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llada-8b")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--tokens-per-step", type=int, default=4)
    p.add_argument("--cache", default="dual")
    p.add_argument("--timed-steps", type=int, default=2, help="cached steps timed without the profiler")
    p.add_argument("--steps", type=int, default=3, help="cached steps under the profiler")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (kernels of graph replays may not be traced)")
    p.add_argument("--quantization", choices=["none", "fp8"], default="none", help="the weights' quantization")
    a = p.parse_args()
    if 2 + a.timed_steps + a.steps > a.block // a.tokens_per_step:
        p.error("the warm-up, timed and profiled steps must fit in one block's steps (block / tokens-per-step)")
    engine = make_engine(a.arch, torch.device("cuda"), torch.bfloat16, a.batch, a.prompt + a.gen, cuda_graphs=not a.eager,
                         quantization=a.quantization)
    params = SamplingParams(max_tokens=a.gen, block_length=a.block, steps=a.block // a.tokens_per_step, cache=a.cache)
    admit_random_requests(engine, a.batch, a.prompt, params, seed=0)
    walls: list[float] = []
    engine.step_listeners.append(lambda s: walls.append(s.step_seconds))
    for _ in range(2):  # refresh + one cached step: graphs captured, kernels compiled
        engine.step()
    # Wall time without the profiler (it slows the host's side several-fold), then the kernels under it;
    # every step here is a cached step of the first block (block / tokens-per-step steps per block).
    walls.clear()
    for _ in range(a.timed_steps):
        engine.step()
    wall = statistics.mean(walls) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            engine.step()
    per_family: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_family[family(event.key)] += event.device_time_total / 1e3 / a.steps
    gpu = sum(per_family.values())
    print(f"# {a.arch} batch {a.batch} prompt {a.prompt} cache {a.cache} {a.tokens_per_step} tok/step, "
          f"{torch.cuda.get_device_name()}")
    print("kernel family | ms per step | share of wall")
    for label, ms in sorted(per_family.items(), key=lambda kv: -kv[1]):
        print(f"{label} | {ms:.2f} | {ms / wall:.0%}")
    print(f"GPU busy | {gpu:.2f} | {gpu / wall:.0%}")
    print(f"wall (engine step, unprofiled) | {wall:.2f} | 100%")
    print(f"host overhead (wall - GPU busy) | {wall - gpu:.2f} | {(wall - gpu) / wall:.0%}")
    syncs = sum(e.count for e in prof.key_averages() if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    print(f"host synchronisations per step | {syncs / a.steps:.1f} |")
    # Which kernels, by GPU time, then where the host's time goes.
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=90))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
