"""Online serving load: drive a running Unmask server and report throughput, TTFT, TPOT and latency.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --rate 4 --num-requests 200
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --concurrency 32 --duration 60 --stream 0.5 \\
        --prompt-len 16,64,256 --max-tokens 32,64 --policy cache=dual,unmask=threshold,threshold=0.9 --policy cache=none

Requests arrive as a Poisson process (`--rate`, requests per second) or from a fixed
number of clients each sending its next request when the last one ends
(`--concurrency`). The run stops after `--num-requests` requests or `--duration`
seconds, whichever comes first; requests in flight then are awaited.

Each request picks (from its own seeded random stream, so a run is reproducible) a
prompt length, a `max_tokens`, a policy (sent as the body's extension fields) and
whether it streams. Prompts are words of a fixed vocabulary, about one token each.
With `--ignore-eos` every request generates exactly its `max_tokens`, whatever the model
writes: fixed lengths, as a load test of a server with random weights
(`unmask serve DIR --load-format dummy`) wants.

Reported, over the successful requests:
- throughput: completed requests/s and generated tokens/s (usage.completion_tokens) over the wall time;
- TTFT (streams only): request sent to the first chunk carrying text;
- TPOT (streams with >1 token): (end-to-end - TTFT) / (tokens - 1). A diffusion model
  finalizes text block by block, so this is an average over bursts, not a steady rate;
- end-to-end latency: request sent to the last byte;
each as mean, p50, p90, p99; and the failures, by HTTP status and error code or by exception.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from training.tasks import FAMILIES, Example, held_out_mix, is_correct
from training.tasks.batches import chat_prompt

DEFAULT_CONCURRENCY = 8
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven small birds sing about rivers mountains "
    "numbers apples and the answer is forty two because every block of text unmasks in parallel"
).split()


# --- what to send -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestPlan:
    """One request of the run."""

    index: int
    text: str  # the user's text: random words, or a held-out task problem (`--prompts tasks`)
    max_tokens: int
    stream: bool
    policy: dict
    chat: bool
    ignore_eos: bool = False
    answer: str | None = None  # the expected answer of a task problem (`--prompts tasks`)
    token_ids: tuple[int, ...] | None = None  # the prompt as token ids (completions only), sent instead of the text

    def body(self, model: str | None) -> dict:
        body: dict = {"max_tokens": self.max_tokens, "temperature": 0, "stream": self.stream, **self.policy}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if model:
            body["model"] = model
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.text}]
        else:
            body["prompt"] = self.text if self.token_ids is None else list(self.token_ids)
        return body


def parse_ints(text: str) -> list[int]:
    """'16,64,256' -> [16, 64, 256]; each request picks one uniformly."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def parse_policy(text: str) -> dict:
    """'cache=dual,unmask=threshold,threshold=0.9' -> the body's extension fields (numbers as numbers)."""
    policy = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value pairs, got {item!r}")
        policy[key] = _number_or_text(value)
    return policy


