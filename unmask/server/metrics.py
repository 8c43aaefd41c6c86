"""Prometheus metrics, served at `/metrics` in the text format. All names start with `unmask_`.

HTTP (recorded for every request, by middleware):
  unmask_http_requests_total{endpoint,status}            counter: requests by route and HTTP status
                                                          (499 = the client went away before the answer)
  unmask_http_request_duration_seconds{endpoint}         histogram: arrival to last byte sent

Generation (one engine request per choice; labelled by served model):
  unmask_requests_finished_total{model,finish_reason}    counter: stop | length | abort | error
  unmask_prompt_tokens_total{model}                      counter: prompt tokens processed
  unmask_generation_tokens_total{model}                  counter: finalized tokens generated
  unmask_e2e_request_latency_seconds{model}              histogram: HTTP arrival to the request's end
  unmask_time_to_first_token_seconds{model}              histogram: HTTP arrival to first finalized text
  unmask_request_tokens_per_step{model,cache,unmask}     histogram: tokens committed per denoising step,
                                                          averaged over one request (the parallelism a policy got)
  unmask_steps_per_block{model,cache,unmask}             histogram: denoising steps each finished block took

Engine steps (from the engine's step listener, on the engine thread):
  unmask_step_duration_seconds{model}                    histogram: wall time of one engine step
  unmask_step_tokens_committed{model}                    histogram: tokens committed in one step (whole batch)
  unmask_step_batch_size{model}                          histogram: sequences in one step
  unmask_step_active_tokens{model}                       histogram: positions recomputed in one step

State (read from the engine at scrape time):
  unmask_requests_running{model}                         gauge: requests being denoised
  unmask_requests_waiting{model}                         gauge: requests queued for admission
  unmask_requests_waiting_for{model,resource}            gauge: the waiting requests, under what the queue's head
                                                          waits for: kv_pages | sequence_slot | admission
  unmask_kv_pages_used{model}                            gauge: KV pool pages in use
  unmask_kv_pages_total{model}                           gauge: KV pool pages in all
  unmask_kv_cache_usage_ratio{model}                     gauge: used / total pages, 0..1
  unmask_engine_alive{model}                             gauge: 1 while the engine loop runs

Each app has its own `CollectorRegistry`, so several apps (tests) never clash.
prometheus_client's metric updates are thread-safe, which the step listener needs.
"""

from __future__ import annotations

from typing import Callable

from unmask.engine.client import EngineClient

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from unmask.engine.outputs import RequestOutput, StepStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STEP_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536)
_PER_STEP = (1, 1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 32)
# What the head of the waiting queue waits for (admission is strict first come, first served,
# so every waiting request waits for the same thing): free KV pages for its prompt + canvas, a
# free sequence slot (`max_num_seqs` are running), or only the engine's next step.
WAIT_RESOURCES = ("kv_pages", "sequence_slot", "admission")


