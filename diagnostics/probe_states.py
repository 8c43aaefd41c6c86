"""Where a diffusion checkpoint goes wrong: next-token accuracy in the states left-to-right decoding visits.

    python diagnostics/probe_states.py --n 24 [--model models/unmask-tiny]

For every held-out problem and every response position i, one full
bidirectional forward of [prompt, the true response before i, masks to the end
of the canvas] asks for token i: the state a left-to-right decoding step is
in when everything before it was right. It prints, per task family, the
per-token accuracy in those states, the share of problems whose every
token is right (an upper bound for left-to-right decoding), and beside
them the exact match of the reference sampler (`train_tiny.decoder`,
greedy) with blocks of 32 and of 1.

A diagnostic for training work, not a quality figure: quality is claimed from
benchmarks/accuracy.py alone. Low per-token accuracy here means the model has
not learned the decoding states; high accuracy here with low exact match means
the decoding order is what fails.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from training.tasks import FAMILIES, Example, held_out_set
from training.tasks.batches import chat_prompt, load_tokenizer
from training.train_tiny import decoder
from training.trainer import exact_match
from unmask.engine.models.checkpoint import load_weights
from unmask.engine.models.transformer import DiffusionTransformer
from unmask.server.model_path import resolve_model_dir


@dataclass
class StateAccuracy:
    tokens_right: int = 0
    tokens: int = 0
    problems_all_right: int = 0


@torch.no_grad()
def left_to_right_states(model: DiffusionTransformer, prompt: list[int], response: list[int],
                         gen_length: int) -> torch.Tensor:
    """Bool per response token: predicted right from [prompt, true prefix, masks] (one row per position)."""
    cfg = model.cfg
    rows = [prompt + response[:i] + [cfg.mask_token_id] * (gen_length - i) for i in range(len(response))]
    logits = model.forward_dense(torch.tensor(rows))
    at = torch.arange(len(response))
    return logits[at, len(prompt) + at].argmax(dim=-1) == torch.tensor(response)


def probe_family(model: DiffusionTransformer, tok, examples: list[Example], gen_length: int) -> StateAccuracy:
    acc = StateAccuracy()
    for ex in examples:
        response = tok.encode(ex.response).ids + [model.cfg.eos_token_id]  # the answer and its end-of-text
        right = left_to_right_states(model, tok.encode(chat_prompt(ex.prompt)).ids, response, gen_length)
        acc.tokens_right += int(right.sum())
        acc.tokens += len(response)
        acc.problems_all_right += bool(right.all())
    return acc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--n", type=int, default=24, help="held-out problems per family")
    p.add_argument("--gen", type=int, default=64, help="canvas length")
    a = p.parse_args(argv)
    a.model = resolve_model_dir(a.model)
    model = load_weights(a.model, torch.float32, torch.device("cpu")).eval()
    tok = load_tokenizer(a.model)
    print("| family | per-token (left-to-right states) | all tokens right | reference, block 32 | block 1 |")
    print("|---|---|---|---|---|")
    for family in FAMILIES:
        examples = held_out_set(family, a.n)
        acc = probe_family(model, tok, examples, a.gen)
        blocks = [exact_match((family,), a.n, a.n, decoder(model, tok, a.gen, b))[family] for b in (32, 1)]
        print(f"| {family} | {acc.tokens_right / acc.tokens:.3f} | {acc.problems_all_right / a.n:.3f} | "
              f"{blocks[0]:.3f} | {blocks[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
