"""The server's limits and refusals (issue 19): the queue, bodies, connections, hosts, content
types and parameters, each answered in OpenAI's error shape and without a traceback in the log.
An app over a stand-in engine (stub_engine) where no model is needed, tools/serve.py where the
HTTP layer itself is checked."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from stub_engine import chain_engine, piece_ids
from test_serve import KEY, load_cli, start_server, stop_server

from llama2_onnx.errors import UserError
from llama2_onnx.generation import GenerationStats
from llama2_onnx.http_guard import allowed_host_names, host_name
from llama2_onnx.sampling import SamplingSettings
from llama2_onnx.scheduler import Job, QueueFull, Scheduler
from llama2_onnx.server import ApiOptions, create_app

ROOT = Path(__file__).resolve().parent.parent
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture()
def stub(tokenizer):
    """An engine that answers any prompt with " cat sat with you" (then EOS)."""
    return chain_engine(tokenizer, piece_ids(tokenizer, "▁cat", "▁s", "at", "▁with", "▁you"))


def http_client(engine, **options):
    from starlette.testclient import TestClient

    return TestClient(create_app(engine, ApiOptions(**options)))


def completion(http, **changes):
    return http.post("/v1/completions", json={"model": "stub", "prompt": "the",
                                               "temperature": 0, **changes})


class BlockingEngine:
    """Generates one piece once `release` is set; `started` is set when a job runs."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.last_stats = GenerationStats(stop_reason="eos")

    def generate(self, prompt, settings, max_tokens, stop, should_stop):
        self.started.set()
        self.release.wait(30)
        yield "x"


def job(loop) -> Job:
    return Job([1], SamplingSettings(temperature=0), 1, (), loop)


def test_max_queue_0_runs_a_request_when_the_engine_is_free_and_refuses_one_that_would_wait():
    engine, loop = BlockingEngine(), asyncio.new_event_loop()
    scheduler = Scheduler(engine, max_waiting=0)
    try:
        first = job(loop)
        scheduler.submit(first)
        assert engine.started.wait(30)
        with pytest.raises(QueueFull):
            scheduler.submit(job(loop))
        engine.release.set()
        done = loop.run_until_complete(asyncio.wait_for(_last_event(first), 30))
        assert done[0] == "done"
        scheduler.submit(job(loop))  # the engine is free again the moment "done" arrives
    finally:
        engine.release.set()
        scheduler.close()
        loop.close()


async def _last_event(job: Job) -> tuple[str, object]:
    while (event := await job.events.get())[0] == "piece":
        pass
    return event


