"""The playground page at `/`, served by a real server and driven in a real headless Chromium.

The browser tests need Debian's `chromium` (installed here with apt when missing and we
are root) and the `playwright` Python package, which drives that binary over CDP; no
browser is downloaded. Each test's screenshot lands in its tmp_path; set
UNMASK_PLAYGROUND_SCREENSHOT=docs/playground.png to also refresh the README's image.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from unmask.server.routes.playground import ASSETS, EXAMPLES
from unmask.server.settings import ServerSettings
from server_fixtures import BUNDLED_MODEL, LiveServer, model_dir_for_tests, serve_in_thread

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ENGINE_OPTIONS = {"max_num_seqs": 2, "max_waiting": 4, "kv_cache_memory": 32 * 2**20}
KEY = "playground-key-42"
# In the bundled model's chat format, so a trained model writes text (out of its tasks it ends at once).
PROMPT = "<|user|>\nSort these words in alphabetical order: rose, apple, moon<|eot|>\n<|assistant|>\n"
CHAT_MESSAGE = "What is 12 plus 30?"
# Small blocks and fixed steps, so the run has several steps per block (4 tokens each) and more than one block.
PARAMS = {"max_tokens": 32, "block_length": 16, "steps": 4, "cache": "dual", "unmask": "low_confidence", "seed": 7}

# Records every state the current-block view passes through: masked chips and fresh (just committed) spans.
RECORD_BLOCK_STATES = """() => {
  window.blockStates = [];
  const block = document.getElementById("block");
  new MutationObserver(() => window.blockStates.push({
    masks: block.querySelectorAll(".mask").length,
    fresh: block.querySelectorAll(".fresh").length,
    caption: document.getElementById("block-caption").textContent,
  })).observe(block, {childList: true, subtree: true, characterData: true});
}"""


# --- fixtures -------------------------------------------------------------------------------------


def _chromium() -> str:
    """The system Chromium, installed with apt if it is missing (skips only where that is impossible)."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("Chromium is not installed and cannot be installed here (needs apt-get as root): apt-get install chromium")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0:
            pytest.skip(f"could not install Chromium with apt ({' '.join(cmd)}): {done.stderr[-500:]}")
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("apt installed chromium but no `chromium` binary is on PATH")
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra: pip install -e '.[test]'")
    executable = _chromium()
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        yield context
        context.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return model_dir_for_tests(tmp_path_factory)


@pytest.fixture(scope="module")
def open_server(model_dir) -> Iterator[LiveServer]:
    yield from serve_in_thread(model_dir, ServerSettings(), **ENGINE_OPTIONS)


@pytest.fixture(scope="module")
def keyed_server(model_dir) -> Iterator[LiveServer]:
    yield from serve_in_thread(model_dir, ServerSettings(api_key=KEY), **ENGINE_OPTIONS)


@pytest.fixture
def page(browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" and not _expected(msg.text) else None)
    yield page
    page.close()
    assert not errors, f"the page logged errors: {errors}"


def _expected(console_error: str) -> bool:
    """Chromium logs every 4xx fetch; the wrong-key test provokes a 401 on purpose."""
    return console_error.startswith("Failed to load resource") and "401" in console_error


# --- helpers --------------------------------------------------------------------------------------


def open_playground(page, server: LiveServer) -> None:
    page.goto(server.base_url + "/")
    page.locator("#cache option[value=dual]").wait_for(state="attached")  # policies read from /openapi.json
    page.evaluate(RECORD_BLOCK_STATES)


def set_params(page, params: dict, pace_ms: int = 20) -> None:
    page.fill("#max_tokens", str(params["max_tokens"]))
    page.fill("#block_length", str(params["block_length"]))
    page.fill("#steps", str(params["steps"]))
    page.select_option("#cache", params["cache"])
    page.select_option("#unmask", params["unmask"])
    page.fill("#temperature", "0")
    page.fill("#seed", str(params["seed"]))
    page.fill("#pace", str(pace_ms))


def submit_and_wait(page, text: str) -> str:
    """Type `text`, press Enter in the prompt box, wait for the run to end; returns its final state."""
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    ended = "#status:is([data-state=done], [data-state=error], [data-state=stopped])"
    page.locator(ended).wait_for(timeout=60_000)  # a selector, not a JS predicate: the page's CSP forbids eval
    return page.get_attribute("#status", "data-state")


def api_body(params: dict) -> dict:
    """The same request as the page sends, minus streaming."""
    return {**{k: v for k, v in params.items() if k != "max_tokens"}, "temperature": 0}


def assert_unmasked_step_by_step(page, params: dict) -> None:
    states = [s for s in page.evaluate("window.blockStates") if s["caption"]]
    assert any(s["masks"] > 0 for s in states), "masked placeholders were never drawn"
    assert any(s["fresh"] > 0 for s in states), "newly committed tokens were never highlighted"
    views = [tuple(map(int, re.search(r"block (\d+), step (\d+), (\d+) of", s["caption"]).groups())) for s in states]
    for (block, step, masked), (next_block, next_step, next_masked) in zip(views, views[1:]):
        assert next_block > block or (next_block == block and next_step > step and next_masked < masked), views
    assert [s["masks"] for s in states] == [masked for _, _, masked in views]  # one chip per masked token
    per_step = params["block_length"] // params["steps"]
    assert page.text_content("#fig-tps") == f"{per_step:.2f}"  # fixed steps: exactly this many tokens per pass
    assert int(page.text_content("#fig-steps")) >= len({block for block, _, _ in views})
    assert f"cache {params['cache']}" in page.text_content("#fig-policy")


def screenshot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)  # the test's output, kept in pytest's basetemp


