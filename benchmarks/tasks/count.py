"""Count how many times one word occurs in a list of 6-14 words drawn from a few."""

from __future__ import annotations

import random

from benchmarks.tasks.base import Example, join_items, with_answer
from benchmarks.tasks.words import LIST_WORDS

FAMILY = "count"
MIN_ITEMS, MAX_ITEMS = 6, 14


def generate(rng: random.Random) -> Example:
    """A list over 3-5 distinct words; the asked word usually occurs, sometimes (answer 0) not."""
    vocab = rng.sample(LIST_WORDS, rng.randint(3, 5))
    items = [rng.choice(vocab) for _ in range(rng.randint(MIN_ITEMS, MAX_ITEMS))]
    # Ask mostly about words in the list, sometimes about one that is absent (answer 0).
    target = rng.choice(items) if rng.random() < 0.9 else rng.choice([w for w in LIST_WORDS if w not in vocab])
    listed = join_items(items)
    prompt = f"Here is a list: {listed}\nHow many times does {target} appear in the list?"
    answer = str(items.count(target))
    return Example(FAMILY, prompt, with_answer([], answer), answer, f"{target}:{listed}")
