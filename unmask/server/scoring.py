"""Prompt scores for `echo` + `logprobs` completions (lm-eval's loglikelihood requests).

Each distinct prompt is scored once on the engine (`AsyncEngine.score`, estimator in
`engine.scoring`), before its choices are generated; a client that leaves meanwhile
stops the scoring at once.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from unmask.engine.outputs import PromptScores
from unmask.server.errors import INVALID_REQUEST, APIError, from_engine_exception
from unmask.server.generation import ClientDisconnected, DisconnectWatcher
from unmask.server.protocol import CompletionRequest


def check_scoring_request(body: CompletionRequest, max_tokens: int) -> bool:
    """Whether the request scores its prompts; `max_tokens` 0 (nothing generated) only does that."""
    scoring = body.echo and body.logprobs is not None
    if max_tokens == 0 and not scoring:
        raise APIError(
            400,
            "max_tokens 0 generates nothing: it is accepted only with echo and logprobs, to score the prompt.",
            INVALID_REQUEST,
            "max_tokens",
            "invalid_value",
        )
    return scoring


async def score_prompts(
    engine, request: Request, base_id: str, prompts: list[str | list[int]], top_k: int, retry_after: int
) -> list[PromptScores]:
    """Every prompt's scores, in order. Raises `APIError` (bad prompt, engine down) or `ClientDisconnected`."""
    watcher = DisconnectWatcher(request)
    tasks = [asyncio.ensure_future(engine.score(f"{base_id}-score-{i}", p, top_k)) for i, p in enumerate(prompts)]
    everything = asyncio.gather(*tasks)
    try:
        done, _ = await asyncio.wait({everything, watcher.task}, return_when=asyncio.FIRST_COMPLETED)
        if everything not in done:
            raise ClientDisconnected()
        return everything.result()
    except (ClientDisconnected, APIError):
        raise
    except Exception as exc:
        raise from_engine_exception(exc, retry_after) from exc
    finally:
        for task in tasks:
            task.cancel()  # a no-op for finished ones; the others abort their engine work
        everything.cancel()
        if everything.done() and not everything.cancelled():
            everything.exception()  # retrieved, so asyncio does not log it as never retrieved
        watcher.stop()
