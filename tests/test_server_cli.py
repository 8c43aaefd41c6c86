"""`unmask serve` as a user runs it: a subprocess that prints its URL and drains on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from server_fixtures import model_dir_for_tests, wait_until

from unmask.engine.models.make_random import main as make_random
from unmask.engine.params import EngineDefaults
from unmask.server.cli import build_parser, main, parse_size

REPO = Path(__file__).resolve().parent.parent
URL_LINE = re.compile(r"Unmask is serving (\S+) at (http://\S+)/v1")


def unmask(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("UNMASK_API_KEY", None)
    return subprocess.Popen(
        [sys.executable, "-m", "unmask.server", *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def wait_for_url(proc: subprocess.Popen, timeout: float = 180) -> tuple[str, str]:
    """Read stdout until the startup line; returns (model name, base URL)."""
    found: list[tuple[str, str]] = []

    def read() -> None:
        for line in proc.stdout:
            match = URL_LINE.search(line)
            if match:
                found.append((match.group(1), match.group(2)))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        proc.kill()
        raise AssertionError(f"no startup line; stderr:\n{proc.stderr.read()}")
    return found[0]


@contextmanager
def serving(*args: str) -> Iterator[str]:
    """`unmask serve ARGS` on a free port: its base URL; stopped (its stderr printed) on the way out."""
    proc = unmask("serve", *args, "--port", "0")
    try:
        _, url = wait_for_url(proc)
        yield url
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        print(f"server stderr:\n{err}")


def refuses_connections(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=5)
    except httpx.ConnectError:
        return True
    return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return model_dir_for_tests(tmp_path_factory)


def test_sizes_parse_with_binary_units():
    assert parse_size("1073741824") == 2**30
    assert parse_size("512MiB") == parse_size("512M") == parse_size("512mb") == 512 * 2**20
    assert parse_size("1.5G") == int(1.5 * 2**30)


def test_help_lists_the_serving_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--host",
        "--port",
        "--api-key",
        "--served-model-name",
        "--max-num-seqs",
        "--max-waiting",
        "--kv-cache-memory",
        "--dtype",
        "--device",
        "--load-format",
        "--quantization",
        "--max-score-tokens",
        "--cache",
        "--unmask",
        "--block-length",
        "--steps",
        "--threshold",
    ):
        assert option in out


def test_help_imports_neither_torch_nor_transformers():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "unmask.server", "serve", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--block-length" in result.stdout
    # -X importtime writes one "import time: self | cumulative | module" line per module imported.
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "unmask.server.cli" in imported
    assert not {name.split(".")[0] for name in imported} & {"torch", "transformers"}


def test_every_engine_default_is_a_serve_option():
    serve = build_parser().parse_args(["serve"])
    for f in fields(EngineDefaults):
        assert getattr(serve, f.name) == getattr(EngineDefaults(), f.name), f.name


def test_invalid_default_is_refused_before_loading(model_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(model_dir), "--block-length", "8", "--steps", "9"])
    assert exit_.value.code == 2 and "--steps" in capsys.readouterr().err


def test_a_scoring_cap_below_one_is_refused_before_loading(llada_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(llada_dir), "--max-score-tokens", "0"])
    assert exit_.value.code == 2 and "max_score_tokens must be >= 1" in capsys.readouterr().err


def test_unknown_policy_is_refused_by_the_parser(model_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(model_dir), "--cache", "nope"])
    assert exit_.value.code == 2 and "--cache" in capsys.readouterr().err


def test_missing_model_directory_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(tmp_path / "nowhere")])
    assert exit_.value.code == 2 and "no model checkpoint" in capsys.readouterr().err


def test_load_format_dummy_on_a_directory_without_config_json_says_how_to_write_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(tmp_path), "--load-format", "dummy"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "config.json" in err and "make_random" in err and "--config-only" in err


def test_load_format_dummy_serves_a_config_only_directory_to_max_tokens_with_ignore_eos(tmp_path):
    # LLaDA-8B's vocabulary (so its padded tokenizer too) in one narrow layer, to stay fast on a CPU.
    model_dir = tmp_path / "llada-8b-shaped"
    make_random([str(model_dir), "--preset", "llada-8b", "--config-only", "--layers", "1", "--hidden", "256", "--heads", "4"])
    proc = unmask("serve", str(model_dir), "--load-format", "dummy", "--port", "0", "--kv-cache-memory", "64MiB")
    try:
        _, url = wait_for_url(proc)
        body = {"prompt": "Hello world", "max_tokens": 40, "block_length": 8, "ignore_eos": True}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
        assert reply["usage"]["completion_tokens"] == 40
        assert reply["choices"][0]["finish_reason"] == "length" and reply["choices"][0]["text"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        print(f"server stderr:\n{err}")


def test_serve_prints_its_url_serves_and_drains_in_flight_requests_on_sigterm(model_dir):
    proc = unmask(
        "serve",
        str(model_dir),
        "--port",
        "0",
        "--api-key",
        "k",
        "--served-model-name",
        "tiny",
        "tiny-alias",
        "--kv-cache-memory",
        "64MiB",
        "--block-length",
        "16",
    )
    try:
        name, url = wait_for_url(proc)
        assert name == "tiny"
        headers = {"Authorization": "Bearer k"}
        assert httpx.get(f"{url}/health").status_code == 200
        models = httpx.get(f"{url}/v1/models", headers=headers).json()["data"]
        assert [m["id"] for m in models] == ["tiny", "tiny-alias"]

        body = {
            "model": "tiny-alias",
            "prompt": "Hello",
            "max_tokens": 48,
            "block_length": 48,
            "steps": 48,
            "unmask": "random",
            "seed": 1,
            "stream": True,
            "stream_blocks": True,
        }
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120) as response:
            lines = response.iter_lines()
            events.append(next(line for line in lines if line.startswith("data: ")))
            assert '"finish_reason":null' in events[0]
            proc.send_signal(signal.SIGTERM)
            assert wait_until(lambda: refuses_connections(url)), "still accepting connections after SIGTERM"
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][len("data: ") :])
        assert last["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
        print(f"server stderr:\n{err}")  # shown by pytest only when the test fails
