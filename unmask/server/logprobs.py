"""Engine logprobs -> OpenAI's two wire formats: the legacy completions object and chat's `content` list.

Each token is shown as its own decoded text (special tokens included, e.g. the
end-of-text token that ended a completion). Where two alternatives decode to the
same text, the legacy format's dictionary keeps the likelier.
"""

from __future__ import annotations

from unmask.engine.outputs import RequestOutput, TokenLogprob
from unmask.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

Scored = tuple[int, TokenLogprob | None]  # a token id and its score (None: the first prompt token)
LOGPROB_FLOOR = -9999.0  # stands for -inf (impossible tokens), which JSON cannot carry; vLLM's convention


def finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def generated_logprobs(out: RequestOutput, tokenizer, include_end: bool) -> list[TokenLogprob]:
    """The output's logprobs trimmed to the tokens its text shows (a stop string may cut the last ones off).

    With `include_end`, the end-of-text token that ended the request follows them, as vLLM reports it.
    """
    entries = out.logprobs or []
    covered, keep = 0, 0
    for token_id in out.token_ids:
        if covered >= len(out.text):
            break
        covered += len(tokenizer.decode([token_id], skip_special_tokens=True))
        keep += 1
    if include_end and keep == len(out.token_ids):
        keep = len(entries)  # the end-of-text entry, if the request ended on one
    return entries[:keep]


def completion_logprobs(tokenizer, segments: list[tuple[int, list[Scored]]]) -> CompletionLogprobs:
    """The legacy object for segments of tokens in text order, each given with where its text starts
    in the choice's text (with echo: the prompt's tokens at 0, then the generated ones after the prompt's text)."""
    result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for offset, scored in segments:
        for token_id, entry in scored:
            text = token_text(tokenizer, token_id)
            result.tokens.append(text)
            result.text_offset.append(offset)
            result.token_logprobs.append(None if entry is None else finite(entry.logprob))
            result.top_logprobs.append(None if entry is None else _top_dict(tokenizer, entry))
            offset += len(text)
    return result


def _top_dict(tokenizer, entry: TokenLogprob) -> dict[str, float]:
    """The alternatives and the token itself (so a client can compare it with the best), by text."""
    top: dict[str, float] = {}
    for token_id, logprob in [*entry.top, (entry.token_id, entry.logprob)]:
        text = token_text(tokenizer, token_id)
        top[text] = max(finite(logprob), top.get(text, LOGPROB_FLOOR))
    return top


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **_top(tokenizer, entry.token_id, entry.logprob).model_dump(),
                top_logprobs=[_top(tokenizer, t, lp) for t, lp in entry.top],
            )
            for entry in entries
        ]
    )


def _top(tokenizer, token_id: int, logprob: float) -> TopLogprob:
    text = token_text(tokenizer, token_id)
    return TopLogprob(token=text, logprob=finite(logprob), bytes=list(text.encode("utf-8")))
