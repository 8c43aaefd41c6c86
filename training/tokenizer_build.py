"""Build the byte-level BPE tokenizer of Unmask's bundled models from the task corpus.

    python training/tokenizer_build.py --out models/unmask-tiny

Digits are split into single digits before BPE (that makes arithmetic
learnable: every number is spelled digit by digit). The result is saved in the
Hugging Face format with the special tokens of a LLaDA-Instruct-like chat model
and a chat template, and loads offline with `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from training.tasks import train_stream
from training.tasks.batches import ASSISTANT, EOS, EOT, MASK, SYSTEM, USER, chat_prompt
# Order fixes the ids: <|endoftext|> = 0, <|mask|> = 1, then the chat markers.
SPECIAL_TOKENS = (EOS, MASK, USER, ASSISTANT, SYSTEM, EOT)

# Like LLaDA-Instruct's: every turn is `<|role|>\n{content}<|eot|>\n`; a generation
# prompt opens the assistant turn. Unknown roles are an error, not silent text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|eot|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
DEFAULT_VOCAB = 1024
MODEL_MAX_LENGTH = 2048


def corpus(n_per_family: int, seed: int = 12345) -> list[str]:
    """Chat-formatted training examples: what the tokenizer must encode compactly."""
    examples = train_stream(seed, easy_fraction=0.3)  # the mixture the models train on
    return [chat_prompt(ex.prompt) + ex.response for ex in itertools.islice(examples, 4 * n_per_family)]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_tokenizer(out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB, n_per_family: int = 3000) -> PreTrainedTokenizerFast:
    """Train the BPE on the task corpus and save it (tokenizer.json + configs) to `out_dir`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(n_per_family), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,  # the canvas after an answer is filled with end-of-text
        mask_token=MASK,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM, EOT],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # keep decode(encode(s)) == s
        model_max_length=MODEL_MAX_LENGTH,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    _write_portable_config(out)
    return fast


def _write_portable_config(out: Path) -> None:
    """Rewrite the tokenizer configs in a form transformers 4.4x and 5.x both read.

    transformers 5 saves `tokenizer_class: TokenizersBackend`, a list under
    `extra_special_tokens` and a separate `chat_template.jinja`; 4.x knows none
    of these. `PreTrainedTokenizerFast` with `additional_special_tokens` and the
    template inside `tokenizer_config.json` loads in both.
    """
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": EOS,
        "mask_token": MASK,
        "additional_special_tokens": [USER, ASSISTANT, SYSTEM, EOT],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
    }
    special = {k: config[k] for k in ("eos_token", "pad_token", "mask_token", "additional_special_tokens")}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to write the tokenizer files into")
    p.add_argument("--vocab", type=int, default=DEFAULT_VOCAB)
    p.add_argument("--examples-per-family", type=int, default=3000)
    a = p.parse_args(argv)
    tok = build_tokenizer(a.out, a.vocab, a.examples_per_family)
    print(f"wrote a {len(tok)}-token tokenizer to {a.out}")


if __name__ == "__main__":
    main()
