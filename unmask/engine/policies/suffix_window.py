"""The suffix window: masked blocks far after the current one are neither computed nor attended.

With w = `suffix_window` and blocks of B, a step of the block ending at e sees
positions [0, min(e + w * B, sequence end)): every query attends only to those
keys, and the cache policy recomputes none beyond them, its refreshes
included. Positions keep their absolute indices (the window cuts the end of
the sequence, never its middle), so RoPE places every token where it would be
without the window. Positions the window newly reaches when the block
advances are all still masked; each policy that reads the window recomputes
them at the step that first attends to them (its block-start refresh, or
every step for a masked position).

This is DPad's sliding window (suffix dropout, arXiv 2508.14148) with its
retention probability 1 inside the window and 0 beyond: the deterministic
case of its distance-decay dropout, which also drops a random subset inside
the window. The subset is left out since the paged attention reads keys
[0, key_length) as one range. FreeCache has the same window without the
per-block refresh (`freecache_window`).

Full attention only: in a block-causal model no query attends past its own
block, so there is nothing for a window to drop (`block` already stops the
keys at the block's end). Infill requests are refused, since the window would
drop the fixed text after the canvas.
"""

from __future__ import annotations

from unmask.engine.checks import ParamError
from unmask.engine.params import SamplingParams
from unmask.engine.sequence import Sequence


def suffix_window_end(seq: Sequence) -> int:
    """End of the positions a step sees: the window's last block's end, or the sequence's end without a window."""
    window = seq.params.suffix_window
    if window is None:
        return seq.length
    _, block_end = seq.block_bounds()
    return min(seq.length, block_end + window * seq.block_size)


def check_suffix_window(params: SamplingParams, block_causal: bool, fixed_text: bool) -> None:
    """Refuse (naming the field) a window on a block-causal model, or one that would drop fixed text."""
    if params.suffix_window is None:
        return
    if block_causal:
        raise ParamError(
            "suffix_window",
            "this model is block-causal: no position attends past its own block, so there is no suffix to drop "
            "(cache='block' already ends the keys at the block's end); send the request without suffix_window",
        )
    if fixed_text:
        raise ParamError(
            "suffix_window",
            "suffix_window drops the end of the canvas from attention, and with it the fixed text of an infill "
            "request; send the request without suffix_window",
        )