def _number_or_text(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def random_words(index: int, words: int) -> str:
    rng = random.Random(index)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def task_problems(n: int) -> list[Example]:
    """`n` held-out problems of the bundled model's tasks, families in turn."""
    return held_out_mix(FAMILIES, -(-n // len(FAMILIES)))[:n]


def make_plans(args: argparse.Namespace) -> list[RequestPlan]:
    rng = random.Random(args.seed)
    policies = args.policy or [{}]
    chat = args.endpoint == "chat"
    tasks = task_problems(args.num_requests) if args.prompts == "tasks" else None

    def text(i: int) -> str:
        if tasks is None:
            return random_words(i, rng.choice(args.prompt_len))
        return tasks[i].prompt if chat else chat_prompt(tasks[i].prompt)  # completions get the chat template

    return [
        RequestPlan(
            index=i,
            text=text(i),
            max_tokens=rng.choice(args.max_tokens),
            stream=rng.random() < args.stream,
            policy=rng.choice(policies),
            chat=chat,
            ignore_eos=args.ignore_eos,
            answer=tasks[i].answer if tasks else None,
        )
        for i in range(args.num_requests)
    ]


# --- sending and timing -----------------------------------------------------------------------------


@dataclass
class Measurement:
    """What one request got, and when."""

    plan: RequestPlan
    ok: bool = False
    error: str | None = None
    output_tokens: int = 0
    text: str = ""
    ttft: float | None = None
    e2e: float | None = None

    @property
    def correct(self) -> bool | None:
        """For a task problem, whether the answer text is right (exact match); None otherwise."""
        return None if self.plan.answer is None else is_correct(self.text, self.plan.answer)

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def send(client: httpx.AsyncClient, plan: RequestPlan, model: str | None) -> Measurement:
    """Send one request and time it; never raises (failures are recorded)."""
    m = Measurement(plan)
    path = "/v1/chat/completions" if plan.chat else "/v1/completions"
    start = time.perf_counter()
    try:
        if plan.stream:
            await _stream(client, path, plan, model, m, start)
        else:
            response = await client.post(path, json=plan.body(model))
            _check(response)
            reply = response.json()
            m.output_tokens = reply["usage"]["completion_tokens"]
            m.text = "".join(_choice_text(c) for c in reply["choices"])
        m.e2e = time.perf_counter() - start
        m.ok = m.error is None
    except _HTTPFailure as failure:
        m.error = str(failure)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        m.error = type(exc).__name__
    return m


class _HTTPFailure(Exception):
    """An error answer: 'HTTP <status> <code>'."""


def _check(response: httpx.Response) -> None:
    if response.status_code != 200:
        try:
            code = response.json()["error"].get("code")
        except Exception:
            code = None
        raise _HTTPFailure(f"HTTP {response.status_code} {code or ''}".strip())


async def _stream(
    client: httpx.AsyncClient, path: str, plan: RequestPlan, model: str | None, m: Measurement, start: float
) -> None:
    async with client.stream("POST", path, json=plan.body(model)) as response:
        if response.status_code != 200:
            await response.aread()
            _check(response)
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                m.error = f"stream error {event['error'].get('code') or ''}".strip()
                continue
            delta = "".join(_choice_text(c) for c in event.get("choices", []))
            if m.ttft is None and delta:
                m.ttft = time.perf_counter() - start
            m.text += delta
            if event.get("usage"):
                m.output_tokens = event["usage"]["completion_tokens"]


def _choice_text(choice: dict) -> str:
    """The text of a completion or chat choice, whole or a stream delta."""
    content = choice.get("text") or (choice.get("message") or choice.get("delta") or {}).get("content")
    return content or ""


# --- arrival patterns --------------------------------------------------------------------------------


async def run_at_rate(
    client: httpx.AsyncClient, plans: list[RequestPlan], rate: float, duration: float, model: str | None, seed: int
) -> list[Measurement]:
    """Poisson arrivals at `rate` requests/s."""
    rng = random.Random(seed + 1)
    tasks, start, next_at = [], time.perf_counter(), 0.0
    for plan in plans:
        delay = next_at - (time.perf_counter() - start)
        if next_at > duration:
            break
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(send(client, plan, model)))
        next_at += rng.expovariate(rate)
    return list(await asyncio.gather(*tasks))


async def run_with_concurrency(
    client: httpx.AsyncClient, plans: list[RequestPlan], concurrency: int, duration: float, model: str | None
) -> list[Measurement]:
    """`concurrency` clients, each sending its next request when the previous one ends."""
    pending = iter(plans)
    deadline = time.perf_counter() + duration
    results: list[Measurement] = []

    async def worker() -> None:
        for plan in pending:
            if time.perf_counter() >= deadline:
                return
            results.append(await send(client, plan, model))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


# --- report -----------------------------------------------------------------------------------------------


@dataclass
class Summary:
    requests: int
    succeeded: int
    wall_seconds: float
    requests_per_second: float
    generated_tokens: int
    generated_tokens_per_second: float
    ttft: dict = field(default_factory=dict)
    tpot: dict = field(default_factory=dict)
    e2e: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    correct: int | None = None  # task problems answered right, of those that succeeded (`--prompts tasks`)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def distribution(values: list[float]) -> dict:
    if not values:
        return {}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


def summarize(measurements: list[Measurement], wall: float) -> Summary:
    ok = [m for m in measurements if m.ok]
    tokens = sum(m.output_tokens for m in ok)
    return Summary(
        requests=len(measurements),
        succeeded=len(ok),
        wall_seconds=wall,
        requests_per_second=len(ok) / wall if wall else 0.0,
        generated_tokens=tokens,
        generated_tokens_per_second=tokens / wall if wall else 0.0,
        ttft=distribution([m.ttft for m in ok if m.ttft is not None]),
        tpot=distribution([m.tpot for m in ok if m.tpot is not None]),
        e2e=distribution([m.e2e for m in ok if m.e2e is not None]),
        errors=dict(Counter(m.error for m in measurements if m.error)),
        correct=sum(bool(m.correct) for m in ok) if any(m.plan.answer is not None for m in measurements) else None,
    )


def render(summary: Summary, args: argparse.Namespace) -> str:
    mode = f"rate {args.rate}/s (Poisson)" if args.rate else f"concurrency {args.concurrency or DEFAULT_CONCURRENCY}"
    lines = [
        f"load: {mode}, {summary.requests} requests in {summary.wall_seconds:.1f} s "
        f"({summary.succeeded} ok, {summary.requests - summary.succeeded} failed)",
        f"throughput: {summary.requests_per_second:.2f} req/s, "
        f"{summary.generated_tokens_per_second:.1f} generated tok/s ({summary.generated_tokens} tokens)",
        f"{'':<22}{'n':>6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, dist, unit in (
        ("TTFT (ms)", summary.ttft, 1e3),
        ("TPOT (ms/token)", summary.tpot, 1e3),
        ("end-to-end (s)", summary.e2e, 1.0),
    ):
        if dist:
            cells = "".join(f"{dist[k] * unit:>10.2f}" for k in ("mean", "p50", "p90", "p99"))
            lines.append(f"{name:<22}{dist['n']:>6}{cells}")
        else:
            lines.append(f"{name:<22}{0:>6}{'-':>10}")
    errors = ", ".join(f"{kind}: {count}" for kind, count in sorted(summary.errors.items())) or "none"
    lines.append(f"errors: {errors}")
    if summary.correct is not None:
        lines.append(f"answers: {summary.correct} of {summary.succeeded} correct (exact match)")
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--api-key", default=None, help="Bearer token, if the server wants one")
    p.add_argument("--model", default=None, help="model name to send (default: the server's)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests per second")
    pace.add_argument(
        "--concurrency", type=int, default=None, help=f"clients sending back to back (default {DEFAULT_CONCURRENCY})"
    )
    p.add_argument("--num-requests", type=int, default=100, help="stop after this many requests")
    p.add_argument("--duration", type=float, default=math.inf, help="stop sending new requests after this many seconds")
    p.add_argument("--prompts", choices=("words", "tasks"), default="words",
                   help="random words (--prompt-len), or held-out problems of the bundled model's tasks, "
                        "which it answers with text")
    p.add_argument("--prompt-len", type=parse_ints, default=[16, 64], help="prompt lengths in words (~tokens) to mix")
    p.add_argument("--max-tokens", type=parse_ints, default=[32, 64], help="max_tokens values to mix")
    p.add_argument("--stream", type=float, default=0.0, help="fraction of requests that stream (0 to 1)")
    p.add_argument(
        "--policy",
        type=parse_policy,
        action="append",
        help="extension fields, e.g. cache=dual,unmask=threshold (repeat to mix)",
    )
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos: every request generates exactly its max_tokens (fixed lengths; random weights)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a request counts as failed")
    p.add_argument("--seed", type=int, default=0, help="seeds the request mix and the arrival times")
    p.add_argument("--json", dest="json_path", default=None, help="also write the summary and settings to this file")
    return p


async def main_async(args: argparse.Namespace) -> Summary:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    plans = make_plans(args)
    concurrency = args.concurrency or DEFAULT_CONCURRENCY
    limits = httpx.Limits(max_connections=None if args.rate else concurrency, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        start = time.perf_counter()
        if args.rate:
            measurements = await run_at_rate(client, plans, args.rate, args.duration, args.model, args.seed)
        else:
            measurements = await run_with_concurrency(client, plans, concurrency, args.duration, args.model)
        wall = time.perf_counter() - start
    return summarize(measurements, wall)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.stream <= 1:
        build_parser().error("--stream is a fraction in [0, 1]")
    summary = asyncio.run(main_async(args))
    print(render(summary, args))
    if args.json_path:
        settings = {k: v for k, v in vars(args).items() if k != "api_key"}
        settings["duration"] = None if math.isinf(args.duration) else args.duration
        with open(args.json_path, "w") as f:
            json.dump({"settings": settings, "summary": asdict(summary)}, f, indent=2)
    return 0 if summary.succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
