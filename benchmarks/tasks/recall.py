"""Key-value recall from a long prompt: 20-30 facts "The code of X is NNNN.", ask for one.

The answer sits anywhere in a prompt of roughly 250-350 tokens, so decoding
depends on the prompt's K/V, which is what the cache policies reuse.
"""

from __future__ import annotations

import random

from benchmarks.tasks.base import Example, with_answer
from benchmarks.tasks.words import KEYS

FAMILY = "recall"
MIN_FACTS, MAX_FACTS = 20, 30


def generate(rng: random.Random) -> Example:
    """Distinct keys with distinct 4-digit codes; the question names one key."""
    return _generate(rng, rng.randint(MIN_FACTS, MAX_FACTS))


def generate_easy(rng: random.Random) -> Example:
    """The same with 2-19 facts (training only: short prompts teach the lookup quickly)."""
    return _generate(rng, rng.randint(2, MIN_FACTS - 1))


def _generate(rng: random.Random, n: int) -> Example:
    keys = rng.sample(KEYS, n)
    codes = rng.sample(range(1000, 10000), n)
    target = rng.randrange(n)
    facts = "\n".join(f"The code of {k} is {c}." for k, c in zip(keys, codes))
    prompt = f"Remember these codes.\n{facts}\nWhat is the code of {keys[target]}?"
    answer = str(codes[target])
    return Example(FAMILY, prompt, with_answer([], answer), answer, prompt)
