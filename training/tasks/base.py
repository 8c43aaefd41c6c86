"""What every task family shares: the example type, the answer format, the split.

Every response ends with a line `Answer: <answer>`; scoring extracts the text
after the last `Answer:` and compares it exactly (surrounding whitespace aside)
with the expected answer. Worked steps, where a family has them, come before.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

Split = Literal["train", "test"]

ANSWER_PREFIX = "Answer:"
TEST_PERMILLE = 100  # 10% of the problem space is held out for evaluation
_ANSWER_RE = re.compile(r"Answer:[ \t]*([^\n]*)")


@dataclass(frozen=True)
class Example:
    """One problem: the user prompt, the target response and its exact-match answer.

    `key` is the canonical problem (what makes two problems "the same"); the
    train/test split is a function of it alone, so a held-out problem never
    reaches training, however it is phrased.
    """

    family: str
    prompt: str
    response: str
    answer: str
    key: str

    @property
    def split(self) -> Split:
        return split_of(self.family, self.key)


Generator = Callable[[random.Random], Example]


def split_of(family: str, key: str) -> Split:
    """'test' for a fixed ~10% of canonical problems, decided by a stable hash."""
    digest = hashlib.sha256(f"{family}\x00{key}".encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % 1000 < TEST_PERMILLE else "train"


def with_answer(steps: list[str], answer: str) -> str:
    """The response text: worked steps (one per line), then the answer line."""
    return "\n".join([*steps, f"{ANSWER_PREFIX} {answer}"])


def extract_answer(text: str) -> str | None:
    """The answer a model wrote: the text after the last `Answer:`, stripped; None if absent."""
    found = _ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


def is_correct(text: str, answer: str) -> bool:
    """Exact match of the extracted answer against the expected one."""
    return extract_answer(text) == answer.strip()


def stream(generate: Generator, split: Split, seed: int | str) -> Iterator[Example]:
    """An endless, deterministic stream of `split` examples from `generate` seeded by `seed`.

    Rejection keeps the split exact: the other split's problems are skipped.
    """
    rng = random.Random(f"{split}:{seed}")
    while True:
        ex = generate(rng)
        if ex.split == split:
            yield ex


def join_items(items: list[str]) -> str:
    return ", ".join(items)
