"""Procedurally generated tasks with exact-match answers, for training and evaluating Unmask's model.

Families (see each module): `arithmetic` (word problems with worked steps),
`recall` (key-value lookup in a long prompt), `lists` (sort / reverse),
`count` (occurrences of a word). Every family generates `Example`s from a
`random.Random`; the train/test split is a stable hash of each problem's
canonical key, so held-out problems are never trained on.

    from training.tasks import FAMILIES, held_out_set, is_correct
    for ex in held_out_set("recall", 100):
        ok = is_correct(model_text, ex.answer)
"""

from __future__ import annotations

import itertools
import random
from typing import Iterator

from training.tasks import arithmetic, count, lists, recall
from training.tasks.base import (
    ANSWER_PREFIX,
    Example,
    Generator,
    Split,
    extract_answer,
    is_correct,
    split_of,
    stream,
)

FAMILIES: dict[str, Generator] = {
    arithmetic.FAMILY: arithmetic.generate,
    recall.FAMILY: recall.generate,
    lists.FAMILY: lists.generate,
    count.FAMILY: count.generate,
}
# Smaller instances of each family (one-operation sums, few facts, short lists), for
# training only: a tiny model finds the lookup/copy circuits far sooner on them, and
# they never overlap the benchmark's sizes, so no held-out problem can leak.
EASY: dict[str, Generator] = {
    arithmetic.FAMILY: arithmetic.generate_easy,
    recall.FAMILY: recall.generate_easy,
    lists.FAMILY: lists.generate_easy,
    count.FAMILY: count.generate_easy,
}

# The held-out evaluation set is drawn from this seed; training streams use others.
TEST_SEED = 0


def generate(family: str, rng: random.Random) -> Example:
    """One example of `family` (either split)."""
    try:
        return FAMILIES[family](rng)
    except KeyError:
        raise ValueError(f"unknown task family {family!r}; known: {', '.join(FAMILIES)}") from None


def held_out_set(family: str, n: int, seed: int = TEST_SEED) -> list[Example]:
    """The first `n` held-out problems of `family` (the same list on every call and machine)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; known: {', '.join(FAMILIES)}")
    return list(itertools.islice(stream(FAMILIES[family], "test", f"{family}:{seed}"), n))


def held_out_mix(families, n: int) -> list[Example]:
    """The first `n` held-out problems of each of `families`, interleaved so every batch mixes families."""
    sets = [held_out_set(family, n) for family in families]
    return [ex for group in zip(*sets) for ex in group]


def train_stream(seed: int | str, families: tuple[str, ...] | None = None, easy_fraction: float = 0.0) -> Iterator[Example]:
    """Endless training examples, families mixed uniformly, never a held-out problem.

    `easy_fraction` of the examples come from the families' smaller training-only variants.
    """
    names = families or tuple(FAMILIES)
    streams = {f: stream(FAMILIES[f], "train", f"{f}:{seed}") for f in names}
    easy = {f: stream(EASY[f], "train", f"easy:{f}:{seed}") for f in names}
    rng = random.Random(f"mix:{seed}")
    while True:
        family = rng.choice(names)
        yield next(easy[family] if rng.random() < easy_fraction else streams[family])


__all__ = [
    "ANSWER_PREFIX", "EASY", "Example", "FAMILIES", "Split", "extract_answer", "generate", "is_correct",
    "split_of", "held_out_mix", "held_out_set", "train_stream",
]
