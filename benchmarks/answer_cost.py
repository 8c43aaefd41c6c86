"""What the same answer costs as `max_tokens` grows, with and without the suffix window.

    python benchmarks/answer_cost.py --arch llada-8b                 # on a GPU: answer 64, max_tokens 128 and 1024
    python benchmarks/answer_cost.py --arch tiny --device cpu        # a smoke run anywhere

A random-weight model (built on the device, no checkpoint, as `throughput.py`
does) knows no end-of-text, so the benchmark stands in for it: an answer of
`--answer` tokens is one whose end-of-text lies at canvas position
`--answer`, and the engine ends such a request at the step whose commit
completes the committed run through that position (`Sequence.hit_eos`). The
benchmark drives the real engine and aborts each request at exactly that
step (which frees its pages, as finishing does), so what it times is the
steps the engine would run for that answer. The model's own end-of-text id
is set to none, so nothing else ends a request early.

For each cache policy, without the window and with `suffix_window` =
`--window`, it decodes the same requests (random prompts, greedy,
`--tokens-per-step` tokens a step) with each `--max-tokens`, after one
untimed run of each shape (kernel compilation, CUDA graph capture), and
prints the wall time, the steps and the positions recomputed to reach the
answer, and the cost ratio of the largest `--max-tokens` to the smallest.
Without the window every step computes or attends to the whole canvas, so
the ratio grows with it; with a window that ends inside the smallest canvas
while the answer is written, both decode the same positions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.throughput import admit_random_requests, make_engine
from unmask.engine.engine import LLMEngine
from unmask.engine.models.make_random import PRESETS
from unmask.engine.params import SamplingParams
from unmask.engine.sequence import Sequence


@dataclass
class Cost:
    """What the requests of one (cache, window, max_tokens) took to reach their answer's end."""

    seconds: float
    steps: int  # engine steps until the last request reached its answer's end
    positions: int  # positions recomputed over all requests (what the steps computed)


@dataclass
class Row:
    cache: str
    window: int | None
    costs: dict[int, Cost]  # by max_tokens

    def ratio(self, field: str) -> float:
        """Cost at the largest max_tokens over cost at the smallest."""
        low, high = min(self.costs), max(self.costs)
        return getattr(self.costs[high], field) / getattr(self.costs[low], field)


def answer_written(seq: Sequence, answer: int) -> bool:
    """Every canvas position through `answer` is committed: an end-of-text at `answer` would end the request now."""
    start = seq.prompt_len
    return not bool((seq.tokens[start : start + answer + 1] == seq.mask_id).any())


def decode_answer(engine: LLMEngine, a: argparse.Namespace, params: SamplingParams) -> Cost:
    """Admit `--batch` requests and step until each has written its answer; each is aborted at that step."""
    admit_random_requests(engine, a.batch, a.prompt, params, seed=a.prompt)
    running = [engine.scheduler.find(f"r{i}") for i in range(a.batch)]
    seconds, steps, positions = 0.0, 0, 0
    while running:
        start = time.perf_counter()
        engine.step()
        seconds += time.perf_counter() - start
        steps += 1
        for seq in [s for s in running if answer_written(s, a.answer)]:
            positions += seq.stats.active_positions
            engine.abort(seq.request_id)  # None when the canvas ended with the answer, and the engine with it
            running.remove(seq)
    return Cost(seconds, steps, positions)


def measure(engine: LLMEngine, a: argparse.Namespace, cache: str, window: int | None, max_tokens: int) -> Cost:
    params = SamplingParams(max_tokens=max_tokens, block_length=a.block, steps=a.block // a.tokens_per_step,
                            cache=cache, suffix_window=window)
    decode_answer(engine, a, params)  # warm-up: the same shapes, untimed
    runs = [decode_answer(engine, a, params) for _ in range(a.repeats)]
    return Cost(statistics.median(r.seconds for r in runs), runs[0].steps, runs[0].positions)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=[n for n, c in PRESETS.items() if c.attention_block_size is None], default="llada-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--answer", type=int, default=64, help="answer tokens (the end-of-text's canvas position)")
    p.add_argument("--max-tokens", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--window", type=int, default=1, help="suffix_window of the windowed rows")
    p.add_argument("--cache", nargs="+", default=["none", "prefix", "dual"])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--tokens-per-step", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (the median is reported)")
    a = p.parse_args(argv)
    if a.answer >= min(a.max_tokens):
        p.error("--answer must be shorter than every --max-tokens (its end-of-text needs a canvas position)")
    if a.block % a.tokens_per_step:
        p.error("--tokens-per-step must divide --block")
    return a


def main(argv: list[str] | None = None) -> list[Row]:
    a = parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine = make_engine(a.arch, device, dtype, a.batch, a.prompt + max(a.max_tokens))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {a.arch} on {where}, {dtype}: answer {a.answer} tokens, prompt {a.prompt}, batch {a.batch}, "
          f"block {a.block}, {a.tokens_per_step} token(s) a step, median of {a.repeats}")
    low, high = min(a.max_tokens), max(a.max_tokens)
    columns = ["cache", "suffix_window", *(f"{kind} @{m}" for m in sorted(a.max_tokens) for kind in ("ms", "steps", "positions")),
               f"time {high}/{low}", f"positions {high}/{low}"]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    rows = []
    for cache in a.cache:
        for window in (None, a.window):
            row = Row(cache, window, {m: measure(engine, a, cache, window, m) for m in sorted(a.max_tokens)})
            cells = [cache, "off" if window is None else str(window)]
            for m in sorted(a.max_tokens):
                cost = row.costs[m]
                cells += [f"{cost.seconds * 1e3:.1f}", str(cost.steps), str(cost.positions)]
            cells += [f"{row.ratio('seconds'):.2f}x", f"{row.ratio('positions'):.2f}x"]
            print("| " + " | ".join(cells) + " |", flush=True)
            rows.append(row)
    engine.close()
    return rows


if __name__ == "__main__":
    main()