def refresh_readme_screenshot(page, target: str) -> None:
    """Run the prompt again, slowly, and capture a step where masked and just-committed tokens both show."""
    page.fill("#pace", "500")
    page.press("#prompt", "Enter")
    page.locator("#block:has(.mask):has(.fresh)").wait_for(timeout=60_000)
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=target)
    page.locator("#status[data-state=done]").wait_for(timeout=60_000)


# --- tests ----------------------------------------------------------------------------------------


def test_root_serves_the_page_and_its_assets_with_no_external_urls(open_server):
    with httpx.Client(base_url=open_server.base_url, timeout=30) as http:
        index = http.get("/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in index.headers["content-security-policy"]
        referenced = re.findall(r'(?:src|href)="([^"]+)"', index.text)
        assert sorted(referenced) == ["#prompt", "/playground/playground.css", "/playground/playground.js", "data:,"]
        bodies = {"index.html": index.text}
        for name in ("playground.js", "playground.css"):
            reply = http.get(f"/playground/{name}")
            assert reply.status_code == 200 and reply.headers["content-type"] == ASSETS[name]
            bodies[name] = reply.text
        for name, text in bodies.items():
            assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.IGNORECASE), f"{name} names another host"
        assert http.get("/playground/app.py").status_code == 404
        assert "/" not in http.get("/openapi.json").json()["paths"]  # the page is not part of the API


def test_page_shows_blocks_unmasking_and_ends_with_the_non_streamed_text(open_server, page, tmp_path):
    open_playground(page, open_server)
    page.check("input[name=mode][value=completion]")
    assert page.is_hidden("#key-form")  # no key on this server, so the page does not ask for one
    set_params(page, PARAMS)
    assert submit_and_wait(page, PROMPT) == "done", page.text_content("#error")

    with open_server.http(auth=False) as http:
        reply = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": PARAMS["max_tokens"], **api_body(PARAMS)})
    assert reply.status_code == 200
    assert page.text_content("#final-text") == reply.json()["choices"][0]["text"]
    assert_unmasked_step_by_step(page, PARAMS)
    screenshot(page, tmp_path, "playground-completion.png")
    if target := os.environ.get("UNMASK_PLAYGROUND_SCREENSHOT"):
        refresh_readme_screenshot(page, target)


def test_page_asks_for_the_api_key_and_chats_with_it(keyed_server, page, tmp_path):
    open_playground(page, keyed_server)
    page.check("input[name=mode][value=chat]")
    set_params(page, PARAMS)
    assert page.is_visible("#api-key")

    page.fill("#api-key", "wrong-key")
    assert submit_and_wait(page, CHAT_MESSAGE) == "error"
    assert "API key" in page.text_content("#error")

    page.fill("#api-key", KEY)
    assert submit_and_wait(page, CHAT_MESSAGE) == "done", page.text_content("#error")
    assert page.evaluate("sessionStorage.getItem('unmask.playground.apiKey')") == KEY

    body = {"messages": [{"role": "user", "content": CHAT_MESSAGE}], "max_completion_tokens": PARAMS["max_tokens"]}
    with keyed_server.http(auth=True) as http:
        reply = http.post("/v1/chat/completions", json={**body, **api_body(PARAMS)})
    assert reply.status_code == 200
    answer = reply.json()["choices"][0]["message"]["content"]
    assert page.text_content("#final-text") == answer
    assert page.text_content("#conversation .turn.assistant") == "Model: " + answer
    assert_unmasked_step_by_step(page, PARAMS)
    screenshot(page, tmp_path, "playground-chat.png")


