"""Serving overhead: the same requests through the offline engine and through `unmask serve`, in one run.

    python benchmarks/serve_overhead.py --num-requests 32 --max-tokens 32 -- models/unmask-tiny --max-num-seqs 8
    python -m unmask.engine.models.make_random /tmp/llada-8b-dummy --preset llada-8b --config-only
    python benchmarks/serve_overhead.py --num-requests 128 --prompt-len 64,256 --max-tokens 128,256 \\
        --stream 0.5 --policy cache=dual -- /tmp/llada-8b-dummy --load-format dummy --device cuda --max-num-seqs 32

Everything after `--` is an `unmask serve` command line (model directory and engine
options). The run builds one list of requests (`serve_load`'s mix: prompt lengths,
`max_tokens`, policies, streaming; every prompt sent as token ids, so no tokenizer
stands between the two sides; `ignore_eos`, so every request writes exactly its
`max_tokens`), then:

1. starts that `unmask serve` as a subprocess and sends the requests from
   `--concurrency` clients back to back (default: the server's `--max-num-seqs`, so the
   batch is full whenever there is work), after an untimed warm-up;
2. stops the server (its memory is free again), then runs the same requests through
   the offline engine (`unmask.LLM`) with the engine configuration that command line
   gives the server, each with the `SamplingParams` the server would derive from its
   body, stepped on a worker thread as the server steps its engine, again after a warm-up;

and prints the generated tokens/s of both, each side's engine steps and time per step,
and the ratio server / offline. The offline engine admits every request at once and keeps
`max_num_seqs` running; the clients keep as many in flight, so both run nearly the same
batches (a finished request's slot stays empty until its client's next request arrives),
and what separates the figures is what the server adds: HTTP, JSON, the engine thread's
hand-off to the event loop, streaming. More steps on the server's side mean its batches
ran less full; slower steps, that something beside the engine took its time.
Both sides run torch with one intra-op thread unless `OMP_NUM_THREADS` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# One intra-op thread on both sides (the server inherits it), unless the caller chose: with
# OpenMP's spinning threads a CPU engine's speed depends on which thread drives it and on
# the machine's other load, which is no part of the server's cost. On a GPU the engine
# drives its host ops from one thread anyway.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import serve_load
from unmask.engine.config import EngineConfig
from unmask.engine.llm import LLM
from unmask.engine.models.loader import load_tokenizer
from unmask.engine.outputs import StepStats
from unmask.engine.params import SamplingParams
from unmask.server import cli, translate
from unmask.server.protocol import CompletionRequest

STEP_HISTOGRAM = "unmask_step_duration_seconds"  # the server's engine steps (unmask/server/metrics.py)
WARMUP_MAX_TOKENS = 32  # a warm-up request writes one block of the usual size
_SERVING_LINE = re.compile(r"Unmask is serving \S+ at (http://\S+)/v1")
_STOP_SECONDS = 60.0


@dataclass(frozen=True)
class Side:
    """One side's timed run: the tokens it generated, how long that took, and the engine steps it ran.

    The steps tell the two kinds of loss apart: more steps (the server's batches ran less
    full) or slower steps (something beside the engine took its time).
    """

    name: str
    generated_tokens: int
    seconds: float
    tokens_per_request: tuple[int, ...]
    steps: int
    step_seconds: float  # the steps' own time, summed

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.step_seconds / self.steps if self.steps else 0.0


# --- the requests ------------------------------------------------------------------------------------


def make_plans(args: argparse.Namespace, model_dir: str) -> list[serve_load.RequestPlan]:
    """`serve_load`'s completion mix with fixed lengths, each prompt tokenized as the engine tokenizes text."""
    mix = argparse.Namespace(
        seed=args.seed, policy=args.policy, endpoint="completions", prompts="words", num_requests=args.num_requests,
        prompt_len=args.prompt_len, max_tokens=args.max_tokens, stream=args.stream, ignore_eos=True,
    )
    tokenizer = load_tokenizer(model_dir)
    return [
        replace(plan, token_ids=tuple(tokenizer.encode(plan.text, add_special_tokens=False)))
        for plan in serve_load.make_plans(mix)
    ]


