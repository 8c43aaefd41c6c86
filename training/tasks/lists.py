"""List manipulation: sort numbers (either direction), sort words alphabetically, reverse a list."""

from __future__ import annotations

import random

from training.tasks.base import Example, join_items, with_answer
from training.tasks.words import LIST_WORDS

FAMILY = "lists"
MIN_ITEMS, MAX_ITEMS = 4, 7


def _items(rng: random.Random, words: bool, n: int) -> list[str]:
    if words:
        return rng.sample(LIST_WORDS, n)
    return [str(x) for x in rng.sample(range(1, 100), n)]


def generate(rng: random.Random) -> Example:
    """One of: numbers ascending/descending, words alphabetical, numbers or words reversed."""
    return _generate(rng, MIN_ITEMS, MAX_ITEMS)


def generate_easy(rng: random.Random) -> Example:
    """The same over 2-3 items (training only)."""
    return _generate(rng, 2, MIN_ITEMS - 1)


def _generate(rng: random.Random, min_items: int, max_items: int) -> Example:
    op = rng.choice(("ascending", "descending", "alphabetical", "reverse"))
    words = op == "alphabetical" or (op == "reverse" and rng.random() < 0.5)
    items = _items(rng, words, rng.randint(min_items, max_items))
    listed = join_items(items)
    if op == "ascending":
        prompt = f"Sort these numbers from smallest to largest: {listed}"
        result = sorted(items, key=int)
    elif op == "descending":
        prompt = f"Sort these numbers from largest to smallest: {listed}"
        result = sorted(items, key=int, reverse=True)
    elif op == "alphabetical":
        prompt = f"Sort these words in alphabetical order: {listed}"
        result = sorted(items)
    else:
        prompt = f"Reverse this list: {listed}"
        result = items[::-1]
    answer = join_items(result)
    return Example(FAMILY, prompt, with_answer([], answer), answer, f"{op}:{listed}")
