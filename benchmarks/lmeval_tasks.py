"""lm-eval task files of held-out bundled-model problems, for `lm_eval --include_path DIR`.

    python benchmarks/lmeval_tasks.py --out /tmp/unmask-tasks --n 20

writes three tasks, each over local JSON lines (no download: run lm_eval with
HF_DATASETS_OFFLINE=1):

- `unmask_tiny_gen` (generate_until): the chat-templated problem as a raw prompt, for
  `local-completions`; exact match of the text after `Answer:`.
- `unmask_tiny_chat` (generate_until): the bare problem, for `local-chat-completions`
  with `--apply_chat_template` (the server applies the template).
- `unmask_tiny_mc` (multiple_choice): a sorting or reversing problem (the `lists`
  family, whose response is the answer line alone), the context ending at `Answer:`,
  the right list and `--choices - 1` wrong orders of the same numbers; `acc` is the
  share of problems whose right answer has the highest log-likelihood.

The problems are the held-out set of `training/tasks` (never trained on), as in
`benchmarks/accuracy.py`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.tasks import ANSWER_PREFIX, Example, held_out_mix, held_out_set
from training.tasks.batches import chat_prompt

GENERATION_FAMILIES = ("arithmetic", "lists", "count")
MC_FAMILY = "lists"
ANSWER_PATTERN = ANSWER_PREFIX + r"[ \t]*([^\n]*)"
MAX_GEN_TOKS = 48  # the longest worked response of these families fits


def generation_docs(n: int) -> list[dict]:
    """`n` held-out problems of each generation family, interleaved."""
    return [
        {"prompt": chat_prompt(ex.prompt), "question": ex.prompt, "answer": ex.answer}
        for ex in held_out_mix(GENERATION_FAMILIES, n)
    ]


def wrong_orders(ex: Example, count: int) -> list[str]:
    """`count` distinct orders of the answer's numbers other than the right one (seeded by the problem)."""
    items = ex.answer.split(", ")
    rng = random.Random(ex.key)
    wrong: list[str] = []
    candidates = [items[::-1], items[1:] + items[:1], items[-1:] + items[:-1]]
    for _ in range(100):
        shuffled = items[:]
        rng.shuffle(shuffled)
        candidates.append(shuffled)
    for order in candidates:
        text = ", ".join(order)
        if text != ex.answer and text not in wrong:
            wrong.append(text)
        if len(wrong) == count:
            return wrong
    raise ValueError(f"cannot find {count} wrong orders of {ex.answer!r}")


def multiple_choice_docs(n: int, choices: int) -> list[dict]:
    """`n` held-out list problems; the right answer sits at a seeded position among the wrong ones."""
    docs = []
    for ex in held_out_set(MC_FAMILY, n):
        options = wrong_orders(ex, choices - 1)
        gold = random.Random(f"gold:{ex.key}").randrange(choices)
        options.insert(gold, ex.answer)
        docs.append({"context": chat_prompt(ex.prompt) + ANSWER_PREFIX, "choices": options, "gold": gold})
    return docs


def _answer_filter() -> list[dict]:
    return [
        {
            "name": "answer",
            "filter": [{"function": "regex", "regex_pattern": ANSWER_PATTERN}, {"function": "take_first"}],
        }
    ]


def task_configs(out: Path) -> dict[str, dict]:
    """The three task YAMLs (as dicts) over the JSON-lines files in `out`."""

    def dataset(name: str) -> dict:
        return {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str((out / f"{name}.jsonl").resolve())}},
            "test_split": "test",
        }

    generation = {
        "output_type": "generate_until",
        "doc_to_target": "answer",
        "generation_kwargs": {"until": ["<|eot|>"], "max_gen_toks": MAX_GEN_TOKS},
        "filter_list": _answer_filter(),
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    return {
        "unmask_tiny_gen": {"task": "unmask_tiny_gen", **dataset("generation"), "doc_to_text": "prompt", **generation},
        "unmask_tiny_chat": {"task": "unmask_tiny_chat", **dataset("generation"), "doc_to_text": "question", **generation},
        "unmask_tiny_mc": {
            "task": "unmask_tiny_mc",
            **dataset("multiple_choice"),
            "output_type": "multiple_choice",
            "doc_to_text": "context",  # column names: lm-eval reads these fields of each document as they are
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
    }


def write_tasks(out: Path, n: int, mc_n: int, choices: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("generation", generation_docs(n)), ("multiple_choice", multiple_choice_docs(mc_n, choices))):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    for task, config in task_configs(out).items():
        # JSON is YAML (and lm-eval's loader reads it as such).
        (out / f"{task}.yaml").write_text(json.dumps(config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the task YAMLs and their data")
    parser.add_argument("--n", type=int, default=10, help="generation problems per family")
    parser.add_argument("--mc-n", type=int, default=20, help="multiple-choice problems")
    parser.add_argument("--choices", type=int, default=4, help="options per multiple-choice problem (one right)")
    args = parser.parse_args(argv)
    write_tasks(args.out, args.n, args.mc_n, args.choices)
    print(f"wrote unmask_tiny_gen, unmask_tiny_chat and unmask_tiny_mc to {args.out}")


if __name__ == "__main__":
    main()