def test_max_queue_0_answers_one_request_after_another(stub):
    with http_client(stub, max_queue=0) as http:
        replies = [completion(http, max_tokens=3) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert replies[0].json()["choices"][0]["text"] == " cat sat"


def streamed(http, path: str, body: dict) -> tuple[str, list[dict]]:
    """The text of a streamed response and its chunks (the stream must end with [DONE])."""
    with http.stream("POST", path, json={**body, "stream": True}) as reply:
        assert reply.status_code == 200
        events = [line.removeprefix("data: ") for line in reply.iter_lines()
                  if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    key = "text" if path == "/v1/completions" else "content"
    text = "".join((c["choices"][0].get(key) or c["choices"][0].get("delta", {}).get(key) or "")
                   for c in chunks if c["choices"])
    return text, chunks


@pytest.mark.parametrize("stop, max_tokens, text, finish, tokens", [
    ("t sat w", 20, " ca", "stop", 4),  # over the pieces " cat", " s", "at", " with"
    ([" sat", "zz"], 3, " cat", "stop", 3),  # completed by the last allowed token
    (" sat", 2, " cat s", "length", 2),
    (None, 20, " cat sat with you", "stop", 5),  # then EOS, which is not a completion token
])
def test_stop_strings_and_finish_reasons_streamed_and_whole(stub, stop, max_tokens, text,
                                                             finish, tokens):
    body = {"model": "stub", "prompt": "the", "temperature": 0, "max_tokens": max_tokens,
            "stop": stop, "stream_options": {"include_usage": True}}
    with http_client(stub) as http:
        whole = completion(http, max_tokens=max_tokens, stop=stop).json()
        got, chunks = streamed(http, "/v1/completions", body)
        chat = http.post("/v1/chat/completions", json={
            "model": "stub", "messages": [{"role": "user", "content": "the"}],
            "temperature": 0, "max_tokens": max_tokens, "stop": stop}).json()
    assert (whole["choices"][0]["text"], whole["choices"][0]["finish_reason"]) == (text, finish)
    assert (got, chunks[-2]["choices"][0]["finish_reason"]) == (text, finish)
    assert chat["choices"][0]["message"]["content"] == text.lstrip()
    assert chat["choices"][0]["finish_reason"] == finish
    for usage in (whole["usage"], chunks[-1]["usage"], chat["usage"]):
        assert usage["completion_tokens"] == tokens


@pytest.mark.parametrize("stop, message", [
    (["a"] * 5, "stop has 5 strings; use at most 4."),
    ("x" * 257, "a stop string has 257 characters; use at most 256 characters per stop string."),
    (["ok", "x" * 2**20], "a stop string has 1048576 characters; use at most 256"),
    ([""], "stop must be a non-empty string or a list of up to 4 of them, not ['']."),
    ({"a": 1}, "stop must be a non-empty string"),
])
def test_stop_strings_are_bounded_in_number_and_length(stub, stop, message):
    with http_client(stub) as http:
        reply = completion(http, stop=stop)
    assert reply.status_code == 400 and set(reply.json()["error"]) == ERROR_FIELDS
    error = reply.json()["error"]
    assert error["param"] == "stop" and error["message"].startswith(message)
    assert len(error["message"]) < 200


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """tools/serve.py with its default limits (flags that existed before issue 19 only)."""
    proc, url, log = start_server(tmp_path_factory.mktemp("plain"), "--api-key", KEY)
    yield SimpleNamespace(url=url, log=log, port=port_of(url))
    stop_server(proc)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """tools/serve.py with short time limits, 3 connections at most and two more Host names."""
    proc, url, log = start_server(tmp_path_factory.mktemp("guarded"), "--api-key", KEY,
                                  "--body_timeout", "3", "--header_timeout", "2",
                                  "--max-connections", "3", "--allowed-host", "LLM.example:80",
                                  "--allowed_host", "10.1.2.3")
    yield SimpleNamespace(url=url, log=log, port=port_of(url))
    stop_server(proc)


def head(path: str = "/v1/completions", host: str = "127.0.0.1", **fields: str) -> bytes:
    """A POST request's head: Host, the key, JSON, and `fields` (Content_Length=...)."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {KEY}",
             "Content-Type: application/json"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"the connection closed after {data!r}"
        data += more
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = top.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        more = sock.recv(65536)
        assert more, "the connection closed inside the body"
        body += more
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes the connection (reading what it still sends first)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def assert_openai_error(status: int, body: bytes, expected: int, words: str) -> dict:
    error = json.loads(body)["error"]
    assert status == expected and set(error) == ERROR_FIELDS and words in error["message"]
    return error


def wait_for_log(log, text: str, seconds: float = 20) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and text not in log.read_text():
        time.sleep(0.1)
    return log.read_text()


def test_a_chunked_body_is_refused_as_soon_as_it_passes_8_mib(plain):
    chunk = b"x" * 2**20
    with socket.create_connection(("127.0.0.1", plain.port), timeout=60) as sock:
        sock.sendall(head(Transfer_Encoding="chunked"))
        for _ in range(8):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"1\r\nx\r\n")  # one byte over 8 MiB, and the body goes on
        status, headers, body = read_response(sock)
        assert_openai_error(status, body, 413, "over 8 MiB")
        assert headers["connection"] == "close" and closed_by_server(sock)


def test_a_body_that_never_finishes_is_408_and_the_connection_closes(guarded):
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=60) as sock:
        sock.sendall(head(Content_Length="100") + b'{"model": ')
        status, headers, body = read_response(sock)
        error = assert_openai_error(status, body, 408, "did not arrive within 3 s")
        assert error["code"] == "request_timeout" and closed_by_server(sock)


def test_a_client_leaving_mid_body_is_one_quiet_log_line(plain):
    with socket.create_connection(("127.0.0.1", plain.port), timeout=60) as sock:
        sock.sendall(head(Content_Length="100") + b'{"model": ')
    log = wait_for_log(plain.log, "went away")
    assert log.count("the client went away before sending its whole request") == 1
    assert "Traceback" not in log and "Exception" not in log


READY_SCRIPT = r"""
import logging, os, re, socket, sys
from pathlib import Path
from llama2_onnx.placement import RunOptions
from llama2_onnx.server import ServerOptions, serve

class ConnectWhenReady(logging.Handler):
    def emit(self, record):
        if found := re.search(r"serving .* at http://127\.0\.0\.1:(\d+)/v1", record.getMessage()):
            try:
                socket.create_connection(("127.0.0.1", int(found[1])), timeout=30).close()
                print("connected", flush=True)
            except OSError as exc:
                print(f"could not connect: {exc}", flush=True)
            os._exit(0)

logging.getLogger("llama2_onnx.server").addHandler(ConnectWhenReady())
logging.getLogger("llama2_onnx.server").setLevel(logging.INFO)
serve(ServerOptions(variant=Path(sys.argv[1]), run=RunOptions(provider="cpu"), port=0))
"""


def test_the_server_says_it_is_serving_only_once_it_accepts_connections():
    """The "serving ... at" line is what scripts wait for: a connection made while it is being
    logged (inside the logging call, before anything else runs) must be accepted."""
    done = subprocess.run([sys.executable, "-c", READY_SCRIPT, str(ROOT / "demo")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout == "connected\n", done.stdout + done.stderr


def test_the_serve_benchmark_waits_for_health_and_reports_each_level():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "serve",
                           "--variant", "demo", "--clients", "1,2", "--requests-per-client", "1",
                           "--new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [level["requests"] for level in report["levels"]] == [1, 2]
    assert report["prefix_reuse"]["warm"]["prefilled_tokens"] < report["prefix_reuse"]["cold"][
        "prefilled_tokens"]


def nested(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,  # deeper than json.loads can go
    json.dumps({"model": "stub", "prompt": "the", "stop": nested(64)}).encode(),  # 65 levels
])
def test_deeply_nested_json_is_a_400_in_openais_shape(stub, body):
    with http_client(stub) as http:
        reply = http.post("/v1/completions", content=body,
                          headers={"Content-Type": "application/json"})
    assert_openai_error(reply.status_code, reply.content, 400, "nested more than 64 levels")


def test_64_levels_of_json_are_read(stub):
    with http_client(stub) as http:
        reply = completion(http, stop=nested(63))
    assert_openai_error(reply.status_code, reply.content, 400, "stop must be")


def test_deeply_nested_json_leaves_no_traceback_in_the_log(plain):
    request = urllib.request.Request(plain.url + "/completions", b"[" * 100_000, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert_openai_error(caught.value.code, caught.value.read(), 400, "nested more than 64")
    assert "Traceback" not in plain.log.read_text()


CHAT = {"model": "stub", "messages": [{"role": "user", "content": "the"}], "temperature": 0}
COMPLETION = {"model": "stub", "prompt": "the", "temperature": 0}


@pytest.mark.parametrize("path, request_body, param, words", [
    ("/v1/completions", {**COMPLETION, "max_new_tokens": 3}, "max_new_tokens",
     "unknown parameter 'max_new_tokens' (did you mean 'max_tokens'?); remove or rename it"),
    ("/v1/chat/completions", {**CHAT, "temprature": 0.5}, "temprature",
     "unknown parameter 'temprature' (did you mean 'temperature'?)"),
    ("/v1/chat/completions", {**CHAT, "prompt": "the"}, "prompt",
     "unknown parameter 'prompt' (this endpoint reads 'messages')"),
    ("/v1/completions", {**COMPLETION, "messages": []}, "messages",
     "unknown parameter 'messages' (this endpoint reads 'prompt')"),
    ("/v1/completions", {**COMPLETION, "a1": 1, "a2": 2, "a3": 3, "a4": 4}, "a1",
     "unknown parameters 'a1', 'a2', 'a3' and 1 more;"),
    ("/v1/completions", {**COMPLETION, "user": 7}, "user", "user=7 is invalid"),
])
def test_unknown_parameters_are_refused_by_name(stub, path, request_body, param, words):
    with http_client(stub) as http:
        reply = http.post(path, json=request_body)
    error = assert_openai_error(reply.status_code, reply.content, 400, words)
    assert error["param"] == param


@pytest.mark.parametrize("path, request_body", [(p, r) for p, r in (
    ("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION))])
def test_documented_parameters_that_change_nothing_are_accepted(stub, path, request_body):
    harmless = {"user": "u-1", "n": 1, "logprobs": False, "top_logprobs": None,
                "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "tools": [],
                "tool_choice": "none", "response_format": {"type": "text"}, "seed": 3,
                "top_p": 1, "top_k": 0, "repetition_penalty": 1.0, "max_completion_tokens": 2,
                "stop": None, "echo": False, "best_of": 1, "suffix": None}
    with http_client(stub) as http:
        whole = http.post(path, json={**request_body, **harmless})
        text, _ = streamed(http, path, {**request_body, **harmless,
                                        "stream_options": {"include_usage": True}})
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    assert text == choice.get("text", choice.get("message", {}).get("content"))


def ask(server, method: str, path: str, host: str | None = None, body: bytes | None = None,
        content_type: str | None = "application/json") -> tuple[int, bytes]:
    """One request over http.client with the key, an explicit Host and Content-Type."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Authorization": f"Bearer {KEY}", "Host": host or f"127.0.0.1:{server.port}"}
    if content_type:
        headers["Content-Type"] = content_type
    conn.request(method, path, body, headers)
    reply = conn.getresponse()
    status, data = reply.status, reply.read()
    conn.close()
    return status, data


ONE_TOKEN = json.dumps({"model": "demo", "prompt": "And", "max_tokens": 1}).encode()


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_post_body_that_is_not_declared_json_is_415(plain, content_type):
    status, body = ask(plain, "POST", "/v1/completions", body=ONE_TOKEN,
                       content_type=content_type)
    error = assert_openai_error(status, body, 415, "Content-Type: application/json")
    assert error["code"] == "unsupported_media_type"
    assert ask(plain, "POST", "/v1/completions", body=ONE_TOKEN,
               content_type="Application/JSON; charset=utf-8")[0] == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example",
                                  "127.0.0.1.evil.example", ""])
