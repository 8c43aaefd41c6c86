"""An independent dense reference of LLaDA2.x's decoding loop, for the tests: LLaDA2.0's threshold rule and
LLaDA2.1's token editing, over `block_reference.QwenReference`'s block-causal forward (no cache: every step
recomputes the sequence up to the current block's end).

Written from the LLaDA2.0 / LLaDA2.1 `generate` loops:

- blocks of the model's size counted from position 0, the first one holding the prompt's tail;
- per step, among the block's masked positions: those with confidence > threshold if there are at least
  k of them, else the k most confident, k = the even split of the whole block over `steps` at this step
  (1 when `steps` is None), at most the number masked;
- with `edit_threshold`: at the same step, every non-prompt written position of the block whose top token
  differs from the written one with probability > edit_threshold is rewritten; a step that starts with
  nothing masked counts as a post step, the block ends once a post step rewrites nothing or when
  `max_post_steps` post steps were taken (LLaDA2.1's `post_steps > max_post_steps` check);
- temperature 0: the top token and its probability (the mask token never proposed, as in the engine).
"""

from __future__ import annotations

from dataclasses import dataclass

from block_reference import QwenReference


@dataclass
class Generated:
    tokens: list[int]  # the first gen_length canvas tokens
    edits: int  # written tokens rewritten (token to token)
    passes: int  # forward passes


def even_split(total: int, steps: int) -> list[int]:
    base, extra = divmod(total, steps)
    return [base + 1 if i < extra else base for i in range(steps)]


def llada2_generate(
    model: QwenReference,
    prompt: list[int],
    gen_length: int,
    threshold: float,
    steps: int | None = None,
    edit_threshold: float | None = None,
    max_post_steps: int = 16,
) -> Generated:
    p, b, mask = len(prompt), model.block, model.mask_id
    total = -(-(p + gen_length) // b) * b
    x = prompt + [mask] * (total - p)
    schedule = even_split(b, steps) if steps is not None else [1] * b
    edits = passes = 0
    for block_start in range(p // b * b, total, b):
        block_end = block_start + b
        post_steps = 0
        for step in range(10**6):
            masked = [i for i in range(block_start, block_end) if x[i] == mask]
            if edit_threshold is None and not masked:
                break
            if not masked:
                post_steps += 1
            if post_steps > max_post_steps:
                break
            tokens, confidence = model._proposals(x, block_end)
            passes += 1
            chosen: set[int] = set()
            if masked:
                k = min(schedule[step] if step < len(schedule) else 1, len(masked))
                above = [i for i in masked if float(confidence[i]) > threshold]
                ranked = sorted(masked, key=lambda i: -float(confidence[i]))
                chosen = set(above) if len(above) >= k else set(ranked[:k])
            rewritten: set[int] = set()
            if edit_threshold is not None:
                written = [i for i in range(max(block_start, p), block_end) if x[i] != mask]
                rewritten = {i for i in written if float(confidence[i]) > edit_threshold and int(tokens[i]) != x[i]}
            for i in chosen | rewritten:
                x[i] = int(tokens[i])
            edits += len(rewritten)
            if edit_threshold is not None and not masked and not rewritten:
                break
    return Generated(x[p : p + gen_length], edits, passes)
