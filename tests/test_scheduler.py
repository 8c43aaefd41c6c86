"""The scheduler: admission against free pages, the step's plan under the token budget, round-robin, finish."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from unmask.engine.errors import QueueFullError
from unmask.engine.pages import PageAllocator
from unmask.engine.params import EngineDefaults, ParamError, SamplingParams
from unmask.engine.scheduler import Scheduler, SchedulerLimits
from unmask.engine.sequence import Sequence, SequenceStatus


@dataclass
class Work:
    seq: Sequence
    cost: int


def sequence(name: str, max_tokens: int = 12, prompt_len: int = 4) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, block_length=4).resolve(EngineDefaults())
    return Sequence(name, list(range(1, prompt_len + 1)), params, mask_id=99, eos_id=98, seed=0)


def scheduler(pages: int = 8, max_seqs: int = 4, budget: int = 100, max_waiting: int = 8, cost: int = 10) -> Scheduler:
    """A scheduler over pages of 4 slots whose planner gives every sequence the same cost."""
    return Scheduler(PageAllocator(pages, 4), SchedulerLimits(max_seqs, budget, max_waiting), lambda s: Work(s, cost))


def names(plan) -> list[str]:
    return [w.seq.request_id for w in plan]


def test_schedule_admits_waiting_sequences_and_gives_them_their_pages():
    s = scheduler()
    a = sequence("a")
    s.add(a)
    assert names(s.schedule()) == ["a"]
    assert a.status is SequenceStatus.RUNNING and len(a.pages) == 4  # 16 tokens in pages of 4
    assert s.pages.num_free == 4


def test_admission_is_first_come_first_served_and_waits_for_pages():
    s = scheduler(pages=8)
    big, small = sequence("big", max_tokens=28), sequence("small", max_tokens=4)  # 8 pages, then 2
    s.add(sequence("first"))  # 4 pages
    s.add(big)
    s.add(small)
    assert names(s.schedule()) == ["first"]  # small fits, but never overtakes big
    assert list(s.waiting) == [big, small]


def test_admission_stops_at_max_num_seqs():
    s = scheduler(pages=64, max_seqs=2)
    for name in "abc":
        s.add(sequence(name))
    assert names(s.schedule()) == ["a", "b"]
    assert len(s.waiting) == 1


def test_the_plan_holds_each_sequences_work_from_the_planner():
    s = Scheduler(PageAllocator(64, 4), SchedulerLimits(4, 100, 8), lambda seq: Work(seq, seq.prompt_len))
    s.add(sequence("a", prompt_len=3))
    s.add(sequence("b", prompt_len=5))
    assert [(w.seq.request_id, w.cost) for w in s.schedule()] == [("a", 3), ("b", 5)]


def test_the_token_budget_leaves_out_what_does_not_fit_but_never_plans_nothing():
    s = scheduler(pages=64, budget=25, cost=10)
    for name in "abc":
        s.add(sequence(name))
    assert names(s.schedule()) == ["a", "b"]
    alone = scheduler(pages=64, budget=5, cost=10)
    alone.add(sequence("a"))
    assert names(alone.schedule()) == ["a"]  # over budget on its own, still run


def test_the_least_recently_run_go_first_earlier_arrivals_breaking_ties():
    s = scheduler(pages=64, budget=25, cost=10)
    for name in "abc":
        s.add(sequence(name))
    assert names(s.schedule()) == ["a", "b"]
    assert names(s.schedule()) == ["c", "a"]  # c never ran; a ran before b did
    assert names(s.schedule()) == ["b", "a"]  # b last ran at step 1; a and c at step 2, a arrived first


def test_finish_returns_the_pages_and_drops_the_sequence():
    s = scheduler()
    a = sequence("a")
    s.add(a)
    s.schedule()
    s.finish(a)
    assert s.pages.num_free == s.pages.num_pages and a.is_finished and not s.has_work
    assert s.find("a") is None


def test_finish_of_a_waiting_sequence_drops_it_from_the_queue():
    s = scheduler(pages=4)
    s.add(sequence("a"))
    b = sequence("b")
    s.add(b)
    s.schedule()
    s.finish(b)
    assert list(s.waiting) == [] and s.pages.num_free == 0


def test_a_sequence_larger_than_the_pool_is_refused():
    s = scheduler(pages=2)
    with pytest.raises(ParamError) as err:
        s.add(sequence("a"))
    assert err.value.param == "max_tokens"


def test_a_full_queue_refuses_more():
    s = scheduler(max_waiting=1)
    s.add(sequence("a"))
    with pytest.raises(QueueFullError):
        s.add(sequence("b"))