def test_a_server_on_loopback_answers_only_loopback_host_names(plain, host):
    for path in ("/health", "/v1/models"):
        status, body = ask(plain, "GET", path, host=host or " ")
        error = assert_openai_error(status, body, 400, "--allowed-host")
        assert error["code"] == "invalid_host"
    status, _ = ask(plain, "POST", "/v1/completions", host=host or " ", body=ONE_TOKEN)
    assert status == 400


@pytest.mark.parametrize("host", ["localhost", "LocalHost:8000", "127.0.0.1", "[::1]:1234"])
def test_loopback_host_names_are_answered(plain, host):
    assert ask(plain, "GET", "/v1/models", host=host)[0] == 200


def test_allowed_host_adds_names(guarded):
    for host in ("llm.example", "LLM.EXAMPLE:8080", "10.1.2.3:9", "localhost"):
        assert ask(guarded, "GET", "/v1/models", host=host)[0] == 200, host
    assert ask(guarded, "GET", "/v1/models", host="other.example")[0] == 400


def test_host_names_are_checked_on_loopback_or_when_given():
    assert host_name(" [::1]:80 ") == "[::1]" and host_name("A.b:1") == "a.b"
    assert allowed_host_names("127.0.0.1") == {"localhost", "127.0.0.1", "[::1]"}
    assert allowed_host_names("::1", ["x.y"]) == {"localhost", "127.0.0.1", "[::1]", "x.y"}
    assert allowed_host_names("0.0.0.0") is None and allowed_host_names("10.0.0.5") is None
    assert allowed_host_names("10.0.0.5", ["x.y"]) == {"localhost", "127.0.0.1", "[::1]", "x.y",
                                                      "10.0.0.5"}
    assert "x.y" in allowed_host_names("0.0.0.0", ["x.y:80"])


