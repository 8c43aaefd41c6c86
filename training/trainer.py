"""What the two training scripts (`train_tiny.py`, `train_guide.py`) share.

The run settings both take from the command line (`RunConfig`), the budget
clock, the learning-rate schedule, the optimizer, the training loop with its
log (`fit`), exact-match evaluation on held-out problems, and the files written
beside every checkpoint. Each script brings its model, its loss and its decoder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch

from training.tasks import FAMILIES, Example, held_out_set, is_correct
from training.tasks.batches import BatchSpec, PackedBatch, batch_loader

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = REPO / "models" / "unmask-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_FILE_BYTES = 15 * 2**20  # shards stay under 16 MiB with room for the safetensors header


@dataclass
class RunConfig:
    """Data, budget, optimizer, log and evaluation settings (each a `--flag` of both scripts)."""

    out: str
    tokenizer: str = str(DEFAULT_TOKENIZER)
    device: str = "auto"
    steps: int | None = None
    minutes: float | None = None
    batch_tokens: int = 16384
    max_canvas: int = 128
    row_length: int = 640  # examples are packed into rows of this many tokens
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.03
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    workers: int | None = None  # data processes; None: none on the CPU, up to 12 beside a GPU (`default_workers`)
    log_every: int = 50
    eval_n: int = 200
    eval_gen: int = 64
    eval_batch: int = 128
    families: str = ""  # comma-separated subset of task families to train and evaluate on; "" = all
    easy_fraction: float = 0.3  # share of training-only smaller problems (see training.tasks.EASY)

    def family_names(self) -> tuple[str, ...]:
        """The families to train and evaluate on (all for "")."""
        names = tuple(f.strip() for f in self.families.split(",") if f.strip())
        unknown = [f for f in names if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown task families {unknown}; known: {', '.join(FAMILIES)}")
        return names or tuple(FAMILIES)

    def batch_spec(self, canvas_multiple: int = 32) -> BatchSpec:
        return BatchSpec(tokens=self.batch_tokens, max_canvas=self.max_canvas, canvas_multiple=canvas_multiple,
                         row_length=self.row_length, families=self.family_names(), easy_fraction=self.easy_fraction)


Config = TypeVar("Config", bound=RunConfig)


def _flag(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


def parse_config(cls: type[Config], description: str, argv: list[str] | None = None) -> Config:
    """A `--flag` per field of `cls`; fields typed `X | None` take an X."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, help="directory to write the model into")
    for f in fields(cls):
        if f.name == "out":
            continue
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        kind = {"bool": _flag, "int": int, "float": float, "str": str}[kind.split(" | ")[0]]
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    return cls(**vars(p.parse_args(argv)))


# --------------------------------------------------------------------------- the loop


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def default_workers(device: torch.device) -> int:
    """Data processes when `--workers` is not given.

    On a GPU the step outruns one process making batches: without workers the
    bundled model's recipe waited for data half the time and made 5.6k steps
    instead of 13k in the same 7.25 minutes (benchmarks/RESULTS.md). On the CPU
    the training step is the slow part, and workers would take its cores.
    """
    if device.type == "cpu":
        return 0
    return max(1, min(12, (os.cpu_count() or 2) - 2))


def start(cfg: RunConfig, canvas_multiple: int = 32) -> tuple[torch.device, Iterator[PackedBatch]]:
    """Seed, pick the device and start the data workers (before CUDA is initialised: forking it is fragile)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    data = batch_loader(cfg.tokenizer, cfg.batch_spec(canvas_multiple), cfg.seed, workers,
                        pin_memory=device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return device, data


def lr_at(progress: float, peak: float, warmup: float, min_ratio: float) -> float:
    """Linear warmup over the first `warmup` of training, then cosine decay to `min_ratio * peak`.

    `progress` runs from 0 to 1 (steps or wall time, see `Clock`).
    """
    if progress < warmup:
        return peak * progress / warmup
    frac = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


class Clock:
    """Training progress in [0, 1] by steps or by wall time, whichever budget is given (and ends first)."""

    def __init__(self, steps: int | None, minutes: float | None):
        if steps is None and minutes is None:
            raise ValueError("give --steps or --minutes")
        self.steps, self.seconds = steps, None if minutes is None else minutes * 60.0
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        parts = []
        if self.steps is not None:
            parts.append(step / self.steps)
        if self.seconds is not None:
            parts.append(self.elapsed() / self.seconds)
        return max(parts)


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices except embeddings, none on norms and vectors."""
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in named if p.ndim < 2 or "embed" in n]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


