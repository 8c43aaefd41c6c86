"""Finalized text of a request, released in order and never revised.

Text is held back while it could still change: an incomplete UTF-8 sequence
at the end, or a tail that may be the start of a stop string. So the
concatenation of the released deltas always equals the final text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

_INCOMPLETE = "\ufffd"


@dataclass
class TextStream:
    tokenizer: PreTrainedTokenizerBase
    stop: list[str] = field(default_factory=list)
    released: str = ""
    stopped: bool = False
    _seen_tokens: int = -1  # finalized tokens at the last update; committed text only grows


    def update(self, token_ids: list[int], final: bool) -> str:
        """Given all finalized token ids so far, return the newly releasable text.

        Sets `stopped` when a stop string appears; the text then ends before it.
        """
        if not final and len(token_ids) == self._seen_tokens:
            return ""  # nothing new was finalized: skip the decode (it runs every step)
        self._seen_tokens = len(token_ids)
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = self._first_stop(text)
        if cut is not None:
            text, self.stopped, final = text[:cut], True, True
        if not final:
            text = text[: len(text) - self._unsafe_tail(text)]
        delta = text[len(self.released) :] if text.startswith(self.released) else ""
        self.released += delta
        return delta

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _unsafe_tail(self, text: str) -> int:
        """Length of the tail that may still change: a partial character or a stop-string prefix."""
        if text.endswith(_INCOMPLETE):
            return len(text) - len(text.rstrip(_INCOMPLETE))
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
