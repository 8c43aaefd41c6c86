"""lm-evaluation-harness, unchanged, against a live server of the bundled model: the README's commands.

The `lm_eval` command (a pinned test dependency) runs exactly as README's "Evaluating with
lm-eval" writes it (only the server's address, the task directory and the output path
differ), offline, on local task files of held-out problems (`benchmarks/lmeval_tasks.py`,
fewer of them than the README's run): generation through `local-completions` (remote
tokenizer, token-id prompts) and `local-chat-completions`, and a multiple-choice task
(lm-eval's loglikelihood requests: echo + logprobs) whose distractors are wrong answers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from benchmarks.lmeval_tasks import write_tasks
from server_fixtures import BUNDLED_MODEL, LiveServer, serve_in_thread
from unmask.server.settings import ServerSettings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
README_URL = "http://127.0.0.1:8000"
README_TASKS = "/tmp/unmask-tasks"
GEN_PER_FAMILY = 2
MC_PROBLEMS = 8
MC_CHOICES = 3


def readme_lm_eval_commands() -> list[list[str]]:
    """The `lm_eval` commands of README's lm-eval section, as argument lists."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("### Evaluating with lm-eval")
    block = re.search(r"```bash\n(.*?)```", readme[start:], re.DOTALL).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.startswith("lm_eval ")]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    if not (BUNDLED_MODEL / "config.json").is_file():
        pytest.skip("the bundled model models/unmask-tiny is not in this checkout")
    yield from serve_in_thread(BUNDLED_MODEL, ServerSettings(), kv_cache_memory=64 * 2**20)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lmeval-tasks")
    write_tasks(path, GEN_PER_FAMILY, MC_PROBLEMS, MC_CHOICES)
    return path


def run_readme_command(index: int, server: LiveServer, task_dir: Path, out: Path) -> dict:
    """Run the README's index-th lm_eval command against `server`; return its results by task."""
    command = [arg.replace(README_URL, server.base_url).replace(README_TASKS, str(task_dir)) for arg in readme_lm_eval_commands()[index]]
    command[0] = str(Path(sys.executable).with_name("lm_eval"))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf")}
    done = subprocess.run([*command, "--output_path", str(out)], env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-4000:]
    (results_file,) = out.glob("**/results_*.json")
    return json.loads(results_file.read_text())["results"]


def test_the_readme_has_one_command_per_model_type():
    assert [command[:3] for command in readme_lm_eval_commands()] == [
        ["lm_eval", "--model", "local-completions"],
        ["lm_eval", "--model", "local-chat-completions"],
    ]


def test_local_completions_runs_generation_and_multiple_choice_with_its_defaults(server, task_dir, tmp_path):
    results = run_readme_command(0, server, task_dir, tmp_path)
    assert results["unmask_tiny_gen"]["exact_match,answer"] >= 0.75
    assert results["unmask_tiny_mc"]["acc,none"] >= 0.7  # chance is 1/3


def test_local_chat_completions_runs_generation(server, task_dir, tmp_path):
    results = run_readme_command(1, server, task_dir, tmp_path)
    assert results["unmask_tiny_chat"]["exact_match,answer"] >= 0.75
