"""Engine logprobs -> OpenAI's two wire formats: the legacy completions object and chat's `content` list.

Each token is shown as its own decoded text (special tokens included, e.g. the
end-of-text token that ended a completion). Where two alternatives decode to the
same text, the legacy format's dictionary keeps the likelier.
"""

from __future__ import annotations

from dataclasses import dataclass

from unmask.engine.outputs import RequestOutput, TokenLogprob
from unmask.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

Scored = tuple[int, TokenLogprob | None]  # a token id and its score (None: the first prompt token)
LOGPROB_FLOOR = -9999.0  # stands for -inf (impossible tokens), which JSON cannot carry; vLLM's convention


def finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def token_text(tokenizer, token_id: int) -> str:
    """How a token is shown: its text, special tokens included (`<|endoftext|>`)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _visible_length(tokenizer, token_id: int) -> int:
    """The characters a token adds to a choice's text (none for a special token, which the text leaves out)."""
    return len(tokenizer.decode([token_id], skip_special_tokens=True))


def generated_logprobs(out: RequestOutput, tokenizer, include_end: bool) -> list[TokenLogprob]:
    """The output's logprobs, one per token of `token_ids`; if a stop string cut the text, only the tokens it shows.

    With `include_end`, the end-of-text token that ended the request follows them, as vLLM reports it.
    """
    entries = out.logprobs or []
    lengths = [_visible_length(tokenizer, t) for t in out.token_ids]
    if sum(lengths) > len(out.text):  # cut by a stop string
        keep, covered = 0, 0
        while covered < len(out.text):
            covered += lengths[keep]
            keep += 1
        return entries[:keep]
    return entries if include_end else entries[: len(out.token_ids)]


@dataclass
class Segment:
    """Tokens whose text lies in a choice's text from `start` on: the echoed prompt (special tokens
    written out) or the generated tokens (special tokens left out of the text)."""

    start: int
    scored: list[Scored]
    text_has_special_tokens: bool


def completion_logprobs(tokenizer, segments: list[Segment]) -> CompletionLogprobs:
    """The legacy object over segments of tokens in text order (with echo: the prompt's, then the generated ones)."""
    result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for segment in segments:
        offset = segment.start
        for token_id, entry in segment.scored:
            text = token_text(tokenizer, token_id)
            result.tokens.append(text)
            result.text_offset.append(offset)
            result.token_logprobs.append(None if entry is None else finite(entry.logprob))
            result.top_logprobs.append(None if entry is None else _top_dict(tokenizer, entry))
            offset += len(text) if segment.text_has_special_tokens else _visible_length(tokenizer, token_id)
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
