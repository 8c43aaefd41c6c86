"""Train the small autoregressive guide model (a transformers Llama) on the same tasks and tokenizer.

    python training/train_guide.py --out models/unmask-tiny-guide --minutes 2 --device cuda

Guided diffusion lets a small causal LM check the diffusion model's proposals
for the current block left to right. So the guide sees exactly the diffusion
model's training sequences (chat prompt + response + end-of-text padding) and
learns next-token prediction on the canvas only; predicting end-of-text after
end-of-text lets it agree with the padding too. Saved with `save_pretrained`
(safetensors, bf16) next to the shared tokenizer files.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from training.tasks import Example
from training.tasks.batches import EOS, PackedBatch, chat_prompt, load_tokenizer
from training.train_tiny import canvas_text
from training import trainer as training
from training.trainer import RunConfig

IGNORE = -100  # transformers' label value for "no loss here"


@dataclass
class GuideConfig(RunConfig):
    """`RunConfig` plus the guide's shape (and its own learning rate and seed)."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 704
    lr: float = 2e-3
    seed: int = 1


def build_model(cfg: GuideConfig, tok: Tokenizer) -> LlamaForCausalLM:
    """A small Llama causal LM over the shared tokenizer (embedding padded to a multiple of 64)."""
    eos = tok.token_to_id(EOS)
    config = LlamaConfig(
        vocab_size=-(-tok.get_vocab_size() // 64) * 64,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return LlamaForCausalLM(config)


def labels_for(batch: PackedBatch) -> torch.Tensor:
    """Next-token targets on the canvas only (transformers shifts labels by one itself)."""
    return torch.where(batch.canvas_pos >= 0, batch.input_ids, torch.full_like(batch.input_ids, IGNORE))


def guide_loss(model: LlamaForCausalLM, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on the canvas, and the next-token accuracy on response tokens.

    Packed rows carry no per-example mask: as in usual causal-LM packing, an
    example may see the ones before it, which is harmless since each ends in
    end-of-text padding and the model learns to ignore what precedes a prompt.
    """
    out = model(input_ids=batch.input_ids, labels=labels_for(batch))
    hits = out.logits[:, :-1].argmax(dim=-1) == batch.input_ids[:, 1:]
    answer = batch.answer[:, 1:]
    return out.loss, (hits & answer).sum() / answer.sum().clamp_min(1)


def train(cfg: GuideConfig) -> tuple[LlamaForCausalLM, dict]:
    """Train for the configured budget; returns the model (fp32) and a summary of the run."""
    device, data = training.start(cfg)
    model = build_model(cfg, load_tokenizer(cfg.tokenizer)).to(device).train()
    print(f"guide: {training.count_params(model) / 1e6:.2f}M params", flush=True)
    summary = training.fit(model, cfg, device, data, lambda batch: guide_loss(model, batch))
    return model.eval(), summary


@torch.no_grad()
def greedy_generate(model: LlamaForCausalLM, prompts: list[list[int]], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (left-padded, so generation appends in step)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), eos_id, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, device=device)
        attn[i, width - len(p) :] = 1
    with training.autocast(device):
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos_id, pad_token_id=eos_id)
    return [row[width:].tolist() for row in out]


def decoder(model: LlamaForCausalLM, tok: Tokenizer, gen_length: int):
    """Held-out examples -> response texts, by greedy autoregressive decoding."""
    eos = tok.token_to_id(EOS)

    def decode(examples: list[Example]) -> list[str]:
        outs = greedy_generate(model, [tok.encode(chat_prompt(ex.prompt)).ids for ex in examples], gen_length, eos)
        return [canvas_text(tok, o, eos) for o in outs]

    return decode


def main(argv: list[str] | None = None) -> None:
    cfg = training.parse_config(GuideConfig, __doc__.splitlines()[0], argv)
    model, summary = train(cfg)
    training.evaluate_into(summary, cfg, decoder(model, load_tokenizer(cfg.tokenizer), cfg.eval_gen),
                  "greedy autoregressive decoding")
    out = Path(cfg.out)
    model.to(torch.bfloat16).save_pretrained(str(out), max_shard_size=training.MAX_FILE_BYTES)
    training.finish_output(out, cfg, summary)


if __name__ == "__main__":
    main()