class Metrics:
    """The server's metrics; `model` labels everything that depends on the served model."""

    def __init__(self, model: str):
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "unmask_http_requests", "HTTP requests by route and status.", ["endpoint", "status"], registry=r
        )
        self.http_duration = Histogram(
            "unmask_http_request_duration_seconds",
            "HTTP request arrival to last byte sent.",
            ["endpoint"],
            buckets=_LATENCY,
            registry=r,
        )
        self.finished = Counter(
            "unmask_requests_finished", "Engine requests by finish reason.", ["model", "finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("unmask_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens = Counter(
            "unmask_generation_tokens", "Finalized tokens generated.", ["model"], registry=r
        )
        self.e2e = Histogram(
            "unmask_e2e_request_latency_seconds",
            "HTTP arrival to the end of an engine request.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "unmask_time_to_first_token_seconds",
            "HTTP arrival to the first finalized text.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.tokens_per_step = Histogram(
            "unmask_request_tokens_per_step",
            "Tokens committed per denoising step, per request.",
            ["model", "cache", "unmask"],
            buckets=_PER_STEP,
            registry=r,
        )
        self.steps_per_block = Histogram(
            "unmask_steps_per_block",
            "Denoising steps each finished block took.",
            ["model", "cache", "unmask"],
            buckets=_COUNTS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "unmask_step_duration_seconds",
            "Wall time of one engine step.",
            ["model"],
            buckets=_STEP_SECONDS,
            registry=r,
        )
        self.step_committed = Histogram(
            "unmask_step_tokens_committed",
            "Tokens committed in one engine step.",
            ["model"],
            buckets=_COUNTS,
            registry=r,
        )
        self.step_batch = Histogram(
            "unmask_step_batch_size", "Sequences in one engine step.", ["model"], buckets=_COUNTS, registry=r
        )
        self.step_active = Histogram(
            "unmask_step_active_tokens",
            "Positions recomputed in one engine step.",
            ["model"],
            buckets=_TOKENS,
            registry=r,
        )
        # Series labelled by the model alone exist (at zero) from the start, so dashboards and
        # alerts see them before the first observation, as Prometheus advises for known labels.
        for metric in (self.prompt_tokens, self.generation_tokens, self.e2e, self.ttft, self.step_seconds,
                       self.step_committed, self.step_batch, self.step_active):
            metric.labels(model)
        self._gauges = {
            name: Gauge(name, doc, ["model"], registry=r).labels(model)
            for name, doc in (
                ("unmask_requests_running", "Requests being denoised."),
                ("unmask_requests_waiting", "Requests queued for admission."),
                ("unmask_kv_pages_used", "KV pool pages in use."),
                ("unmask_kv_pages_total", "KV pool pages in all."),
                ("unmask_kv_cache_usage_ratio", "Used / total KV pool pages."),
                ("unmask_engine_alive", "1 while the engine loop runs."),
            )
        }
        self._waiting_for = Gauge(
            "unmask_requests_waiting_for",
            "Waiting requests, by what the head of the queue waits for (kv_pages, sequence_slot, admission).",
            ["model", "resource"],
            registry=r,
        )

    # --- wiring -------------------------------------------------------------------------------
    def bind_engine(self, engine: EngineClient) -> None:
        """Read the state gauges from `engine` at scrape time and observe its steps."""

        def used() -> float:
            return engine.kv_pages_total - engine.kv_pages_free

        def ratio() -> float:
            total = engine.kv_pages_total
            return (total - engine.kv_pages_free) / total if total else 0.0

        readers: dict[str, Callable[[], float]] = {
            "unmask_requests_running": lambda: engine.num_running,
            "unmask_requests_waiting": lambda: engine.num_waiting,
            "unmask_kv_pages_used": used,
            "unmask_kv_pages_total": lambda: engine.kv_pages_total,
            "unmask_kv_cache_usage_ratio": ratio,
            "unmask_engine_alive": lambda: float(engine.is_alive),
        }
        for name, read in readers.items():
            self._gauges[name].set_function(_never_raises(read))
        for resource in WAIT_RESOURCES:
            waiting = _never_raises(lambda r=resource: engine.num_waiting if engine.waiting_for == r else 0)
            self._waiting_for.labels(self.model, resource).set_function(waiting)
        engine.add_step_listener(self.observe_step)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- observations -------------------------------------------------------------------------
    def observe_http(self, endpoint: str, status: int, seconds: float) -> None:
        self.http_requests.labels(endpoint, str(status)).inc()
        self.http_duration.labels(endpoint).observe(seconds)

    def observe_step(self, stats: StepStats) -> None:
        """Called on the engine thread after every step."""
        self.step_seconds.labels(self.model).observe(stats.step_seconds)
        self.step_committed.labels(self.model).observe(stats.tokens_committed)
        self.step_batch.labels(self.model).observe(stats.batch_size)
        self.step_active.labels(self.model).observe(stats.active_tokens)

    def observe_first_text(self, seconds: float) -> None:
        self.ttft.labels(self.model).observe(seconds)

    def observe_finished(self, out: RequestOutput, cache: str, unmask: str, seconds: float) -> None:
        """Record one engine request's end (every finish reason, aborts included)."""
        reason = out.finish_reason.value if out.finish_reason is not None else "unknown"
        self.finished.labels(self.model, reason).inc()
        self.prompt_tokens.labels(self.model).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(self.model).inc(len(out.token_ids))
        self.e2e.labels(self.model).observe(seconds)
        stats = out.stats
        if stats.forward_passes:
            self.tokens_per_step.labels(self.model, cache, unmask).observe(stats.tokens_per_step)
        for steps in stats.steps_per_block:
            self.steps_per_block.labels(self.model, cache, unmask).observe(steps)


def _never_raises(read: Callable[[], float]) -> Callable[[], float]:
    """A scrape must succeed even before the engine has started (or after it died)."""

    def safe() -> float:
        try:
            return float(read())
        except Exception:
            return 0.0

    return safe
