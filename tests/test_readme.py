"""The README's examples, run as a new user would copy them (the bundled model answers what the comments say)."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from server_fixtures import live_server  # noqa: F401  (pytest fixture)

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


@pytest.mark.slow
def test_the_offline_api_example_prints_the_answer_its_comment_promises(monkeypatch):
    monkeypatch.chdir(REPO)  # the example names the bundled model by its path in the checkout
    code = _block_after("### Offline API", "python")
    printed = io.StringIO()
    with redirect_stdout(printed):
        exec(compile(code, "README.md (Offline API)", "exec"), {})
    promised = _promised(code, "print(out.text")
    assert printed.getvalue().split() == promised.split()


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
    code = _block_after("### Infilling", "python")
    printed = io.StringIO()
    with redirect_stdout(printed):
        exec(compile(code, "README.md (Infilling)", "exec"), {})
    assert printed.getvalue().strip() == _promised(code, "print(result.texts")
