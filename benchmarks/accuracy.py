"""Exact-match accuracy of every decoding method on the held-out task problems, beside its speed.

    python benchmarks/accuracy.py                                    # every configuration, 100 problems per family
    python benchmarks/accuracy.py --n 20 --configs dual/lc4 dual/th0.9 --families arithmetic count
    python benchmarks/accuracy.py --quantization fp8                 # FP8 weights (a GPU of compute capability 8.9+)

Each configuration (a cache policy and an unmask policy, named `cache/unmask`;
`cache+wN/unmask` adds the suffix window `suffix_window=N`) decodes the
first `--n` held-out problems of each task family through the real engine,
all of them submitted at once so the engine batches them continuously:
greedy (temperature 0), blocks of 32 (a block-causal model's own blocks),
`--max-tokens` canvas. A window of N blocks drops nothing until the canvas
is longer than N + 1 blocks: compare the windowed rows at a `--max-tokens`
of several blocks (e.g. 256).
Unmask rules: `lc1`/`lc4` low-confidence at 1 or 4 tokens per step (32 or 8
steps per block of 32), `th0.7`/`th0.9` the confidence threshold, `factor` the
Fast-dLLM factor rule at its default, `guided` the guide model's verdict.
By default the configurations run are those whose cache fits the model's
attention (`block`, `block-dual` for a block-causal model, the others for a
full-attention one). The reference decoding (`none/lc1`) always runs first; the speedup columns
compare wall time and forward passes per request against it. Before timing,
each configuration runs once (`--no-warmup` skips it) so kernel compilation
and CUDA graph capture are not charged to whichever configuration meets a
shape first: on CUDA over all the problems, since graphs are captured per
(tokens, sequences) bucket and continuous batching meets buckets that one
batch does not (greedy decoding repeats the same steps); elsewhere over one batch.
`--quantization fp8` loads the model with FP8 weights (the engine's option);
the first line and the JSON record name the quantization, so its table can
stand beside the one of the unquantized model.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from training.tasks import FAMILIES, Example, held_out_mix, is_correct
from training.tasks.batches import chat_prompt
from unmask.engine.attention_pattern import cache_fits
from unmask.engine.config import QUANTIZATIONS
from unmask.engine.llm import LLM
from unmask.engine.models.config import ModelConfig
from unmask.engine.outputs import FinishReason, RequestOutput
from unmask.engine.params import SamplingParams
from unmask.engine.policies import CACHE_POLICIES
from unmask.engine.policies.guide import BUNDLED_GUIDE
from unmask.engine.policies.resources import FEATURE_PAGES
from unmask.server.model_path import resolve_model_dir

BLOCK_LENGTH = 32
REFERENCE = "none/lc1"
# unmask rule name -> (unmask policy, tokens per step, threshold); None leaves the engine's default
UNMASK_RULES: dict[str, tuple[str, int | None, float | None]] = {
    "lc1": ("low_confidence", 1, None),
    "lc4": ("low_confidence", 4, None),
    "th0.7": ("threshold", None, 0.7),
    "th0.9": ("threshold", None, 0.9),
    "factor": ("factor", None, None),
    "guided": ("guided", None, None),
}


@dataclass(frozen=True)
class Config:
    """One row of the table: a cache policy, an unmask rule of `UNMASK_RULES` and the cache's suffix window."""

    cache: str
    rule: str
    window: int | None = None  # `suffix_window`; None: the whole canvas

    @property
    def name(self) -> str:
        window = "" if self.window is None else f"+w{self.window}"
        return f"{self.cache}{window}/{self.rule}"

    @property
    def needs_guide(self) -> bool:
        return UNMASK_RULES[self.rule][0] == "guided"

    def params(self, max_tokens: int, block_length: int = BLOCK_LENGTH) -> SamplingParams:
        unmask, tokens_per_step, threshold = UNMASK_RULES[self.rule]
        steps = max(1, block_length // tokens_per_step) if tokens_per_step else None
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0, block_length=block_length,
                              steps=steps, cache=self.cache, unmask=unmask, threshold=threshold,
                              suffix_window=self.window)


