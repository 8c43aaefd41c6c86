"""Where the host's share of an engine step goes: wall time of each phase of steady cached steps.

    python diagnostics/host_phases.py --batch 64 --cache dual

Runs the same engine and random LLaDA-8B-shaped model as `throughput.py` and
wraps the step's phases in wall-clock timers (no added synchronisation): the
scheduler (which plans each candidate's work: the work's own line is part of
it), packing, launching the forward, proposing (the one wait for the GPU is
timed apart), committing and the outputs. What is not the wait is time the GPU sits idle at this batch size.
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import unmask.engine.engine as engine_module
import unmask.engine.runner as runner_module
import unmask.engine.scheduler as scheduler_module
from benchmarks.throughput import admit_random_requests, make_engine
from unmask.engine import cuda_graphs, sampling
from unmask.engine.params import SamplingParams

Totals = collections.defaultdict[str, float]


def timed(owner: object, name: str, label: str, totals: Totals, calls: collections.Counter) -> None:
    """Replace `owner.name` (a class's method or a module's function) with a timed wrapper."""
    inner: Callable = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start
            calls[label] += 1

    setattr(owner, name, wrapper)


def instrument(totals: Totals, calls: collections.Counter) -> None:
    phases = [
        (scheduler_module.Scheduler, "schedule", "schedule (with the work per sequence)"),
        (engine_module, "plan_work", "work per sequence"),
        (runner_module.ModelRunner, "pack_host", "pack (host tensors)"),
        (runner_module, "batch_to", "copy to the GPU"),
        (cuda_graphs.CudaGraphRunner, "run", "graph fill + replay launch"),
        (sampling, "row_inputs", "sampling inputs"),
        (sampling, "fused_confidence", "confidence kernel launch"),
        (sampling, "to_host", "wait for the GPU + read proposals"),
        (engine_module.LLMEngine, "_commit_sequence", "commit per sequence"),
        (engine_module.LLMEngine, "_output", "output per sequence"),
    ]
    for owner, name, label in phases:
        timed(owner, name, label, totals, calls)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llada-8b")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--cache", default="dual")
    p.add_argument("--tokens-per-step", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed cached steps (after a refresh and one cached step)")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if 2 + a.steps > 32 // a.tokens_per_step:
        p.error("the warm-up and timed steps must fit in one block (32 / tokens-per-step steps)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine = make_engine(a.arch, device, dtype, a.batch, a.prompt + 256)
    params = SamplingParams(max_tokens=256, block_length=32, steps=32 // a.tokens_per_step, cache=a.cache)
    admit_random_requests(engine, a.batch, a.prompt, params, seed=0)
    walls: list[float] = []
    engine.step_listeners.append(lambda s: walls.append(s.step_seconds))
    for _ in range(2):  # a refresh and one cached step: graphs captured, kernels compiled
        engine.step()
    totals: Totals = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    instrument(totals, calls)
    walls.clear()
    for _ in range(a.steps):
        engine.step()
    print(f"# {a.arch} batch {a.batch} cache {a.cache} {a.tokens_per_step} tok/step on {device}, "
          f"host threads {torch.get_num_threads()}: step wall {sum(walls) / a.steps * 1e3:.2f} ms")
    print("phase | ms per step | calls per step")
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{label} | {seconds / a.steps * 1e3:.2f} | {calls[label] // a.steps}")


if __name__ == "__main__":
    main()
