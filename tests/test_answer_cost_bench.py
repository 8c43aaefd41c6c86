"""The answer-cost benchmark (benchmarks/answer_cost.py): it runs on the CPU and prints the cost ratio of a long
canvas to a short one for the same answer, with and without the suffix window."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest

from benchmarks.answer_cost import main

# An 8-token answer (its end-of-text in the second block of 8) under canvases of 24 and 128 tokens: a window
# of one block past the second ends at the 24-token canvas's end, so both canvases decode the same positions.
ARGV = ["--arch", "tiny", "--device", "cpu", "--repeats", "1", "--prompt", "8", "--answer", "8",
        "--max-tokens", "24", "128", "--block", "8", "--tokens-per-step", "4", "--window", "1", "--cache", "none", "dual"]


@pytest.fixture(scope="module")
def bench() -> tuple[list, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        rows = main(ARGV)
    return rows, out.getvalue()


def test_it_prints_the_cost_ratio_of_each_cache_with_and_without_the_window(bench):
    rows, printed = bench
    assert [(r.cache, r.window) for r in rows] == [("none", None), ("none", 1), ("dual", None), ("dual", 1)]
    assert "time 128/24" in printed and "positions 128/24" in printed
    for row in rows:
        assert f"{row.ratio('positions'):.2f}x" in printed


def test_without_the_window_the_longer_canvas_costs_more_for_the_same_answer(bench):
    for row in bench[0]:
        if row.window is None:
            assert row.ratio("positions") > 1.5, row


def test_with_the_window_both_canvases_decode_the_same_positions_in_the_same_steps(bench):
    for row in bench[0]:
        if row.window is not None:
            assert row.costs[24].positions == row.costs[128].positions
            assert row.costs[24].steps == row.costs[128].steps


def test_an_answer_as_long_as_the_canvas_is_refused():
    with pytest.raises(SystemExit):
        main(["--arch", "tiny", "--device", "cpu", "--answer", "16", "--max-tokens", "16", "128"])
