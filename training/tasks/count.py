"""Count how many times one word occurs in a list of 5-10 words drawn from a few.

The worked line keeps a running count, one number per list item, so the
answer is built one comparison at a time (a small model cannot count a
whole list in one look).
"""

from __future__ import annotations

import itertools
import random

from training.tasks.base import Example, join_items, with_answer
from training.tasks.words import LIST_WORDS

FAMILY = "count"
MIN_ITEMS, MAX_ITEMS = 5, 10


def generate(rng: random.Random) -> Example:
    """A list over 3-5 distinct words; the asked word usually occurs, sometimes (answer 0) not."""
    return _generate(rng, MIN_ITEMS, MAX_ITEMS)


def generate_easy(rng: random.Random) -> Example:
    """The same over 2-4 items (training only)."""
    return _generate(rng, 2, MIN_ITEMS - 1)


def _generate(rng: random.Random, min_items: int, max_items: int) -> Example:
    vocab = rng.sample(LIST_WORDS, rng.randint(3, 5))
    items = [rng.choice(vocab) for _ in range(rng.randint(min_items, max_items))]
    # Ask mostly about words in the list, sometimes about one that is absent (answer 0).
    target = rng.choice(items) if rng.random() < 0.9 else rng.choice([w for w in LIST_WORDS if w not in vocab])
    listed = join_items(items)
    prompt = f"Here is a list: {listed}\nHow many times does {target} appear in the list?"
    running = list(itertools.accumulate(int(item == target) for item in items))
    steps = [f"Running count: {join_items([str(c) for c in running])}"]
    answer = str(running[-1])
    return Example(FAMILY, prompt, with_answer(steps, answer), answer, f"{target}:{listed}")
