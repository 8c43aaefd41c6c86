"""Multi-step arithmetic word problems (GSM-like) with one worked line per operation.

Each template draws small numbers (operands below 100, factors 2-12), writes one
line `a op b = c` per step and ends with the answer line. Intermediate results
stay non-negative and integral.
"""

from __future__ import annotations

import random
from typing import Callable

from training.tasks.base import Example, with_answer
from training.tasks.words import ITEMS, PEOPLE

FAMILY = "arithmetic"


def _line(a: int, op: str, b: int) -> tuple[str, int]:
    result = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b
    return f"{a} {op} {b} = {result}", result


def _buy_bags(rng: random.Random, n: str, item: str) -> tuple[str, list[str], int, tuple[int, ...]]:
    a, b, c = rng.randint(1, 99), rng.randint(2, 9), rng.randint(2, 12)
    s1, x = _line(b, "*", c)
    s2, r = _line(a, "+", x)
    prompt = f"{n} has {a} {item}. {n} buys {b} bags with {c} {item} in each bag. How many {item} does {n} have now?"
    return prompt, [s1, s2], r, (a, b, c)


def _give_find(rng: random.Random, n: str, item: str) -> tuple[str, list[str], int, tuple[int, ...]]:
    a = rng.randint(10, 99)
    b, c = rng.randint(1, a), rng.randint(1, 99)
    s1, x = _line(a, "-", b)
    s2, r = _line(x, "+", c)
    prompt = (f"{n} has {a} {item}. {n} gives away {b} {item} and then finds {c} more. "
              f"How many {item} does {n} have now?")
    return prompt, [s1, s2], r, (a, b, c)


def _boxes_take(rng: random.Random, n: str, item: str) -> tuple[str, list[str], int, tuple[int, ...]]:
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    c = rng.randint(1, a * b)
    s1, x = _line(a, "*", b)
    s2, r = _line(x, "-", c)
    prompt = (f"There are {a} boxes with {b} {item} in each box. {n} takes {c} {item} out. "
              f"How many {item} are left in the boxes?")
    return prompt, [s1, s2], r, (a, b, c)


def _earn_spend(rng: random.Random, n: str, item: str) -> tuple[str, list[str], int, tuple[int, ...]]:
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    c = rng.randint(1, a * b)
    s1, x = _line(a, "*", b)
    s2, r = _line(x, "-", c)
    prompt = (f"{n} earns {a} dollars each day for {b} days and then spends {c} dollars. "
              f"How many dollars does {n} have left?")
    return prompt, [s1, s2], r, (a, b, c)


def _share(rng: random.Random, n: str, item: str) -> tuple[str, list[str], int, tuple[int, ...]]:
    b, k = rng.randint(2, 9), rng.randint(2, 12)
    a, c = b * k, rng.randint(1, 99)
    s1, x = _line(a, "/", b)
    s2, r = _line(x, "+", c)
    prompt = (f"{n} shares {a} {item} equally among {b} friends. Then each friend gets {c} more {item}. "
              f"How many {item} does each friend have?")
    return prompt, [s1, s2], r, (a, b, c)


def _two_packs(rng: random.Random, n: str, item: str) -> tuple[str, list[str], int, tuple[int, ...]]:
    a, b, c, d = (rng.randint(2, 9) for _ in range(4))
    s1, x = _line(a, "*", b)
    s2, y = _line(c, "*", d)
    s3, z = _line(x, "+", y)
    e = rng.randint(1, z)
    s4, r = _line(z, "-", e)
    prompt = (f"{n} buys {a} packs with {b} {item} in each pack and {c} packs with {d} {item} in each pack. "
              f"Then {n} uses {e} {item}. How many {item} are left?")
    return prompt, [s1, s2, s3, s4], r, (a, b, c, d, e)


def _three_days(rng: random.Random, n: str, item: str) -> tuple[str, list[str], int, tuple[int, ...]]:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    c = rng.randint(1, a + b)
    d = rng.randint(1, 99)
    s1, x = _line(a, "+", b)
    s2, y = _line(x, "-", c)
    s3, r = _line(y, "+", d)
    prompt = (f"{n} has {a} {item}. On Monday {n} gets {b} more, on Tuesday {n} loses {c}, "
              f"and on Wednesday {n} gets {d} more. How many {item} does {n} have now?")
    return prompt, [s1, s2, s3], r, (a, b, c, d)


Template = Callable[[random.Random, str, str], tuple[str, list[str], int, tuple[int, ...]]]
TEMPLATES: tuple[Template, ...] = (_buy_bags, _give_find, _boxes_take, _earn_spend, _share, _two_packs, _three_days)


def generate_easy(rng: random.Random) -> Example:
    """A one-operation drill "What is a op b?" (training only: it teaches the worked lines)."""
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(1, 199), rng.randint(1, 99)
    elif op == "-":
        a = rng.randint(1, 299)
        b = rng.randint(0, a)
    elif op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 9)
    else:
        b, k = rng.randint(2, 9), rng.randint(2, 12)
        a = b * k
    line, result = _line(a, op, b)
    return Example(FAMILY, f"What is {a} {op} {b}?", with_answer([line], str(result)), str(result), f"one:{a}{op}{b}")


def generate(rng: random.Random) -> Example:
    """A 2-4 step word problem; the key is the template and its numbers (names don't matter)."""
    template = rng.choice(TEMPLATES)
    prompt, steps, result, numbers = template(rng, rng.choice(PEOPLE), rng.choice(ITEMS))
    key = f"{template.__name__}:{','.join(map(str, numbers))}"
    return Example(FAMILY, prompt, with_answer(steps, str(result)), str(result), key)
