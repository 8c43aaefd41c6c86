"""Infilling: fixed text around and between the spans the model writes.

A masked diffusion LM attends both ways, so it can write a gap between given
text (OpenAI's insert mode, `prompt` + `suffix`) or several gaps at once. An
`Infill` request lays the sequence out as

    prompt (first piece) | canvas | suffix (last piece)

where the canvas holds each span as mask tokens and the inner pieces as
already-written tokens. Written tokens are never rewritten (the engine commits
only masked positions), every position attends to every other, and the blocks
of the schedule cover the canvas (a block with nothing masked is skipped).
A cache or unmask policy whose rule assumes the canvas ends the sequence says
so (`infills = False`) and is refused for a request with fixed text.
"""

from __future__ import annotations

from dataclasses import dataclass

from unmask.engine.outputs import RequestOutput
from unmask.engine.params import ParamError, check_text

Piece = str | list[int]


@dataclass(frozen=True)
class Infill:
    """Text pieces with a span of `span_lengths[i]` tokens to write between piece i and piece i + 1.

    `pieces` has one more entry than `span_lengths`; a piece is text or token ids
    and may be empty except the first (a diffusion LM needs a prompt).
    """

    pieces: tuple[Piece, ...]
    span_lengths: tuple[int, ...]


@dataclass(frozen=True)
class CanvasLayout:
    """A tokenized `Infill`: the prompt, the canvas (masks at the spans), the suffix, and the spans' places."""

    prompt: list[int]
    canvas: list[int]
    suffix: list[int]
    spans: list[tuple[int, int]]  # [start, end) of each span, relative to the canvas

    @property
    def has_fixed_text(self) -> bool:
        """True when anything follows or interrupts the spans (every infill request but one gap at the end)."""
        return bool(self.suffix) or len(self.spans) > 1


def lay_out(infill: Infill, encode, mask_id: int) -> CanvasLayout:
    """Tokenize the pieces with `encode` (text -> ids) and place the spans; raise `ParamError` on bad input."""
    pieces, spans = infill.pieces, infill.span_lengths
    if len(spans) < 1 or len(pieces) != len(spans) + 1:
        raise ParamError("suffix", f"an infill needs one more piece than spans; got {len(pieces)} pieces, {len(spans)} spans")
    for i, n in enumerate(spans):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ParamError("max_tokens", f"span {i} must have at least 1 token, got {n!r}")
    ids = [_piece_ids(i, p, encode) for i, p in enumerate(pieces)]
    if any(mask_id in piece for piece in ids):
        raise ParamError("suffix", "the infill text contains the mask token")
    canvas: list[int] = []
    places = []
    for i, n in enumerate(spans):
        if i:
            canvas += ids[i]
        places.append((len(canvas), len(canvas) + n))
        canvas += [mask_id] * n
    return CanvasLayout(ids[0], canvas, ids[-1], places)


def _piece_ids(index: int, piece: Piece, encode) -> list[int]:
    name = "prompt" if index == 0 else "suffix"
    if isinstance(piece, str):
        check_text(name, piece)
        return list(encode(piece)) if piece else []
    return list(piece)


def cannot_infill(kind: str, method: str) -> ParamError:
    """The error for a request with fixed text whose `kind` policy `method` cannot keep it (`infills = False`)."""
    return ParamError(
        kind,
        f"{kind}={method!r} assumes the canvas ends the sequence and cannot infill (suffix); "
        f"choose another {kind} method",
    )


@dataclass
class InfillOutput:
    """The text written into each span (cut at its first end-of-text), and the request's output."""

    texts: list[str]
    output: RequestOutput


def span_texts(layout: CanvasLayout, canvas_ids: list[int], eos_id: int, decode) -> list[str]:
    """Each span's tokens from the finished canvas, cut before end-of-text, decoded with `decode`."""
    texts = []
    for start, end in layout.spans:
        ids = canvas_ids[start:end]
        texts.append(decode(ids[: ids.index(eos_id)] if eos_id in ids else ids))
    return texts
