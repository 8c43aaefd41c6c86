"""The accuracy benchmark (benchmarks/accuracy.py), and the engine against the reference sampler on the bundled model."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from benchmarks.accuracy import CONFIGS as BENCH_CONFIGS
from benchmarks.accuracy import REFERENCE, generate, main
from training.tasks import FAMILIES, held_out_mix, held_out_set, is_correct
from training.tasks.batches import chat_prompt, load_tokenizer
from training.train_tiny import canvas_text, reference_generate
from unmask.engine.llm import LLM
from unmask.engine.models.checkpoint import load_weights
from unmask.engine.params import SamplingParams
from unmask.engine.models.make_random import make_random_checkpoint

REPO = Path(__file__).resolve().parent.parent
BUNDLED_TOKENIZER = REPO / "models" / "unmask-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CONFIGS = [REFERENCE, "none/lc4", "dual/th0.9", "freecache/lc1"]
# Embedding rows for the bundled tokenizer, padded to a multiple of 64 as the training scripts do.
VOCAB = -(-load_tokenizer(BUNDLED_TOKENIZER).get_vocab_size() // 64) * 64


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory) -> Path:
    """A random LLaDA checkpoint speaking the bundled tokenizer (same special-token ids), so prompts are realistic."""
    out = make_random_checkpoint(tmp_path_factory.mktemp("accuracy"), arch="llada", layers=1, hidden=32, heads=2,
                                 vocab=VOCAB)
    for name in TOKENIZER_FILES:
        shutil.copyfile(BUNDLED_TOKENIZER / name, out / name)
    return out


@pytest.fixture(scope="module")
def guide_dir(tmp_path_factory) -> Path:
    """A small random Llama guide with the bundled tokenizer."""
    out = tmp_path_factory.mktemp("guide")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def bench(random_model_dir, tmp_path_factory) -> tuple[list, dict, str]:
    """One run of the benchmark: its rows, its JSON and its printed table."""
    path = tmp_path_factory.mktemp("json") / "rows.json"
    argv = ["--model", str(random_model_dir), "--n", "2", "--configs", *CONFIGS[1:], "--device", "cpu",
            "--kv-cache-mb", "16", "--no-warmup", "--json", str(path)]
    printed = io.StringIO()
    with redirect_stdout(printed):
        rows = main(argv)
    return rows, json.loads(path.read_text()), printed.getvalue()


def test_the_reference_runs_first_with_speedup_one(bench):
    rows, _, _ = bench
    assert [r.config for r in rows] == CONFIGS
    assert rows[0].speedup == 1.0 and rows[0].pass_speedup == 1.0


def test_every_family_is_scored_in_every_row(bench):
    rows, _, _ = bench
    for r in rows:
        assert list(r.accuracy) == list(FAMILIES)
        assert all(0.0 <= a <= 1.0 for a in r.accuracy.values())
        assert r.mean_accuracy == pytest.approx(sum(r.accuracy.values()) / len(FAMILIES))


def test_four_tokens_per_step_take_fewer_forward_passes(bench):
    rows, _, _ = bench
    by_name = {r.config: r for r in rows}
    one, four = by_name[REFERENCE], by_name["none/lc4"]
    assert one.forward_passes >= four.forward_passes
    assert four.tokens_per_step == pytest.approx(4.0) and one.tokens_per_step == pytest.approx(1.0)
    assert four.pass_speedup == pytest.approx(one.forward_passes / four.forward_passes)


def test_speed_columns_are_positive(bench):
    rows, _, _ = bench
    for r in rows:
        assert r.seconds > 0 and r.tokens_per_s >= 0 and r.speedup > 0 and r.forward_passes >= 1


def test_json_holds_the_same_rows_and_the_run_setup(bench, random_model_dir):
    rows, data, _ = bench
    assert [r["config"] for r in data["rows"]] == CONFIGS
    assert data["rows"][1]["accuracy"] == rows[1].accuracy
    assert data["model"] == str(random_model_dir) and data["n"] == 2 and data["device"] == "cpu"
    assert data["quantization"] == "none"
    assert "--n 2" in data["command"]


def test_the_table_has_a_header_line_and_one_line_per_row(bench, random_model_dir):
    _, _, printed = bench
    lines = printed.strip().splitlines()
    assert "--n 2" in lines[0] and str(random_model_dir) in lines[0] and "cpu" in lines[0]
    assert "quantization none" in lines[0]
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + len(CONFIGS)
    assert all(line.count("|") == table[0].count("|") for line in table)


def test_guided_rows_are_skipped_without_a_guide(random_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("unmask.engine.policies.guide.BUNDLED_GUIDE", tmp_path / "no-guide")
    rows = main(["--model", str(random_model_dir), "--n", "1", "--families", "count", "--configs", "dual/guided",
                 "--device", "cpu", "--kv-cache-mb", "16", "--no-warmup"])
    assert [r.config for r in rows] == [REFERENCE]
    assert "skipped dual/guided" in capsys.readouterr().out


def test_guided_rows_run_with_a_guide_model(random_model_dir, guide_dir, capsys):
    rows = main(["--model", str(random_model_dir), "--guide-model", str(guide_dir), "--n", "1", "--families", "count",
                 "lists", "--configs", "dual/guided", "freecache/guided", "--device", "cpu", "--kv-cache-mb", "16",
                 "--no-warmup"])
    assert [r.config for r in rows] == [REFERENCE, "dual/guided", "freecache/guided"]
    assert all(r.tokens_per_step >= 1.0 for r in rows)
    assert "note:" not in capsys.readouterr().out


@pytest.mark.slow
def test_the_engine_decodes_the_bundled_model_exactly_as_the_reference_sampler(bundled_model_dir):
    """Engine regression guard on the trained model: no cache, low-confidence, one token per step
    through the engine gives, problem by problem, the text of the training script's independent
    reference sampler (plain dense forward passes); so the accuracy the training run measured
    is the engine's accuracy too."""
    examples = [ex for family in FAMILIES for ex in held_out_set(family, 2)]
    model = load_weights(bundled_model_dir, torch.float32, "cpu")
    tok = load_tokenizer(bundled_model_dir)
    eos = model.cfg.eos_token_id
    canvases = reference_generate(model, [tok.encode(chat_prompt(ex.prompt)).ids for ex in examples], 64, 32)
    expected = [canvas_text(tok, canvas, eos) for canvas in canvases]
    llm = LLM(str(bundled_model_dir), device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=64, temperature=0.0, block_length=32, steps=32, cache="none",
                            unmask="low_confidence")
    got = [out.text for out in llm.generate([chat_prompt(ex.prompt) for ex in examples], params)]
    assert got == expected
    assert sum(is_correct(text, ex.answer) for text, ex in zip(got, examples)) > 0  # a trained model, not noise


