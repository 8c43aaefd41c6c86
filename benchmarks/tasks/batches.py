"""Tokenized training batches of the tasks: prompt + response + end-of-text canvas padding.

A training sequence is `chat(prompt) + response + <|endoftext|> * k`, i.e. the
prompt followed by a canvas that holds the response and is padded with
end-of-text, as LLaDA-Instruct's SFT data is. Examples are grouped by length
so a batch needs no attention mask: every row of a batch has the same length
`L`, and the shorter rows get a longer canvas (more end-of-text) instead of
padding. Both the diffusion and the guide training read these batches.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import Tokenizer

from benchmarks.tasks import train_stream

EOS, MASK = "<|endoftext|>", "<|mask|>"
USER, ASSISTANT, SYSTEM, EOT = "<|user|>", "<|assistant|>", "<|system|>", "<|eot|>"


def chat_prompt(user_text: str) -> str:
    """The bundled chat template applied to one user message with the generation prompt.

    A fast equivalent of `apply_chat_template([{"role": "user", ...}],
    add_generation_prompt=True)`; tests check that the two agree.
    """
    return f"{USER}\n{user_text}{EOT}\n{ASSISTANT}\n"


@dataclass
class Batch:
    """Rows of equal length `L`: `input_ids[i, :prompt_lens[i]]` is the prompt, the rest the canvas.

    `answer_lens[i]` counts the response tokens before the end-of-text padding.
    """

    input_ids: torch.Tensor  # [B, L] int64
    prompt_lens: torch.Tensor  # [B] int64
    answer_lens: torch.Tensor  # [B] int64

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.prompt_lens, self.answer_lens)))

    def pin_memory(self) -> "Batch":
        """Page-locked copies (the DataLoader calls this), so `to(cuda)` can overlap compute."""
        return Batch(*(t.pin_memory() for t in (self.input_ids, self.prompt_lens, self.answer_lens)))

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


@dataclass(frozen=True)
class BatchSpec:
    """How batches are cut: `tokens` per batch (B * L), canvas lengths up to `max_canvas`."""

    tokens: int = 32768
    max_canvas: int = 128
    canvas_multiple: int = 32
    pool_batches: int = 16  # examples for this many batches are length-sorted together
    families: tuple[str, ...] | None = None  # None: all task families, mixed uniformly
    easy_fraction: float = 0.0  # share of training-only smaller instances (see tasks.EASY)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The raw `tokenizers` tokenizer of a model directory (no transformers needed)."""
    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def sample_canvas(rng: random.Random, answer_len: int, spec: BatchSpec) -> int:
    """A canvas length that fits the answer and at least one end-of-text.

    Mostly a multiple of `canvas_multiple` (the usual max_tokens of a request;
    the tightest one most often, so answer tokens keep a large share of the
    loss), otherwise any length, so the model learns to stop for every canvas
    size up to `max_canvas`.
    """
    low = answer_len + 1
    if low > spec.max_canvas:
        return low
    first = -(-low // spec.canvas_multiple) * spec.canvas_multiple
    multiples = range(first, spec.max_canvas + 1, spec.canvas_multiple)
    u = rng.random()
    if u < 0.4 and len(multiples):
        return multiples[0]
    if u < 0.7 and len(multiples):
        return rng.choice(multiples)
    return rng.randint(low, spec.max_canvas)


def encode_pair(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted prompt and of the response (no padding)."""
    return tok.encode(chat_prompt(prompt)).ids, tok.encode(response).ids


def _cut(rows: list[tuple[list[int], list[int], int]], spec: BatchSpec, eos_id: int) -> list[Batch]:
    """Length-sorted (prompt, answer, canvas) rows -> batches of about `spec.tokens` tokens."""
    batches: list[Batch] = []
    start = 0
    while start < len(rows):
        # Rows are sorted by total length, so the last row of a batch sets L.
        end = start + 1
        while end < len(rows) and (end + 1 - start) * (len(rows[end][0]) + rows[end][2]) <= spec.tokens:
            end += 1
        group = rows[start:end]
        length = max(len(p) + c for p, _, c in group)
        ids = torch.full((len(group), length), eos_id, dtype=torch.long)
        for i, (p, a, _) in enumerate(group):
            ids[i, : len(p)] = torch.tensor(p)
            ids[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        plens = torch.tensor([len(p) for p, _, _ in group])
        alens = torch.tensor([len(a) for _, a, _ in group])
        batches.append(Batch(ids, plens, alens))
        start = end
    return batches


def batches(model_dir: str | Path, spec: BatchSpec, seed: int | str) -> Iterator[Batch]:
    """Endless shuffled training batches from the task mixture, deterministic for `seed`."""
    tok = load_tokenizer(model_dir)
    eos_id = tok.token_to_id(EOS)
    rng = random.Random(f"batches:{seed}")
    examples = train_stream(seed, spec.families, spec.easy_fraction)
    while True:
        rows: list[tuple[list[int], list[int], int]] = []
        budget = spec.tokens * spec.pool_batches
        while budget > 0:
            ex = next(examples)
            p, a = encode_pair(tok, ex.prompt, ex.response)
            c = sample_canvas(rng, len(a), spec)
            rows.append((p, a, c))
            budget -= len(p) + c
        rows.sort(key=lambda r: len(r[0]) + r[2])
        pool = _cut(rows, spec, eos_id)
        rng.shuffle(pool)
        yield from pool


class BatchStream(torch.utils.data.IterableDataset):
    """`batches` behind a DataLoader: each worker runs its own seeded stream."""

    def __init__(self, model_dir: str | Path, spec: BatchSpec, seed: int):
        super().__init__()
        self.model_dir, self.spec, self.seed = str(model_dir), spec, seed

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        return batches(self.model_dir, self.spec, f"{self.seed}:{worker}")


def batch_loader(model_dir: str | Path, spec: BatchSpec, seed: int, workers: int,
                 pin_memory: bool = False) -> Iterator[Batch]:
    """Endless batches, produced by `workers` background processes (0: in this process)."""
    if workers == 0:
        return batches(model_dir, spec, f"{seed}:0")
    loader = torch.utils.data.DataLoader(
        BatchStream(model_dir, spec, seed), batch_size=None, num_workers=workers,
        prefetch_factor=8, collate_fn=_identity, worker_init_fn=_single_thread, pin_memory=pin_memory,
    )
    return iter(loader)


def _identity(batch: Batch) -> Batch:
    return batch


def _single_thread(worker: int) -> None:
    # Many workers share the host; one thread each avoids oversubscribing its cores.
    torch.set_num_threads(1)


def take(iterator: Iterator[Batch], n: int) -> list[Batch]:
    return list(itertools.islice(iterator, n))
