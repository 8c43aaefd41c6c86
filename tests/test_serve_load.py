"""benchmarks/serve_load.py against a real server on loopback (the bundled model when the checkout has it)."""

from __future__ import annotations

import asyncio
import json

from server_fixtures import live_server  # noqa: F401  (a pytest fixture)

from benchmarks import serve_load, serve_overhead
from training.tasks import FAMILIES, held_out_set
from unmask.engine.models.loader import load_tokenizer


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


def test_the_overhead_run_sends_the_same_token_ids_through_the_server_and_the_offline_engine(
    bundled_model_dir, tmp_path, capsys
):
    """One run: the server subprocess and the offline engine each generate every request's max_tokens,
    and the report puts their tok/s side by side with the ratio."""
    out = tmp_path / "overhead.json"
    argv = ["--num-requests", "6", "--prompt-len", "4,8", "--max-tokens", "8,16", "--stream", "0.5",
            "--json", str(out), "--", str(bundled_model_dir), "--max-num-seqs", "3", "--dtype", "float32"]
    assert serve_overhead.main(argv) == 0
    report = json.loads(out.read_text())
    plans = serve_overhead.make_plans(serve_overhead.build_parser().parse_args(argv[: argv.index("--")]),
                                      str(bundled_model_dir))
    expected = [plan.max_tokens for plan in plans]
    assert report["server"]["tokens_per_request"] == report["offline"]["tokens_per_request"] == expected
    assert report["concurrency"] == 3
    for side in ("server", "offline"):  # every request took its max_tokens steps at least: one token per step
        assert report[side]["steps"] >= max(expected) and report[side]["step_seconds"] > 0
    printed = capsys.readouterr().out
    assert f"server / offline: {report['ratio']:.3f}" in printed
    assert report["ratio"] == report["server"]["tokens_per_second"] / report["offline"]["tokens_per_second"]


def test_overhead_plans_carry_the_prompt_as_the_engine_tokenizes_it(bundled_model_dir):
    args = serve_overhead.build_parser().parse_args(["--num-requests", "4"])
    plans = serve_overhead.make_plans(args, str(bundled_model_dir))
    tokenizer = load_tokenizer(str(bundled_model_dir))
    for plan in plans:
        assert plan.ignore_eos and plan.token_ids
        assert plan.body(None)["prompt"] == tokenizer.encode(plan.text, add_special_tokens=False)


def test_overhead_options_split_at_the_double_dash_into_the_scripts_and_the_servers():
    own, serve = serve_overhead.split_argv(["--num-requests", "4", "--", "models/unmask-tiny", "--max-num-seqs", "8"])
    assert own == ["--num-requests", "4"] and serve == ["models/unmask-tiny", "--max-num-seqs", "8"]
