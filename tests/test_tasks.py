"""The task families, their split and scorer, and the bundled tokenizer."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from training.tasks import EASY, FAMILIES, extract_answer, generate, held_out_set, is_correct, split_of, train_stream
from training.tasks.batches import chat_prompt
from training.tokenizer_build import CHAT_TEMPLATE, SPECIAL_TOKENS, TOKENIZER_FILES, build_tokenizer

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "models" / "unmask-tiny"
GUIDE_DIR = REPO / "models" / "unmask-tiny-guide"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generators_are_deterministic_for_a_seed(family):
    first = [generate(family, random.Random(7)) for _ in range(3)]
    again = [generate(family, random.Random(7)) for _ in range(3)]
    assert first == again
    assert held_out_set(family, 20) == held_out_set(family, 20)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_held_out_problems_never_appear_in_training(family):
    held_out = {ex.key for ex in held_out_set(family, 200)}
    assert all(split_of(family, k) == "test" for k in held_out)
    train = list(itertools.islice(train_stream(0, (family,)), 3000))
    assert all(ex.split == "train" for ex in train)
    assert held_out.isdisjoint(ex.key for ex in train)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_easy_training_problems_are_smaller_than_any_benchmark_problem(family, tok):
    rng = random.Random(5)
    easy = [EASY[family](rng) for _ in range(300)]
    held_out = held_out_set(family, 300)
    assert {ex.key for ex in easy}.isdisjoint(ex.key for ex in held_out)
    assert all(is_correct(ex.response, ex.answer) for ex in easy)
    size = lambda ex: len(tok.encode(ex.prompt, add_special_tokens=False))  # noqa: E731
    if family != "arithmetic":  # one-operation drills are short anyway; the rest shrink the prompt
        assert max(map(size, easy)) <= max(map(size, held_out))


def test_train_stream_mixes_in_the_asked_share_of_easy_problems():
    mixed = list(itertools.islice(train_stream(0, ("recall",), easy_fraction=0.3), 1000))
    few_facts = sum(ex.prompt.count("The code of") < 20 for ex in mixed)
    assert 0.25 < few_facts / len(mixed) < 0.35


def test_the_split_holds_out_about_a_tenth_of_problems():
    rng = random.Random(3)
    splits = [generate("arithmetic", rng).split for _ in range(4000)]
    assert 0.07 < splits.count("test") / len(splits) < 0.13


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scorer_accepts_the_right_answer_and_rejects_wrong_ones(family):
    for ex in held_out_set(family, 50):
        assert is_correct(ex.response, ex.answer)
        assert is_correct(ex.response + "\n", ex.answer)
        assert not is_correct(ex.response + "0", ex.answer)
        assert not is_correct(ex.response.replace("Answer:", "Result:"), ex.answer)


def test_scorer_reads_the_last_answer_line_only():
    assert extract_answer("3 + 4 = 7\nAnswer:  7 \n") == "7"
    assert extract_answer("Answer: 6\nAnswer: 7") == "7"
    assert extract_answer("the answer is 7") is None
    assert not is_correct("Answer: 17", "7")
    assert not is_correct("Answer: 3, 2, 1", "3, 2")


def test_arithmetic_worked_lines_are_correct_and_end_in_the_answer():
    for ex in held_out_set("arithmetic", 300):
        *steps, last = ex.response.split("\n")
        assert 2 <= len(steps) <= 4
        for line in steps:
            a, op, b, eq, c = line.split(" ")
            assert eq == "=" and int(c) == {"+": int(a) + int(b), "-": int(a) - int(b),
                                            "*": int(a) * int(b), "/": int(a) // int(b)}[op]
            assert int(c) >= 0
        assert steps[-1].split(" = ")[1] == ex.answer and last == f"Answer: {ex.answer}"


def test_list_answers_are_sorted_or_reversed_as_asked():
    for ex in held_out_set("lists", 200):
        given = ex.prompt.split(": ", 1)[1].split(", ")
        got = ex.answer.split(", ")
        if "smallest to largest" in ex.prompt:
            assert got == sorted(given, key=int)
        elif "largest to smallest" in ex.prompt:
            assert got == sorted(given, key=int, reverse=True)
        elif "alphabetical" in ex.prompt:
            assert got == sorted(given)
        else:
            assert got == given[::-1]


def test_count_answers_count_the_asked_word():
    for ex in held_out_set("count", 200):
        listed, question = ex.prompt.split("\n")
        word = re.match(r"How many times does (\w+) appear", question).group(1)
        assert int(ex.answer) == listed.split(": ", 1)[1].split(", ").count(word)


def test_recall_answer_is_the_code_of_the_asked_key():
    for ex in held_out_set("recall", 100):
        key = re.search(r"What is the code of (\w+)\?", ex.prompt).group(1)
        facts = dict(re.findall(r"The code of (\w+) is (\d+)\.", ex.prompt))
        assert 20 <= len(facts) <= 40 and facts[key] == ex.answer
        assert ex.response.splitlines()[0] == f"The code of {key} is {ex.answer}."  # the worked line


@pytest.mark.parametrize("family", list(FAMILIES))
def test_responses_fit_a_64_token_canvas(family, tok):
    lengths = [len(tok.encode(ex.response, add_special_tokens=False)) for ex in held_out_set(family, 200)]
    assert max(lengths) < 64  # room for at least one end-of-text


def test_recall_prompts_are_a_few_hundred_tokens(tok):
    lengths = [len(tok.encode(ex.prompt, add_special_tokens=False)) for ex in held_out_set("recall", 100)]
    assert 200 <= min(lengths) and max(lengths) <= 520


def test_tokenizer_round_trips_text_exactly(tok):
    samples = [ex.prompt + "\n" + ex.response for f in FAMILIES for ex in held_out_set(f, 20)]
    samples += ["  two  spaces\n\nand\ttabs ", "naïve café — ünïcode ✓ 😀", "x=1234567890;", " leading", "trailing "]
    for s in samples:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_tokenizer_splits_numbers_into_single_digits(tok):
    pieces = [tok.decode([i]) for i in tok.encode("12345 + 678", add_special_tokens=False)]
    digits = [p.strip() for p in pieces if p.strip().isdigit()]
    assert digits == list("12345678")


def test_special_tokens_have_their_roles(tok):
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    assert tok.mask_token == "<|mask|>"
    for special in SPECIAL_TOKENS:
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] in tok.all_special_ids
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|mask|>"]) == [0, 1]


def test_chat_template_matches_the_training_format(tok):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == chat_prompt("What is 2 + 3?") == "<|user|>\nWhat is 2 + 3?<|eot|>\n<|assistant|>\n"
    convo = [{"role": "system", "content": "Be brief."}, *messages, {"role": "assistant", "content": "5"}]
    assert tok.apply_chat_template(convo, tokenize=False) == (
        "<|system|>\nBe brief.<|eot|>\n<|user|>\nWhat is 2 + 3?<|eot|>\n<|assistant|>\n5<|eot|>\n"
    )
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_decoding_skips_special_tokens_cleanly(tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    ids = tok.encode(prompt + "Answer: 42", add_special_tokens=False) + [tok.eos_token_id] * 3 + [tok.mask_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "\nHi\n\nAnswer: 42"


def test_bundled_tokenizer_is_what_the_build_script_produces(tmp_path):
    build_tokenizer(tmp_path)
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).read_text() == (TOKENIZER_DIR / name).read_text(), name
    assert CHAT_TEMPLATE in (TOKENIZER_DIR / "tokenizer_config.json").read_text().replace("\\n", "\n")


def test_guide_model_shares_the_tokenizer():
    if not (GUIDE_DIR / "tokenizer.json").is_file():
        pytest.skip("the guide model is not in this checkout")
    for name in TOKENIZER_FILES:
        assert (GUIDE_DIR / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name
