"""Key-value recall from a long prompt: 20-30 facts "The code of X is NNNN.", ask for one.

The answer sits anywhere in a prompt of roughly 250-350 tokens, so decoding
depends on the prompt's K/V, which is what the cache policies reuse.

The worked line restates the fact ("The code of X is NNNN.") before the answer:
the key is copied from the question, and then each digit of the code follows
the same tokens as in the prompt, a pattern (find the earlier occurrence of
what precedes, copy what came next) that small transformers learn quickly;
asked cold, the code must be found by a two-step lookup they barely learn.
"""

from __future__ import annotations

import random

from training.tasks.base import Example, with_answer
from training.tasks.words import KEYS

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
    facts = [_fact(k, c) for k, c in zip(keys, codes)]
    prompt = "\n".join(["Remember these codes.", *facts, f"What is the code of {keys[target]}?"])
    answer = str(codes[target])
    return Example(FAMILY, prompt, with_answer([facts[target]], answer), answer, prompt)


def _fact(key: str, code: int) -> str:
    return f"The code of {key} is {code}."