def connect(server, timeout: float = 60) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def test_a_connection_that_never_finishes_its_head_is_closed(plain):
    with connect(plain) as sock:  # the default limit, 10 s
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert sock.recv(100) == b""


def test_a_silent_or_trickling_connection_is_closed_after_the_head_time_limit(guarded):
    with connect(guarded) as silent, connect(guarded) as trickling:
        trickling.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, _ = read_response(trickling)  # a whole request is answered, and then
        for _ in range(3):  # the next head must come whole within the limit, too
            trickling.sendall(b"G")
            time.sleep(0.2)
        assert status == 200 and closed_by_server(trickling) and silent.recv(100) == b""


def busy(server) -> socket.socket:
    """A connection inside a request: its head read (the server asked for the body with
    100 Continue), its body not sent."""
    sock = connect(server)
    sock.sendall(head(Content_Length="100", Expect="100-continue"))
    assert sock.recv(100).startswith(b"HTTP/1.1 100 ")
    return sock


def test_past_max_connections_the_idle_one_makes_room_or_a_new_one_gets_503(guarded):
    idle = [connect(guarded) for _ in range(3)]
    time.sleep(0.2)  # accepted, in this order
    status, _ = ask(guarded, "GET", "/health")  # the oldest idle connection makes room
    assert status == 200 and closed_by_server(idle[0])
    for sock in idle[1:]:
        sock.close()
    working = []
    try:
        working = [busy(guarded) for _ in range(3)]
        with connect(guarded) as extra:
            status, headers, body = read_response(extra)
            error = assert_openai_error(status, body, 503, "3 connections open; retry shortly")
            assert error["code"] == "too_many_connections" and headers["retry-after"] == "1"
    finally:
        for sock in working:
            sock.close()
    deadline = time.monotonic() + 30
    while ask(guarded, "GET", "/health")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)  # the closed ones are let go
    log = guarded.log.read_text()
    assert log.count("connections are open, all in requests") == 1 and "Traceback" not in log