FAST_DLLM_RULES = ("lc1", "lc4", "th0.7", "th0.9", "factor")
CONFIGS: dict[str, Config] = {c.name: c for c in [
    *(Config(cache, rule) for cache in ("none", "prefix", "dual") for rule in FAST_DLLM_RULES),
    *(Config(cache, rule) for cache in ("dkv", "dkv-greedy", "dllm-cache", "freecache") for rule in ("lc1", "th0.9")),
    Config("dual", "guided"),
    # The suffix window beside the same cache without it (it matters once the canvas is longer than the window).
    *(Config(cache, rule, window) for cache, rule in (("none", "lc1"), ("dual", "th0.9")) for window in (0, 1)),
    Config("prefix", "th0.9", 1),
    Config("freecache", "guided"),
    *(Config("block", rule) for rule in FAST_DLLM_RULES),
    Config("block-dual", "th0.9"),
    Config("block", "guided"),
]}


@dataclass
class Row:
    """What one configuration scored and cost over the whole problem set."""

    config: str
    accuracy: dict[str, float]  # family -> exact-match accuracy
    mean_accuracy: float  # over families
    forward_passes: float  # per request
    tokens_per_step: float  # tokens committed per forward pass, over all requests
    tokens_per_s: float  # generated tokens (before end-of-text) per second of wall time
    seconds: float
    speedup: float  # the reference's wall time / this one's
    pass_speedup: float  # the reference's forward passes per request / this one's


def model_block_length(llm: LLM) -> int:
    """The decoding block: a block-causal model's own, else `BLOCK_LENGTH`."""
    return llm.engine.model_config.attention_block_size or BLOCK_LENGTH


def generate(llm: LLM, config: Config, problems: list[Example], max_tokens: int) -> list[RequestOutput]:
    """Every problem through the engine at once; an engine error aborts the benchmark."""
    block_length = model_block_length(llm)
    outputs = llm.generate([chat_prompt(ex.prompt) for ex in problems], config.params(max_tokens, block_length))
    failed = [o for o in outputs if o.finish_reason is FinishReason.ERROR]
    if failed:
        raise RuntimeError(f"{config.name}: {len(failed)} request(s) failed, first: {failed[0].error}")
    return outputs


def measure(llm: LLM, config: Config, problems: list[Example], max_tokens: int, reference: Row | None) -> Row:
    """Run `config` over `problems` and score it; `reference` None means this is the reference."""
    start = time.perf_counter()
    outputs = generate(llm, config, problems, max_tokens)
    seconds = time.perf_counter() - start
    correct: dict[str, list[bool]] = {}
    for ex, out in zip(problems, outputs):
        correct.setdefault(ex.family, []).append(is_correct(out.text, ex.answer))
    accuracy = {family: sum(ok) / len(ok) for family, ok in correct.items()}
    passes = sum(o.stats.forward_passes for o in outputs)
    committed = sum(o.stats.tokens_committed for o in outputs)
    per_request = passes / len(outputs)
    return Row(
        config=config.name,
        accuracy=accuracy,
        mean_accuracy=statistics.mean(accuracy.values()),
        forward_passes=per_request,
        tokens_per_step=committed / passes,
        tokens_per_s=sum(len(o.token_ids) for o in outputs) / seconds,
        seconds=seconds,
        speedup=reference.seconds / seconds if reference else 1.0,
        pass_speedup=reference.forward_passes / per_request if reference else 1.0,
    )


def device_name(device: torch.device) -> str:
    return f"{torch.cuda.get_device_name(device)} (cuda)" if device.type == "cuda" else device.type


def table_header(families: list[str]) -> str:
    columns = ["config", *families, "mean", "fwd passes/req", "tok/step", "gen tok/s", "speedup (wall)",
               "speedup (passes)"]
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


def table_line(row: Row) -> str:
    cells = [row.config, *(f"{a:.3f}" for a in row.accuracy.values()), f"{row.mean_accuracy:.3f}",
             f"{row.forward_passes:.1f}", f"{row.tokens_per_step:.2f}", f"{row.tokens_per_s:.0f}",
             f"{row.speedup:.2f}x", f"{row.pass_speedup:.2f}x"]
    return "| " + " | ".join(cells) + " |"


