"""benchmarks/serve_load.py against a real server on loopback (the bundled model when the checkout has it)."""

from __future__ import annotations

import json

from server_fixtures import live_server  # noqa: F401  (a pytest fixture)

from benchmarks import serve_load
from benchmarks.tasks import FAMILIES, held_out_set


def test_task_prompts_are_held_out_problems_with_the_families_in_turn():
    args = serve_load.build_parser().parse_args(["--prompts", "tasks", "--num-requests", "8", "--endpoint", "chat"])
    plans = serve_load.make_plans(args)
    expected = [held_out_set(family, 2)[i].prompt for i in range(2) for family in FAMILIES]
    assert [p.text for p in plans] == expected
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