# The loss of one batch: (loss, accuracy on the response tokens).
LossFn = Callable[[PackedBatch], tuple[torch.Tensor, torch.Tensor]]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fit(model: torch.nn.Module, cfg: RunConfig, device: torch.device, data: Iterator[PackedBatch],
        loss_fn: LossFn) -> dict:
    """Train `model` for the configured budget; returns the run summary (steps, tokens, time, history).

    The log and history hold the mean loss and response-token accuracy of each
    `log_every` steps; values stay on the GPU in between, so no step waits for the host.
    """
    opt = make_optimizer(model, cfg, fused=device.type == "cuda")
    clock = Clock(cfg.steps, cfg.minutes)
    step, tokens, window, history, data_wait = 0, 0, [], [], 0.0
    while (progress := clock.progress(step)) < 1.0:
        lr = lr_at(progress, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        t_data = time.perf_counter()
        batch = next(data)
        data_wait += time.perf_counter() - t_data
        batch = batch.to(device)
        with autocast(device):
            loss, answer_acc = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens += batch.num_tokens
        window.append(torch.stack((loss.detach(), answer_acc.detach())))
        if step % cfg.log_every == 0:
            mean, acc = torch.stack(window).mean(dim=0).tolist()
            window.clear()
            history.append((step, mean, acc))
            el = clock.elapsed()
            print(f"step {step:6d}  {el:7.1f}s  loss {mean:.4f}  answer acc {acc:.3f}  lr {lr:.2e}  "
                  f"{step / el:.1f} steps/s  {tokens / el / 1e3:.0f}k tok/s  waiting for data {100 * data_wait / el:.0f}%",
                  flush=True)
    if window:
        history.append((step, *torch.stack(window).mean(dim=0).tolist()))
    return {"steps": step, "tokens": tokens, "train_seconds": round(clock.elapsed(), 1),
            "data_wait_seconds": round(data_wait, 1), "loss_history": history, "params": count_params(model)}


# --------------------------------------------------------------------------- evaluation and output


def exact_match(families: tuple[str, ...], n: int, batch_size: int,
                decode: Callable[[list[Example]], list[str]]) -> dict[str, float]:
    """Accuracy per family on its first `n` held-out problems; `decode` answers a chunk of them."""
    accuracy = {}
    for family in families:
        examples = held_out_set(family, n)
        correct = 0
        for i in range(0, n, batch_size):
            chunk = examples[i : i + batch_size]
            correct += sum(is_correct(text, ex.answer) for text, ex in zip(decode(chunk), chunk))
        accuracy[family] = correct / n
    return accuracy


def evaluate_into(summary: dict, cfg: RunConfig, decode: Callable[[list[Example]], list[str]], setup: str) -> None:
    """Run `exact_match` if `--eval-n` asks for it, recording accuracy, time and setup in `summary`."""
    if cfg.eval_n <= 0:
        return
    t0 = time.perf_counter()
    summary["eval"] = exact_match(cfg.family_names(), cfg.eval_n, cfg.eval_batch, decode)
    summary["eval_seconds"] = round(time.perf_counter() - t0, 1)
    summary["eval_setup"] = f"{cfg.eval_n} held-out problems per family, {setup}"
    print("held-out accuracy: " + "  ".join(f"{f} {a:.3f}" for f, a in summary["eval"].items()), flush=True)


def finish_output(out: Path, cfg: RunConfig, summary: dict) -> None:
    """Beside the weights: the tokenizer files and `training.json` (summary + settings)."""
    src = Path(cfg.tokenizer)
    if src.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            shutil.copyfile(src / name, out / name)
    (out / "training.json").write_text(json.dumps(summary | {"config": asdict(cfg)}, indent=2) + "\n")
    print(f"wrote {out}", flush=True)