def warmup_plans(plans: list[serve_load.RequestPlan], count: int) -> list[serve_load.RequestPlan]:
    """The first `count` requests, each cut to one block: untimed, to compile and allocate before the clock starts."""
    return [replace(plan, max_tokens=min(plan.max_tokens, WARMUP_MAX_TOKENS)) for plan in plans[:count]]


def sampling_params(plan: serve_load.RequestPlan) -> SamplingParams:
    """The engine parameters the server derives from this request's body."""
    body = CompletionRequest.model_validate(plan.body(None))
    return translate.sampling_params(body, plan.max_tokens, choice=0)


# --- the offline engine -------------------------------------------------------------------------------


def run_offline(config: EngineConfig, plans: list[serve_load.RequestPlan], warmup: int) -> Side:
    """The plans through `LLM.generate`, built and stepped on a worker thread, as the server
    builds and steps its engine off the main thread."""
    options = {f.name: getattr(config, f.name) for f in fields(EngineConfig) if f.name != "model_dir"}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="offline-engine") as engine_thread:
        llm = engine_thread.submit(LLM, config.model_dir, **options).result()
        steps: list[StepStats] = []
        try:
            if warmup:
                engine_thread.submit(llm.generate, *_batch(warmup_plans(plans, warmup))).result()
            llm.engine.step_listeners.append(steps.append)
            start = time.perf_counter()
            outputs = engine_thread.submit(llm.generate, *_batch(plans)).result()
            seconds = time.perf_counter() - start
        finally:
            engine_thread.submit(llm.close).result()
    counts = tuple(len(out.token_ids) for out in outputs)
    return Side("offline", sum(counts), seconds, counts, len(steps), sum(step.step_seconds for step in steps))


def _batch(plans: list[serve_load.RequestPlan]) -> tuple[list[list[int]], list[SamplingParams]]:
    return [list(plan.token_ids or ()) for plan in plans], [sampling_params(plan) for plan in plans]


# --- the server ------------------------------------------------------------------------------------------


class ServerProcess:
    """`unmask serve` in a subprocess on a free loopback port; its output goes to files shown if it fails."""

    def __init__(self, serve_argv: list[str], start_timeout: float):
        self._logs = tempfile.TemporaryDirectory(prefix="serve-overhead-")
        self._stdout = open(Path(self._logs.name) / "stdout", "w+")
        self._stderr = open(Path(self._logs.name) / "stderr", "w+")
        command = [sys.executable, "-m", "unmask.server", "serve", *serve_argv, "--host", "127.0.0.1", "--port", "0"]
        self.process = subprocess.Popen(command, stdout=self._stdout, stderr=self._stderr, env=_child_env())
        self.url = self._wait_for_url(start_timeout)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _SERVING_LINE.search(Path(self._stdout.name).read_text())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                raise RuntimeError(f"`unmask serve` exited with status {self.process.returncode}:\n{self.log_tail()}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"`unmask serve` was not serving after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return Path(self._stderr.name).read_text()[-chars:]

    def stop(self) -> None:
        """SIGTERM (the server drains and exits), then a kill if it takes too long."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stdout.close()
        self._stderr.close()
        self._logs.cleanup()


def _child_env() -> dict[str, str]:
    """This process's environment, with the repository first on the path (the server runs this checkout)."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}


def run_server(
    serve_argv: list[str], plans: list[serve_load.RequestPlan], concurrency: int, warmup: int, args: argparse.Namespace
) -> Side:
    server = ServerProcess(serve_argv, args.start_timeout)
    try:
        return asyncio.run(_drive(server.url, plans, concurrency, warmup, args))
    except Exception:
        print(server.log_tail(), file=sys.stderr)
        raise
    finally:
        server.stop()


async def _drive(
    url: str, plans: list[serve_load.RequestPlan], concurrency: int, warmup: int, args: argparse.Namespace
) -> Side:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout, limits=limits) as client:
        if warmup:
            _check_all_ok(await serve_load.run_with_concurrency(client, warmup_plans(plans, warmup), concurrency,
                                                                float("inf"), None))
        steps_before = await _step_totals(client)
        start = time.perf_counter()
        measured = await serve_load.run_with_concurrency(client, plans, concurrency, float("inf"), None)
        seconds = time.perf_counter() - start
        steps_after = await _step_totals(client)
    _check_all_ok(measured)
    counts = {m.plan.index: m.output_tokens for m in measured}
    per_request = tuple(counts[plan.index] for plan in plans)
    steps, step_seconds = (after - before for after, before in zip(steps_after, steps_before))
    return Side("server", sum(per_request), seconds, per_request, int(steps), step_seconds)


