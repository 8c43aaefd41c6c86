"""benchmarks/serve_load.py against a real server on loopback (the bundled model when the checkout has it)."""

from __future__ import annotations

import asyncio
import json

from server_fixtures import live_server  # noqa: F401  (a pytest fixture)

from benchmarks import serve_load
from training.tasks import FAMILIES, held_out_set


def test_task_prompts_are_held_out_problems_with_the_families_in_turn():
    args = serve_load.build_parser().parse_args(["--prompts", "tasks", "--num-requests", "8", "--endpoint", "chat"])
    plans = serve_load.make_plans(args)
    problems = [held_out_set(family, 2)[i] for i in range(2) for family in FAMILIES]
    expected = [ex.prompt for ex in problems]
    assert [p.text for p in plans] == expected
    assert [p.answer for p in plans] == [ex.answer for ex in problems]
    assert [p.body(None)["messages"][0]["content"] for p in plans] == expected
    assert serve_load.make_plans(args) == plans  # the mix is seeded


def test_a_mixed_run_against_the_server_counts_every_request_and_times_the_streams(live_server, tmp_path):
    out = tmp_path / "load.json"
    argv = ["--url", live_server.base_url, "--endpoint", "chat", "--prompts", "tasks", "--num-requests", "8",
            "--concurrency", "4", "--max-tokens", "32", "--stream", "0.5", "--policy", "cache=dual,unmask=threshold",
            "--policy", "cache=none", "--json", str(out)]
    if live_server.api_key:
        argv += ["--api-key", live_server.api_key]
    assert serve_load.main(argv) == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["requests"] == summary["succeeded"] == 8 and not summary["errors"]
    assert summary["generated_tokens"] > 0 and summary["e2e"]["n"] == 8
    assert summary["ttft"]["n"] >= 1  # streamed answers with text get a time to first token
    assert 0 <= summary["correct"] <= 8


def test_answers_are_checked_the_same_streamed_or_not(live_server):
    """Greedy decoding gives the same text either way, so the same problems count as answered right."""
    def correct(stream: str, endpoint: str) -> int:
        argv = ["--url", live_server.base_url, "--endpoint", endpoint, "--prompts", "tasks", "--num-requests", "8",
                "--concurrency", "4", "--max-tokens", "64", "--stream", stream, "--policy", "cache=dual,unmask=threshold"]
        if live_server.api_key:
            argv += ["--api-key", live_server.api_key]
        args = serve_load.build_parser().parse_args(argv)
        summary = asyncio.run(serve_load.main_async(args))
        assert summary.succeeded == 8
        return summary.correct

    counts = {correct(stream, endpoint) for stream in ("0", "1") for endpoint in ("chat", "completions")}
    assert len(counts) == 1 and counts.pop() >= 1  # the bundled model sorts lists right


def test_a_choice_is_read_whole_or_as_a_stream_delta():
    plan = serve_load.RequestPlan(0, "Reverse this list: a, b", 8, False, {}, True, answer="b, a")
    reply = serve_load.Measurement(plan, text=serve_load._choice_text({"message": {"content": "Answer: b, a"}}))
    assert reply.correct
    deltas = [{"delta": {"content": "Answer: b"}}, {"delta": {}}, {"text": ", a"}]
    assert serve_load.Measurement(plan, text="".join(map(serve_load._choice_text, deltas))).correct
    assert not serve_load.Measurement(plan, text="Answer: a, b").correct
    assert serve_load.Measurement(serve_load.RequestPlan(1, "words", 8, False, {}, True), text="x").correct is None
