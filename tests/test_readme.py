"""The README's examples, run as a new user would copy them (the bundled model answers what the comments say)."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from server_fixtures import live_server  # noqa: F401  (pytest fixture)

from benchmarks import serve_overhead
from unmask.engine.models.arch import CheckpointError
from unmask.engine.models.loader import read_dummy_config
from unmask.engine.models.make_random import main as make_random
from unmask.server import cli as unmask_cli

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _block_after(heading: str, language: str) -> str:
    """The first fenced block of `language` after `heading`."""
    start = README.index(heading)
    match = re.compile(rf"```{language}\n(.*?)```", re.DOTALL).search(README, start)
    assert match is not None, f"no {language} block after {heading!r}"
    return match.group(1)


def _promised(code: str, marker: str) -> str:
    """The text a `# ...` comment promises after `marker` (e.g. the answer printed)."""
    comment = next(line.split("#", 1)[1] for line in code.splitlines() if marker in line and "#" in line)
    return comment.strip()


def _run_python_example(heading: str) -> tuple[str, str]:
    """Run the first python block after `heading`; returns its code and what it printed."""
    code = _block_after(heading, "python")
    printed = io.StringIO()
    with redirect_stdout(printed):
        exec(compile(code, f"README.md ({heading.lstrip('# ')})", "exec"), {})
    return code, printed.getvalue()


@pytest.mark.slow
def test_the_offline_api_example_prints_the_answer_its_comment_promises(monkeypatch):
    monkeypatch.chdir(REPO)  # the example names the bundled model by its path in the checkout
    code, printed = _run_python_example("### Offline API")
    promised = _promised(code, "print(out.text") + " " + _promised(code, "print(scored")
    assert printed.split() == promised.split()


def _run_curl_example(live_server, heading: str, path: str, shown_pattern: str) -> tuple[dict, str]:
    """POST the body of the first curl block after `heading`; return the JSON reply and the value the README shows."""
    block = _block_after(heading, "bash")
    body = json.loads(re.search(r"-d '(\{.*\})'", block, re.DOTALL).group(1))
    shown = re.search(shown_pattern, block).group(1)
    body["model"] = live_server.model
    with live_server.http() as client:
        response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json(), shown


def test_the_curl_chat_example_gets_the_answer_the_readme_shows(live_server):
    reply, shown = _run_curl_example(
        live_server, "so ask it one of those", "/v1/chat/completions", r'"content": "([^"]*)"\} \.\.\.'
    )
    assert reply["choices"][0]["message"]["content"] == shown


def test_the_curl_infill_example_gets_the_text_the_readme_shows(live_server):
    reply, shown = _run_curl_example(live_server, "### Infilling", "/v1/completions", r'"text": "([^"]*)" \.\.\.')
    assert reply["choices"][0]["text"] == shown


def test_the_offline_infill_example_prints_the_spans_its_comment_promises(monkeypatch):
    monkeypatch.chdir(REPO)
    code, printed = _run_python_example("### Infilling")
    assert printed.strip() == _promised(code, "print(result.texts")


def _console_after(heading: str) -> list[str]:
    """The lines of the first console block after `heading` (what the README says is printed)."""
    return _block_after(heading, "console").splitlines()


def test_the_openai_sdk_example_prints_what_its_comments_show(live_server):
    code = _block_after("With the OpenAI SDK", "python")
    shown = [line.removeprefix("# ") for line in code.split("print(", 1)[1].splitlines()[1:] if line.startswith("# ")]
    runnable = code.replace("http://127.0.0.1:8000/v1", f"{live_server.base_url}/v1")
    runnable = runnable.replace('api_key="unused"', f"api_key={live_server.api_key!r}")
    runnable = runnable.replace('model="unmask-tiny"', f"model={live_server.model!r}")
    printed = io.StringIO()
    with redirect_stdout(printed):
        exec(compile(runnable, "README.md (OpenAI SDK)", "exec"), {})
    assert printed.getvalue().splitlines() == shown


def test_the_streaming_example_prints_the_block_filling_in_as_the_readme_shows(live_server):
    command = _block_after("Streaming with `stream_blocks` shows", "bash")
    command = command.replace("http://127.0.0.1:8000", live_server.base_url)
    command = command.replace("curl -sN", f"curl -sN -H 'Authorization: Bearer {live_server.api_key}'", 1)
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    assert printed == _console_after("Streaming with `stream_blocks` shows")
    assert "░" in printed[0] and "░" not in printed[-1]  # a newcomer sees the text being written


def test_make_serve_passes_args_to_the_unmask_command():
    block = _block_after("go in `ARGS`", "bash")
    make_line = next(line for line in block.splitlines() if line.startswith("make serve"))
    command, promised = make_line.split("#", 1)
    # As a user types it: not inside another make (`make test` runs this suite), which would print directories.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    dry_run = subprocess.run(
        ["bash", "-c", command.replace("make ", "make -n ", 1)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert dry_run.returncode == 0, dry_run.stderr
    assert dry_run.stdout.splitlines()[-1] == promised.strip().removeprefix("runs ")


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "models/unmask-tiny/config.json").is_file(), reason="the README shows the bundled model")
def test_the_startup_log_reads_as_the_readme_shows():
    shown = _console_after("then prints the URL")
    command = shown[0].removeprefix("$ ").split()
    assert command[:2] == ["unmask", "serve"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("UNMASK_API_KEY", None)
    env.pop("UNMASK_MODEL", None)
    args = [sys.executable, "-m", "unmask.server", *command[1:-2], "--port", "0"]  # a free port instead of 8000
    proc = subprocess.Popen(args, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    printed: list[str] = []
    try:
        for line in proc.stdout:
            printed.append(line.rstrip("\n"))
            if line.startswith("Unmask is serving"):
                break
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    log_lines = [_normalized(line) for line in printed if " unmask.server: " in line or line.startswith("Unmask is")]
    assert log_lines == [_normalized(line) for line in shown[1:]]


def _normalized(line: str) -> str:
    """A log line without what differs between runs: its timestamp, the seconds a load took, the port."""
    line = re.sub(r"^(\.\.\.|\S+ \S+) (INFO|WARNING) ", "", line)
    line = re.sub(r"loaded in [\d.]+ s", "loaded in N s", line)
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line)


@pytest.mark.parametrize(
    "heading,count,kind",
    [("### Block-diffusion models", 4, lambda cfg: cfg.block_causal), ("### Mixture-of-experts models", 3, lambda cfg: cfg.moe)],
    ids=["block-diffusion", "mixture-of-experts"],
)
def test_the_presets_examples_write_configs_of_their_kind(tmp_path, heading, count, kind):
    block = _block_after(heading, "bash")
    commands = [line.split() for line in block.splitlines() if "make_random" in line]
    assert len(commands) == count
    for argv in commands:
        out = tmp_path / Path(argv[3]).name  # the example writes to /tmp/<name>
        make_random([str(out), *argv[4:]])
        assert kind(read_dummy_config(out))


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(_fp8_gpu(), reason="the refusal needs a machine without an FP8 GPU")
def test_the_fp8_example_is_refused_at_its_first_line_without_an_fp8_gpu(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(CheckpointError, match="quantization fp8 needs a CUDA GPU of compute capability 8.9"):
        _run_python_example("### FP8 weights")


@pytest.mark.gpu
@pytest.mark.skipif(not _fp8_gpu(), reason="needs a CUDA GPU of compute capability 8.9+")
def test_the_fp8_example_prints_the_answer_its_comment_promises(monkeypatch):
    monkeypatch.chdir(REPO)
    code, printed = _run_python_example("### FP8 weights")
    assert printed.strip() == _promised(code, "print(out.text")


def test_the_suffix_window_example_prints_what_its_comments_show(monkeypatch):
    monkeypatch.chdir(REPO)
    code, printed = _run_python_example("**The suffix window.**")
    shown = [line.removeprefix("# ") for line in code.splitlines() if line.startswith("# ")]
    assert printed.splitlines() == shown


def _overhead_commands() -> list[list[str]]:
    """The serve_overhead command lines of the README's serving-overhead section (console, then bash block)."""
    heading = "#### Serving overhead"
    blocks = [_block_after(heading, "console"), _block_after(heading, "bash")]
    commands = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        commands += [shlex.split(line.lstrip("$ "))[2:] for line in joined.splitlines() if "serve_overhead.py" in line]
    return commands


@pytest.mark.slow
def test_the_serving_overhead_cpu_example_prints_both_sides_and_their_ratio(monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the example names the bundled model by its path in the checkout
    cpu_command = _overhead_commands()[0]
    assert serve_overhead.main(cpu_command) == 0
    printed = capsys.readouterr().out.splitlines()
    shown = _block_after("#### Serving overhead", "console").splitlines()[2:]  # after the two command lines
    assert [line.split()[0] for line in printed[-4:]] == [line.split()[0] for line in shown]
    assert printed[-4] == shown[0]  # the settings line: requests, concurrency, max_num_seqs, model
    assert re.fullmatch(r"server / offline: \d+\.\d{3}", printed[-1])


def test_the_serving_overhead_gpu_example_is_a_valid_command_line():
    gpu_command = _overhead_commands()[1]
    own, serve_argv = serve_overhead.split_argv(gpu_command)
    args = serve_overhead.build_parser().parse_args(own)
    serve_args = unmask_cli.build_parser().parse_args(["serve", *serve_argv])
    assert args.num_requests == 128 and args.policy == [{"cache": "dual"}]
    assert serve_args.load_format == "dummy" and serve_args.device == "cuda" and serve_args.max_num_seqs == 32