# --- each method against its recorded benchmark row -------------------------------------------------

RECORDED = REPO / "benchmarks" / "accuracy_cpu.json"  # `python benchmarks/accuracy.py --n 8 --json ...` on the CPU
# One configuration per method (cache policy, parallel unmasking rule, guide); the families whose prompts are short.
CI_CONFIGS = ["none/th0.9", "prefix/th0.9", "dual/th0.9", "dual/th0.7", "dual/factor", "dual/lc4", "dkv/th0.9",
              "dkv-greedy/th0.9", "dllm-cache/th0.9", "freecache/th0.9", "dual/guided", "freecache/guided"]
CI_FAMILIES = ["arithmetic", "lists", "count"]


@pytest.fixture(scope="module")
def recorded() -> dict:
    record = json.loads(RECORDED.read_text())
    assert Path(record["model"]).name == "unmask-tiny" and record["device"] == "cpu"
    return record


@pytest.fixture(scope="module")
def bundled_llm(bundled_model_dir, recorded) -> LLM:
    return LLM(str(bundled_model_dir), device="cpu", dtype=recorded["dtype"], feature_cache=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", CI_CONFIGS)
def test_each_method_keeps_the_accuracy_its_benchmark_row_recorded(bundled_llm, recorded, name):
    """The recorded table's problems (the first n held-out ones), run again through the engine: every method
    scores what the benchmark recorded for it, give or take one problem per family (the batch here holds no
    recall prompts, and batching may tip a near-tie in the guide's padded forward)."""
    row = next(r for r in recorded["rows"] if r["config"] == name)
    n = recorded["n"]
    problems = held_out_mix(CI_FAMILIES, n)
    outputs = generate(bundled_llm, BENCH_CONFIGS[name], problems, recorded["max_tokens"])
    for family in CI_FAMILIES:
        right = sum(is_correct(out.text, ex.answer) for ex, out in zip(problems, outputs) if ex.family == family)
        assert right >= round(row["accuracy"][family] * n) - 1, (family, right, row["accuracy"][family])


# --- the bundled model's quality bar, asserted in CI ------------------------------------------------------------

BAR_PROBLEMS = 10  # per family: one wrong answer in ten is still 90%


@pytest.mark.slow
def test_the_reference_decoding_of_the_bundled_model_answers_at_least_90_percent_of_each_family(bundled_llm):
    """The bundled model's quality bar, through the engine: LLaDA's reference decoding (no cache,
    low-confidence, one token per step) on held-out problems it never saw in training. A regression
    in the engine, the checkpoint loader or the tokenizer shows here as wrong answers."""
    problems = held_out_mix(FAMILIES, BAR_PROBLEMS)
    outputs = generate(bundled_llm, BENCH_CONFIGS[REFERENCE], problems, 64)
    for family in FAMILIES:
        right = sum(is_correct(out.text, ex.answer) for ex, out in zip(problems, outputs) if ex.family == family)
        assert right >= 0.9 * BAR_PROBLEMS, (family, right)


def test_a_block_causal_model_runs_the_block_cache_rows_in_its_own_blocks(tmp_path, capsys):
    model_dir = make_random_checkpoint(tmp_path / "sdar", arch="sdar", layers=1, hidden=32, heads=2, vocab=VOCAB)
    for name in TOKENIZER_FILES:
        shutil.copyfile(BUNDLED_TOKENIZER / name, model_dir / name)
    path = tmp_path / "rows.json"
    rows = main(["--model", str(model_dir), "--n", "1", "--families", "count", "--configs", "block/lc4", "block/th0.9",
                 "dual/th0.9", "--device", "cpu", "--kv-cache-mb", "16", "--no-warmup", "--json", str(path)])
    assert [r.config for r in rows] == [REFERENCE, "block/lc4", "block/th0.9"]
    assert "skipped dual/th0.9: the cache does not fit the model's block-causal attention" in capsys.readouterr().out
    assert json.loads(path.read_text())["block_length"] == 4
    assert rows[1].forward_passes < rows[0].forward_passes  # 4 tokens per step: one step per block of 4


def test_a_windowed_row_whose_window_covers_the_canvas_scores_as_its_cache_without_it(random_model_dir):
    """`dual+w1/th0.9` at a 64-token canvas (two blocks of 32): the window drops nothing, so the row matches `dual/th0.9`."""
    rows = main(["--model", str(random_model_dir), "--n", "2", "--families", "count", "lists", "--configs", "dual/th0.9",
                 "dual+w1/th0.9", "--max-tokens", "64", "--device", "cpu", "--kv-cache-mb", "16", "--no-warmup"])
    plain, windowed = rows[1:]
    assert (plain.config, windowed.config) == ("dual/th0.9", "dual+w1/th0.9")
    assert windowed.accuracy == plain.accuracy and windowed.forward_passes == plain.forward_passes
    assert BENCH_CONFIGS["dual+w1/th0.9"].params(64).suffix_window == 1