def select_configs(names: list[str] | None, has_guide: bool, model: ModelConfig) -> tuple[list[Config], list[str]]:
    """The configurations to run, the reference first, and notes on what was left out.

    `names` None: every configuration whose cache fits the model's attention.
    """
    if names is None:
        names = [n for n, c in CONFIGS.items() if cache_fits(c.cache, model)]
    chosen = [CONFIGS[REFERENCE]] + [CONFIGS[n] for n in dict.fromkeys(names) if n != REFERENCE]
    notes = []
    unfit = [c.name for c in chosen if not cache_fits(c.cache, model)]
    if unfit:
        attention = "block-causal" if model.block_causal else "full"
        notes.append(f"skipped {', '.join(unfit)}: the cache does not fit the model's {attention} attention")
    unguided = [c.name for c in chosen if c.needs_guide and not has_guide and c.name not in unfit]
    if unguided:
        notes.append(f"skipped {', '.join(unguided)}: no guide model (the bundled {BUNDLED_GUIDE.name} is absent or does "
                     "not share the model's tokenizer; pass --guide-model DIR)")
    skipped = set(unfit) | set(unguided)
    return [c for c in chosen if c.name not in skipped], notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--guide-model", default=None,
                   help="guide model for the guided rows (default: the bundled guide, if present)")
    p.add_argument("--n", type=int, default=100, help="held-out problems per family")
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES), metavar="FAMILY",
                   help=f"task families (default: all): {', '.join(FAMILIES)}")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None, metavar="CONFIG",
                   help=f"configurations to run (default: all that fit the model): {', '.join(CONFIGS)}")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none", help="the engine's weight quantization")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-mb", type=int, default=None, help="KV pool size (default: the engine's)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    a = p.parse_args(argv)
    if a.n < 1 or a.max_tokens < 1:
        p.error("--n and --max-tokens must be at least 1")
    try:
        a.model = resolve_model_dir(a.model)
    except FileNotFoundError as exc:
        p.error(str(exc))
    return a


def main(argv: list[str] | None = None) -> list[Row]:
    a = parse_args(argv)
    problems = held_out_mix(a.families, a.n)
    llm = LLM(
        str(a.model), device=a.device, dtype=a.dtype, quantization=a.quantization, max_num_seqs=a.max_num_seqs,
        kv_cache_memory=a.kv_cache_mb * 2**20 if a.kv_cache_mb else None,
        feature_cache=any(FEATURE_PAGES in CACHE_POLICIES[CONFIGS[n].cache].requirements for n in a.configs or CONFIGS),
        guide_model=a.guide_model,  # None: the engine takes the bundled guide if it fits the model
    )
    configs, notes = select_configs(a.configs, llm.engine.resources.guide is not None, llm.engine.model_config)
    loaded = llm.engine.loaded
    command = shlex.join(["python", "benchmarks/accuracy.py", *(sys.argv[1:] if argv is None else argv)])
    guide = a.guide_model or (str(BUNDLED_GUIDE) if llm.engine.resources.guide else None)
    dtype = str(loaded.dtype).removeprefix("torch.")
    header = {"command": command, "device": device_name(loaded.device), "dtype": dtype, "quantization": a.quantization,
              "model": str(a.model), "guide_model": guide, "n": a.n, "block_length": model_block_length(llm),
              "max_tokens": a.max_tokens}
    print(f"`{command}` | device {header['device']}, {dtype}, quantization {a.quantization} | model {a.model} | "
          f"guide {guide} | {a.n} problems per family, greedy, block {header['block_length']}, max_tokens {a.max_tokens}")
    for note in notes:
        print(f"note: {note}")
    if a.warmup:
        warmup_problems = problems if llm.engine.runner.graphs is not None else problems[: a.max_num_seqs]
        for config in configs:
            generate(llm, config, warmup_problems, a.max_tokens)
    print(table_header(a.families), flush=True)
    rows: list[Row] = []
    for config in configs:
        rows.append(measure(llm, config, problems, a.max_tokens, rows[0] if rows else None))
        print(table_line(rows[-1]), flush=True)
    if a.json:
        record = {**header, "notes": notes, "rows": [asdict(r) for r in rows]}
        Path(a.json).write_text(json.dumps(record, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