async def _step_totals(client: httpx.AsyncClient) -> tuple[float, float]:
    """(steps run, their seconds summed) so far, from the server's step-duration histogram."""
    response = await client.get("/metrics")
    response.raise_for_status()
    totals = {"count": 0.0, "sum": 0.0}
    for family in text_string_to_metric_families(response.text):
        if family.name == STEP_HISTOGRAM:
            for sample in family.samples:
                kind = sample.name.removeprefix(STEP_HISTOGRAM + "_")
                if kind in totals:
                    totals[kind] += sample.value
    return totals["count"], totals["sum"]


def _check_all_ok(measured: list[serve_load.Measurement]) -> None:
    failed = [m for m in measured if not m.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(measured)} requests to the server failed, e.g. {failed[0].error}")


# --- report and command line ------------------------------------------------------------------------------


def render(server: Side, offline: Side, concurrency: int, config: EngineConfig) -> str:
    return "\n".join([
        f"serving overhead: {len(server.tokens_per_request)} requests, concurrency {concurrency}, "
        f"max_num_seqs {config.max_num_seqs}, model {config.model_dir}",
        *(f"{side.name:<8} {side.tokens_per_second:10.1f} generated tok/s ({side.generated_tokens} tokens in "
          f"{side.seconds:.2f} s; {side.steps} steps, {side.ms_per_step:.1f} ms each)" for side in (server, offline)),
        f"server / offline: {server.tokens_per_second / offline.tokens_per_second:.3f}",
    ])


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's options, the `unmask serve` command line after `--`)."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        usage="%(prog)s [options] -- [MODEL_DIR] [unmask serve options]",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--num-requests", type=int, default=64, help="requests in the timed run")
    p.add_argument("--concurrency", type=int, default=None, help="clients sending back to back (default: max_num_seqs)")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed requests (of at most {WARMUP_MAX_TOKENS} tokens) before each side's run "
                        "(default: the concurrency)")
    p.add_argument("--prompt-len", type=serve_load.parse_ints, default=[16, 64],
                   help="prompt lengths in words (~tokens) to mix")
    p.add_argument("--max-tokens", type=serve_load.parse_ints, default=[32, 64], help="max_tokens values to mix")
    p.add_argument("--stream", type=float, default=0.5, help="fraction of requests that stream (0 to 1)")
    p.add_argument("--policy", type=serve_load.parse_policy, action="append",
                   help="extension fields, e.g. cache=dual,unmask=threshold (repeat to mix)")
    p.add_argument("--seed", type=int, default=0, help="seeds the request mix")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a request counts as failed")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds the server may take to load its model")
    p.add_argument("--json", dest="json_path", default=None, help="also write both sides and the settings to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    own, serve_argv = split_argv(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(own)
    if not 0 <= args.stream <= 1:
        parser.error("--stream is a fraction in [0, 1]")
    serve_args = cli.build_parser().parse_args(["serve", *serve_argv])
    try:
        config = cli.engine_config(serve_args)
    except (FileNotFoundError, ValueError) as exc:  # no model directory, a bad engine option or denoising default
        parser.error(f"unmask serve options: {exc}")
    args.api_key = serve_args.api_key or os.environ.get(cli.API_KEY_ENV)
    concurrency = args.concurrency or config.max_num_seqs
    warmup = concurrency if args.warmup is None else args.warmup
    plans = make_plans(args, config.model_dir)
    server = run_server(serve_argv, plans, concurrency, warmup, args)
    offline = run_offline(config, plans, warmup)
    print(render(server, offline, concurrency, config))
    if server.tokens_per_request != offline.tokens_per_request:
        print("error: the server and the offline engine generated different numbers of tokens", file=sys.stderr)
        return 1
    if args.json_path:
        settings = {k: v for k, v in vars(args).items() if k != "api_key"}
        report = {"settings": settings, "serve_argv": serve_argv, "concurrency": concurrency,
                  "ratio": server.tokens_per_second / offline.tokens_per_second}
        for side in (server, offline):
            report[side.name] = {**asdict(side), "tokens_per_second": side.tokens_per_second}
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
