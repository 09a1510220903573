"""The chat app in a real headless browser (Playwright driving Debian's chromium): streaming,
Stop (also for a request still queued), Regenerate, Remove, two tabs at once, text that must not
load anything, a message that is not text, and the page shown when no variant is ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT, stop_process
from playwright import sync_api

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
APP = ROOT / "ChatApp" / "app.py"
SCREENSHOT = ROOT / "tests" / "artifacts" / "chat_app.png"
TOKEN_DELAY = "0.02"  # seconds per token: slow enough to watch an answer grow and stop it



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(cwd: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """Start ChatApp/app.py from `cwd` on a free local port; return it once it serves."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1"}
    log = open(cwd / "app.log", "w")  # noqa: SIM115  # closed with the process
    proc = subprocess.Popen([sys.executable, str(APP), "--port", str(port), *args], cwd=cwd,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError((cwd / "app.log").read_text())
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    stop_app(proc)
    raise AssertionError("the app did not serve within 60 s:\n" + (cwd / "app.log").read_text())


stop_app = stop_process


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The app as a user starts it on a fresh clone: no --variant, so the demo variant."""
    folder = tmp_path_factory.mktemp("chat_app")
    proc, url = start_app(folder, "--provider", "cpu", "--token_delay", TOKEN_DELAY)
    yield url
    stop_app(proc)
    startup = (folder / "app.log").read_text()
    assert "--share" in startup and "share=True" not in startup  # our flag, not Gradio's API


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def open_tab(browser, url: str):
    """A page in its own browser context (its own cookies: a separate Gradio session)."""
    page = browser.new_context(viewport={"width": 1200, "height": 1300}).new_page()
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:"))
            else outside.append(r.url))
    page.outside_requests = outside
    page.goto(url)
    page.wait_for_selector("#message textarea")
    set_number(page, "temperature", 0)  # greedy: the same (long) answers every run
    return page


@pytest.fixture()
def tab(browser, app_url):
    page = open_tab(browser, app_url)
    yield page
    page.context.close()


def send(page, text: str) -> None:
    """Send `text` and wait until the page has taken it (the previous status is gone)."""
    page.fill("#message textarea", text)
    page.click("#send")
    # Poll on a timer: requestAnimationFrame (the default) stalls in a tab in the background.
    page.wait_for_function("() => !document.querySelector('#status').innerText"
                           ".includes('tokens/s')", polling=50)


def set_number(page, elem_id: str, value: float) -> None:
    page.fill(f"#{elem_id} input", str(value))
    page.press(f"#{elem_id} input", "Tab")


def answers(page) -> list[str]:
    return page.locator('#chat [data-testid="bot"]').all_inner_texts()


def questions(page) -> list[str]:
    return page.locator('#chat [data-testid="user"]').all_inner_texts()


def status(page) -> str:
    return page.inner_text("#status")


def wait_for_status(page, fragment: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while fragment not in (text := status(page)):
        assert time.monotonic() < deadline, f"status {text!r} never showed {fragment!r}"
        time.sleep(0.05)
    return text


def settle(page) -> None:
    """Wait until Gradio has closed the streamed event (its last update could otherwise land
    after an instant button's and overwrite it)."""
    page.wait_for_function("() => !document.querySelector('.generating, .pending')",
                           polling=50, timeout=30000)
    time.sleep(0.3)


def watch_answer(page) -> list[int]:
    """Lengths of the last answer seen while it streams, until the final status appears."""
    lengths, deadline = [], time.monotonic() + 30
    while "tokens/s" not in status(page):
        assert time.monotonic() < deadline, status(page)
        shown = answers(page)
        lengths.append(len(shown[-1]) if shown else 0)
        time.sleep(0.03)
    return lengths


def test_page_says_what_the_variant_is_and_sizes_history_to_its_context(tab, app_url):
    assert "King James Bible" in tab.locator("#about").inner_text()
    assert "not Llama 2" in tab.locator("#about").inner_text()
    assert tab.locator("#max_history_tokens input").input_value() == "512"  # the demo's context


def test_answer_streams_and_status_reports_speed(tab):
    send(tab, "the cat sat")
    lengths = watch_answer(tab)
    grown = sorted({n for n in lengths if n})
    assert len(grown) >= 3, lengths  # the text appeared piece by piece
    assert "time to first token" in status(tab) and questions(tab) == ["the cat sat"]
    assert len(answers(tab)) == 1 and answers(tab)[0]
    assert tab.outside_requests == []
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(SCREENSHOT), full_page=True)


def test_stop_ends_a_long_answer(tab):
    set_number(tab, "max_new_tokens", 4000)
    send(tab, "the dog ran far")
    tab.wait_for_function(
        "() => (document.querySelector('#chat [data-testid=bot]')?.innerText || '').length > 3",
        polling=50)
    tab.click("#stop")
    final = wait_for_status(tab, "tokens/s", timeout_s=10)
    assert final.startswith("stopped"), final
    stopped = answers(tab)[-1]
    time.sleep(0.5)
    assert answers(tab)[-1] == stopped and status(tab) == final


def test_regenerate_remove_and_new_conversation(tab):
    set_number(tab, "max_new_tokens", 12)
    set_number(tab, "temperature", 0)  # greedy: regenerating the same prompt gives the same text
    send(tab, "the sun")
    watch_answer(tab)
    settle(tab)
    first, before = answers(tab), status(tab)
    tab.click("#regenerate")
    # The engine is shared with other tabs, so the first answer may also have pre-filled 1
    # token; wait for the regenerated answer's own status line.
    tab.wait_for_function("(before) => { const s = document.querySelector('#status').innerText;"
                          " return s !== before && s.includes('tokens/s')"
                          " && !s.includes('queue'); }", arg=before,
                          polling=50, timeout=30000)
    settle(tab)
    final = wait_for_status(tab, "prefilled 1 of")  # the same prompt, straight from the cache
    assert "tokens/s" in final and answers(tab) == first and questions(tab) == ["the sun"]
    settle(tab)
    tab.click("#remove")
    wait_for_status(tab, "removed the last turn")
    assert questions(tab) == [] and answers(tab) == []
    send(tab, "the moon")
    watch_answer(tab)
    settle(tab)
    tab.click("#new")
    wait_for_status(tab, "new conversation")
    assert questions(tab) == []


def test_two_tabs_keep_separate_conversations(browser, app_url):
    first, second = open_tab(browser, app_url), open_tab(browser, app_url)
    try:
        for page in (first, second):
            set_number(page, "max_new_tokens", 10)
        send(first, "the cat sat")
        send(second, "the dog ran")
        for page in (first, second):
            watch_answer(page)
        send(first, "she was home")
        watch_answer(first)
        assert questions(first) == ["the cat sat", "she was home"]
        assert questions(second) == ["the dog ran"] and len(answers(second)) == 1
    finally:
        first.context.close()
        second.context.close()


def test_stop_applies_to_a_request_waiting_in_the_queue(browser, app_url):
    # Four answers fill the app's four answer slots (one generates, three wait for the engine);
    # a fifth tab's request then waits in Gradio's queue, and its Stop must still hold.
    busy = [open_tab(browser, app_url) for _ in range(4)]
    queued = open_tab(browser, app_url)
    try:
        for page in busy:
            set_number(page, "max_new_tokens", 4000)
            send(page, "the dog ran far")
        deadline = time.monotonic() + 60
        while not all(("generating" in (text := status(page)) or "waiting for another" in text)
                      for page in busy):  # all four answers started (one generates at a time)
            assert time.monotonic() < deadline, [status(page) for page in busy]
            time.sleep(0.05)
        set_number(queued, "max_new_tokens", 200)
        send(queued, "the cat sat")
        wait_for_status(queued, "queue", timeout_s=10)  # Gradio shows its place in the queue
        queued.click("#stop")
        for page in busy:
            page.click("#stop")
        final = wait_for_status(queued, "tokens/s", timeout_s=60)
        assert final.startswith("stopped"), final
        assert int(final.split(" new tokens")[0].rsplit("· ", 1)[1]) <= 1, final
        assert questions(queued) == ["the cat sat"]
    finally:
        for page in [*busy, queued]:
            page.click("#stop")
            page.context.close()


class Recorder(BaseHTTPRequestHandler):
    """Records every request it gets (the server stands for a tracker on the internet)."""

    seen: list[str] = []

    def do_GET(self):  # noqa: N802  # http.server's name
        Recorder.seen.append(self.path)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def tracker():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Recorder.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_text_in_the_chat_loads_nothing(tab, tracker, app_url):
    text = (f"look ![pixel]({tracker}/markdown.png) and <img src=\"{tracker}/html.png\"> "
            f"<video poster=\"{tracker}/poster.png\"></video> [site]({tracker}/link) "
            f"<{tracker}/autolink>\nand on a new line & `<b>code</b>`")
    set_number(tab, "max_new_tokens", 8)
    send(tab, text)
    watch_answer(tab)
    time.sleep(1.0)  # time for any image load to reach the tracker
    assert Recorder.seen == [] and tab.outside_requests == []
    assert questions(tab) == [text]  # shown exactly as typed, as plain text
    assert tab.locator("#chat img, #chat video, #chat a[href]").count() == 0
    with urllib.request.urlopen(app_url, timeout=10) as reply:
        assert "img-src 'self'" in reply.headers["Content-Security-Policy"]


def test_message_that_is_not_text_gets_a_clear_error(tab):
    # A lone surrogate cannot be typed, but a page script or a paste can put one in the box.
    tab.evaluate(r"""() => { const box = document.querySelector('#message textarea');
                             box.value = 'the cat \ud800 sat';
                             box.dispatchEvent(new Event('input', {bubbles: true})); }""")
    tab.click("#send")
    final = wait_for_status(tab, "error:")
    settle(tab)
    # what was typed is kept (not lost with the failed request), and the error says why
    assert tab.evaluate("() => document.querySelector('#message textarea').value") \
        == "the cat \ud800 sat"
    assert "lone surrogate" in final and "U+D800" in final, final
    assert questions(tab) == [] and tab.locator(".toast-body").count() == 0


def test_page_says_what_to_run_when_no_variant_is_ready(browser, tmp_path):
    empty = tmp_path / "empty_root"
    empty.mkdir()
    proc, url = start_app(tmp_path, "--root", str(empty))
    try:
        page = browser.new_page()
        page.goto(url)
        text = page.locator("#no-variant").inner_text(timeout=20_000)
        assert "No variant is ready" in text and "git submodule init" in text
        assert "Traceback" not in page.content()
        page.close()
    finally:
        stop_app(proc)