@pytest.mark.parametrize("flag", [True, False])
def test_a_key_with_a_trailing_newline_is_used_without_it(monkeypatch, caplog, flag):
    cli = load_cli()
    monkeypatch.setenv("LLAMA2_ONNX_API_KEY", "" if flag else KEY + "\r\n")
    caplog.set_level("INFO", logger="llama2_onnx.server")
    options = cli.options_from_args(cli.parse_args(["--api-key", f" {KEY}\n"] if flag else []))
    assert options.api_key == KEY
    source = "--api-key" if flag else "$LLAMA2_ONNX_API_KEY"
    assert [r.getMessage() for r in caplog.records] == [
        f"the key in {source} had whitespace around it (a file's trailing newline?); using it "
        "without"]


def test_an_empty_key_in_the_environment_is_refused_not_taken_for_no_key(monkeypatch):
    cli = load_cli()
    monkeypatch.setenv("LLAMA2_ONNX_API_KEY", "  \n")
    with pytest.raises(UserError, match=r"^\$LLAMA2_ONNX_API_KEY is empty; give a key, or leave"):
        cli.options_from_args(cli.parse_args([]))
    monkeypatch.delenv("LLAMA2_ONNX_API_KEY")
    assert cli.options_from_args(cli.parse_args([])).api_key is None


@pytest.mark.parametrize("field", ["model", "n", "logprobs", "max_tokens", "stream",
                                   "temperature", "seed", "messages"])
def test_a_huge_value_is_quoted_short_in_the_error(stub, field):
    huge = "x" * 2**20
    value = [{"role": "user", "content": [huge]}] if field == "messages" else huge
    with http_client(stub) as http:
        reply = http.post("/v1/chat/completions", json={**CHAT, field: value})
    assert reply.status_code in (400, 404) and set(reply.json()["error"]) == ERROR_FIELDS
    assert len(reply.json()["error"]["message"]) < 400  # also what the log line quotes