def test_method_parameters_show_only_while_their_method_is_selected(open_server, page):
    open_playground(page, open_server)
    page.select_option("#unmask", "threshold")  # low_confidence has a parameter of its own (alg_temp)
    refresh = page.locator("#mf-dkv_refresh")
    assert refresh.is_hidden()
    page.select_option("#cache", "dkv")
    assert refresh.is_visible() and page.get_attribute("#mf-dkv_refresh", "placeholder").startswith("default ")
    page.fill("#mf-dkv_refresh", "2")
    set_params(page, {**PARAMS, "cache": "dkv", "unmask": "threshold", "max_tokens": 16})
    # The server refuses a method's field on a request using another method, so a done run shows only dkv's was sent.
    assert submit_and_wait(page, PROMPT) == "done", page.text_content("#error")
    page.select_option("#cache", "dual")
    assert refresh.is_hidden()


def test_a_parameter_several_methods_read_shows_under_each_of_them(open_server, page):
    open_playground(page, open_server)
    window = page.locator("#mf-suffix_window")
    for cache, shown in (("dual", True), ("freecache", False), ("dkv", True), ("dllm-cache", False), ("none", True)):
        page.select_option("#cache", cache)
        assert window.is_visible() == shown, cache
    assert page.get_attribute("#mf-suffix_window", "placeholder") == "default"  # off unless set


# The right answer to each example prompt the page offers (the bundled model's task formats).
EXAMPLE_ANSWERS = {
    "What is 12 + 30?": "42",
    "Lucy has 54 eggs. Lucy buys 8 bags with 4 eggs in each bag. How many eggs does Lucy have now?": "86",
    "What is the code of ocelot?": "6961",
    "What is the code of anchor?": "4979",
    "Sort these numbers from smallest to largest: 42, 7, 19": "7, 19, 42",
    "Reverse this list: 16, 48, 67, 36, 68": "68, 36, 67, 48, 16",
    "How many times does owl appear in the list?": "2",
    "How many times does yarn appear in the list?": "4",
}
TASK_FAMILIES = {"arithmetic", "recall", "lists", "count"}
needs_bundled_model = pytest.mark.skipif(
    not (BUNDLED_MODEL / "config.json").is_file(), reason="the answers are the bundled model's"
)


def expected_answer(prompt: str) -> str:
    return next(answer for question, answer in EXAMPLE_ANSWERS.items() if prompt.endswith(question))


def run_and_wait(page, start) -> str:
    """Run `start()` (a click that starts a request) and wait for that run to end; returns its final state."""
    page.evaluate("() => { document.getElementById('status').dataset.state = 'clicked'; }")
    start()
    ended = "#status:is([data-state=done], [data-state=error], [data-state=stopped])"
    page.locator(ended).wait_for(timeout=60_000)
    return page.get_attribute("#status", "data-state")


@needs_bundled_model
def test_the_default_prompt_and_mode_get_a_right_answer(open_server, page):
    open_playground(page, open_server)
    assert page.is_checked("input[name=mode][value=chat]")
    prompt = page.input_value("#prompt")
    assert run_and_wait(page, lambda: page.click("#generate")) == "done", page.text_content("#error")
    assert page.text_content("#final-text") == f"Answer: {expected_answer(prompt)}"


@needs_bundled_model
def test_each_example_prompt_gets_a_right_answer_in_one_click(open_server, page):
    open_playground(page, open_server)
    page.check("input[name=mode][value=completion]")  # a click switches to chat by itself
    buttons = page.locator("#examples button.example")
    assert buttons.count() == len(EXAMPLES)
    assert {buttons.nth(i).get_attribute("data-family") for i in range(buttons.count())} == TASK_FAMILIES
    for i, example in enumerate(EXAMPLES):
        assert run_and_wait(page, buttons.nth(i).click) == "done", (example.label, page.text_content("#error"))
        assert page.input_value("#prompt") == "", example.label  # sent as a chat message
        final = page.text_content("#final-text")
        assert final.endswith(f"Answer: {expected_answer(example.prompt)}"), (example.label, final)
        assert page.locator("#conversation .turn.user").count() == 1  # each example starts a new chat


def test_docs_renders_the_api_with_no_request_to_another_host(open_server, page):
    other_hosts: list[str] = []

    def only_this_server(route):
        if route.request.url.startswith(open_server.base_url):
            route.continue_()
        else:
            other_hosts.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_server)
    page.goto(open_server.base_url + "/docs")
    page.locator(".opblock-summary-path[data-path='/v1/chat/completions']").wait_for(timeout=30_000)
    assert not other_hosts
