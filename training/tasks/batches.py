"""Tokenized training batches of the tasks: prompt + response + end-of-text canvas padding.

A training sequence is `chat(prompt) + response + <|endoftext|> * k`, i.e. the
prompt followed by a canvas that holds the response and is padded with
end-of-text, as LLaDA-Instruct's SFT data is. Sequences are packed into rows
of a fixed length (`PackedBatch`), so every batch mixes the task families and
has the same shape. Both the diffusion and the guide training read these batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import Tokenizer

from training.tasks import train_stream

EOS, MASK = "<|endoftext|>", "<|mask|>"
USER, ASSISTANT, SYSTEM, EOT = "<|user|>", "<|assistant|>", "<|system|>", "<|eot|>"


def chat_prompt(user_text: str) -> str:
    """The bundled chat template applied to one user message with the generation prompt.

    A fast equivalent of `apply_chat_template([{"role": "user", ...}],
    add_generation_prompt=True)`; tests check that the two agree.
    """
    return f"{USER}\n{user_text}{EOT}\n{ASSISTANT}\n"


@dataclass
class PackedBatch:
    """Rows of `L` tokens, each holding several whole examples (prompt + canvas) back to back.

    Every token knows its example (`segment`, -1 for the padding at a row's end),
    its position inside that example, and where it sits in the example's canvas
    (`canvas_pos`, -1 for prompt and padding tokens). Attention stays inside an
    example (see `same_segment`), so packing changes nothing for the model but
    fills every batch with a mix of families and wastes almost no tokens.
    """

    input_ids: torch.Tensor  # [B, L] int64
    positions: torch.Tensor  # [B, L] int64, from 0 at each example's first token
    segment: torch.Tensor  # [B, L] int64, example index within the row; -1 = padding
    canvas_pos: torch.Tensor  # [B, L] int64, index within the example's canvas; -1 elsewhere
    canvas_len: torch.Tensor  # [B, L] int64, the token's example's canvas length (1 off the canvas)
    answer: torch.Tensor  # [B, L] bool, response tokens (the canvas before its end-of-text padding)
    num_examples: int

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(*(self._tensors(lambda t: t.to(device, non_blocking=True))), self.num_examples)

    def pin_memory(self) -> "PackedBatch":
        return PackedBatch(*(self._tensors(torch.Tensor.pin_memory)), self.num_examples)

    def _tensors(self, fn) -> list[torch.Tensor]:
        return [fn(t) for t in (self.input_ids, self.positions, self.segment, self.canvas_pos, self.canvas_len,
                                self.answer)]

    def same_segment(self) -> torch.Tensor:
        """[B, 1, L, L] attention mask: True where query and key belong to the same example."""
        return (self.segment[:, :, None] == self.segment[:, None, :])[:, None]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


@dataclass(frozen=True)
class BatchSpec:
    """How batches are cut: `tokens` per batch (B * L), canvas lengths up to `max_canvas`."""

    tokens: int = 32768
    max_canvas: int = 128
    canvas_multiple: int = 32
    families: tuple[str, ...] | None = None  # None: all task families, mixed uniformly
    easy_fraction: float = 0.0  # share of training-only smaller instances (see tasks.EASY)
    row_length: int = 640  # examples are packed into rows of this many tokens (see `PackedBatch`)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The raw `tokenizers` tokenizer of a model directory (no transformers needed)."""
    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def sample_canvas(rng: random.Random, answer_len: int, spec: BatchSpec, room: int | None = None) -> int:
    """A canvas length that fits the answer and at least one end-of-text.

    Mostly a multiple of `canvas_multiple` (the usual max_tokens of a request;
    the tightest one most often, so answer tokens keep a large share of the
    loss), otherwise any length, so the model learns to stop for every canvas
    size up to `max_canvas`.
    """
    low = answer_len + 1
    top = spec.max_canvas if room is None else max(low, min(spec.max_canvas, room))
    if low >= top:
        return low
    first = -(-low // spec.canvas_multiple) * spec.canvas_multiple
    multiples = range(first, top + 1, spec.canvas_multiple)
    u = rng.random()
    if u < 0.4 and len(multiples):
        return multiples[0]
    if u < 0.7 and len(multiples):
        return rng.choice(multiples)
    return rng.randint(low, top)


def encode_pair(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted prompt and of the response (no padding)."""
    return tok.encode(chat_prompt(prompt)).ids, tok.encode(response).ids


Placed = tuple[list[int], list[int], int]  # prompt ids, answer ids, canvas length


def batches(model_dir: str | Path, spec: BatchSpec, seed: int | str) -> Iterator[PackedBatch]:
    """Endless batches of `spec.tokens // spec.row_length` packed rows, deterministic for `seed`.

    Examples go first-fit into the rows; an example that fits nowhere waits for
    the next batch (after a few such, the batch is full enough to emit).
    """
    tok = load_tokenizer(model_dir)
    eos_id = tok.token_to_id(EOS)
    rng = random.Random(f"packed:{seed}")
    examples = train_stream(seed, spec.families, spec.easy_fraction)
    n_rows = max(1, spec.tokens // spec.row_length)
    waiting: list[tuple[list[int], list[int]]] = []
    while True:
        rows: list[list[Placed]] = [[] for _ in range(n_rows)]
        free = [spec.row_length] * n_rows
        carry: list[tuple[list[int], list[int]]] = []
        while len(carry) < 4:
            p, a = waiting.pop() if waiting else encode_pair(tok, *_next_pair(examples))
            if len(p) + len(a) + 1 > spec.row_length:
                continue  # longer than a row: never trainable in this layout
            row = next((i for i in range(n_rows) if free[i] >= len(p) + len(a) + 1), None)
            if row is None:
                carry.append((p, a))
                continue
            c = sample_canvas(rng, len(a), spec, room=free[row] - len(p))
            rows[row].append((p, a, c))
            free[row] -= len(p) + c
        waiting = carry
        yield _pack(rows, spec.row_length, eos_id)


def _next_pair(examples) -> tuple[str, str]:
    ex = next(examples)
    return ex.prompt, ex.response


def _pack(rows: list[list[Placed]], length: int, eos_id: int) -> PackedBatch:
    """Lay the placed examples out in [rows, length] tensors (end-of-text padding at row ends)."""
    shape = (len(rows), length)
    ids = torch.full(shape, eos_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    canvas_pos = torch.full(shape, -1, dtype=torch.long)
    canvas_len = torch.ones(shape, dtype=torch.long)
    answer = torch.zeros(shape, dtype=torch.bool)
    for r, placed in enumerate(rows):
        start = 0
        for s, (p, a, c) in enumerate(placed):
            mid, end = start + len(p), start + len(p) + c
            ids[r, start:mid] = torch.tensor(p)
            ids[r, mid : mid + len(a)] = torch.tensor(a)
            positions[r, start:end] = torch.arange(end - start)
            segment[r, start:end] = s
            canvas_pos[r, mid:end] = torch.arange(c)
            canvas_len[r, mid:end] = c
            answer[r, mid : mid + len(a)] = True
            start = end
    return PackedBatch(ids, positions, segment, canvas_pos, canvas_len, answer, sum(map(len, rows)))


class BatchStream(torch.utils.data.IterableDataset):
    """`batches` behind a DataLoader: each worker runs its own seeded stream."""

    def __init__(self, model_dir: str | Path, spec: BatchSpec, seed: int):
        super().__init__()
        self.model_dir, self.spec, self.seed = str(model_dir), spec, seed

    def __iter__(self) -> Iterator[PackedBatch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        return batches(self.model_dir, self.spec, f"{self.seed}:{worker}")


def batch_loader(model_dir: str | Path, spec: BatchSpec, seed: int, workers: int,
                 pin_memory: bool = False) -> Iterator[PackedBatch]:
    """Endless batches, produced by `workers` background processes (0: in this process)."""
    if workers == 0:
        return batches(model_dir, spec, f"{seed}:0")
    loader = torch.utils.data.DataLoader(
        BatchStream(model_dir, spec, seed), batch_size=None, num_workers=workers,
        prefetch_factor=8, collate_fn=_identity, worker_init_fn=_single_thread, pin_memory=pin_memory,
    )
    return iter(loader)


def _identity(batch: PackedBatch) -> PackedBatch:
    return batch


def _single_thread(worker: int) -> None:
    # Many workers share the host; one thread each avoids oversubscribing its cores.
    torch.set_num_threads(1)
