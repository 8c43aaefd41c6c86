"""Prompt scores for `echo` + `logprobs` completions (lm-eval's loglikelihood requests).

A request's prompts are scored as one scoring group on the engine (estimator in
`engine.scoring`), before its choices are generated; a client that leaves
meanwhile closes the group's stream, which stops the scoring at once.
"""

from __future__ import annotations

from starlette.requests import Request

from unmask.engine.client import EngineClient
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
    engine: EngineClient, request: Request, base_id: str, prompts: list[str | list[int]], top_k: int, retry_after: int
) -> list[PromptScores]:
    """Every prompt's scores, in order.

    Raises `APIError` (a bad prompt, the engine down or shutting down, a failure while
    scoring) or `ClientDisconnected`; either way the scoring has stopped.
    """
    try:
        stream = await engine.add_scoring(f"{base_id}-score", prompts, top_k)
    except Exception as exc:
        raise from_engine_exception(exc, retry_after) from exc
    watcher = DisconnectWatcher(request, stream)
    scores: list[PromptScores | None] = [None] * len(prompts)
    try:
        async for index, prompt_scores in stream:
            scores[index] = prompt_scores
    except ClientDisconnected:
        raise
    except Exception as exc:  # the engine stopped serving the request (shutdown deadline) or scoring failed
        raise from_engine_exception(exc, retry_after_seconds=0) from exc
    finally:
        stream.close()
        watcher.stop()
    return scores  # type: ignore[return-value]
