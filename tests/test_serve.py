"""The OpenAI-compatible server: a real server process on the demo variant, driven by the official
`openai` client (and raw HTTP where the wire format itself is checked)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from conftest import stop_process

from llama2_onnx.chat_format import Message, PromptBuilder
from llama2_onnx.openai_api import ApiError, parse_request

ROOT = Path(__file__).resolve().parent.parent
SERVE = ROOT / "tools" / "serve.py"
KEY = "test-key-5b1d"
GREEDY = dict(model="demo", temperature=0)


def start_server(tmp: Path, *args: str, env: dict | None = None
                 ) -> tuple[subprocess.Popen, str, Path]:
    """tools/serve.py on the demo variant and a free port; (process, base URL, log file)."""
    log = tmp / "serve.log"
    out = open(log, "w")  # noqa: SIM115  # closed with the process
    env = {**os.environ, "NO_PROXY": "127.0.0.1", **(env or {})}
    proc = subprocess.Popen([sys.executable, str(SERVE), "--variant", "demo", "--provider",
                             "cpu", "--port", "0", *args], stdout=out, stderr=subprocess.STDOUT,
                            env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if found := re.search(r"at (http://127\.0\.0\.1:\d+/v1)", log.read_text()):
            return proc, found.group(1), log
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop_server(proc)
    raise AssertionError("the server did not start:\n" + log.read_text())


stop_server = stop_process


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url, log = start_server(tmp_path_factory.mktemp("serve"), "--max-seq-len", "256",
                                  env={"LLAMA2_ONNX_API_KEY": KEY})
    yield SimpleNamespace(url=url, log=log)
    stop_server(proc)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def chat(client, text: str, **kw):
    return client.chat.completions.create(
        messages=[{"role": "user", "content": text}], **{**GREEDY, **kw})


def streamed_chat(client, text: str, **kw) -> tuple[str, list]:
    chunks = list(chat(client, text, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def post(url: str, body: dict, key: str = KEY) -> tuple[int, bytes]:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_models_lists_the_variant_and_health_needs_no_key(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["demo"] and models[0].object == "model"
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health", timeout=10) as reply:
        assert json.loads(reply.read())["status"] == "ok"


def test_chat_whole_and_streamed_give_the_same_answer(client):
    whole = chat(client, "And God said", max_tokens=20)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content and not choice.message.content[0].isspace()
    assert whole.usage.prompt_tokens == 4 and whole.usage.completion_tokens == 20
    assert whole.usage.total_tokens == 24 and whole.object == "chat.completion"
    text, chunks = streamed_chat(client, "And God said", max_tokens=20,
                                 stream_options={"include_usage": True})
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_stream_is_server_sent_events_ending_with_done(server):
    status, raw = post(server.url + "/completions", {**GREEDY, "prompt": "In the beginning",
                                                     "max_tokens": 6, "stream": True})
    events = raw.decode().split("\n\n")
    assert status == 200 and events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def test_completion_continues_the_prompt(client):
    reply = client.completions.create(prompt="And God said", max_tokens=8, **GREEDY)
    assert reply.choices[0].text.startswith(" ") and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.object == "text_completion"
    streamed = client.completions.create(prompt="And God said", max_tokens=8, stream=True,
                                         **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_stop_strings_end_the_answer_before_them(client):
    free = chat(client, "And God said", max_tokens=30).choices[0].message.content
    stop = free[free.index(",", 3):][:2]  # a comma and the character after it
    reply = chat(client, "And God said", max_tokens=30, stop=[stop, "zzz"])
    assert reply.choices[0].message.content == free[:free.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    text, chunks = streamed_chat(client, "And God said", max_tokens=30, stop=stop)
    assert text == free[:free.index(stop)] and chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_gives_the_same_text_twice(client):
    sampled = [chat(client, "And the LORD", max_tokens=24, temperature=1.0, seed=seed)
               .choices[0].message.content for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1]


def test_a_wrong_or_missing_key_is_refused(server):
    for key in ("wrong", "", KEY + "x", KEY[:-1], " " + KEY[1:]):
        bad = openai.OpenAI(base_url=server.url, api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.models.list() if key else bad.chat.completions.create(
                messages=[{"role": "user", "content": "hi"}], **GREEDY)
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    status, raw = post(server.url + "/completions", {**GREEDY, "prompt": "a"}, key="")
    assert status == 401 and set(json.loads(raw)["error"]) == {"message", "type", "param",
                                                                "code"}


@pytest.mark.parametrize("changes, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "ho"}]},
     "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
])
def test_bad_parameters_get_openais_error_shape(client, changes, param):
    request = {**GREEDY, "messages": [{"role": "user", "content": "hi"}], **changes}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request)
    error = caught.value
    assert error.status_code == 400 and error.param == param
    assert set(error.body) == {"message", "type", "param", "code"}
    assert error.body["type"] == "invalid_request_error" and str(param) in error.body["message"]


def test_unknown_paths_and_methods_get_openais_error_shape(server):
    for method, path, status in (("GET", "/chat/completions", 405), ("POST", "/engines", 404)):
        request = urllib.request.Request(server.url + path, b"{}" if method == "POST" else None,
                                         method=method)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == status
        assert set(json.loads(caught.value.read())["error"]) == {"message", "type", "param",
                                                                  "code"}


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="7B_FT_float16", prompt="hi")
    assert caught.value.code == "model_not_found"


def test_a_prompt_over_the_context_is_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(prompt="And God said, " * 200, **GREEDY)
    assert caught.value.code == "context_length_exceeded" and "256" in caught.value.message


def test_a_follow_up_prefills_only_its_new_tokens(client):
    first = chat(client, "In the beginning", max_tokens=24)
    messages = [{"role": "user", "content": "In the beginning"},
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And they went"}]
    follow = client.chat.completions.create(messages=messages, max_tokens=8, **GREEDY)
    cached = follow.usage.prompt_tokens_details.cached_tokens
    assert cached == first.usage.prompt_tokens + first.usage.completion_tokens - 1  # all but
    # the last answer token, which was sampled but never run through the model
    chat(client, "Unrelated words", max_tokens=4)  # the cache now holds another prompt
    cold = client.chat.completions.create(messages=messages, max_tokens=8, **GREEDY)
    assert cold.usage.prompt_tokens_details.cached_tokens <= 1
    assert cold.choices[0].message.content == follow.choices[0].message.content


def test_16_concurrent_streams_each_match_the_request_served_alone(client):
    prompts = [f"And the {w} said" for w in ("LORD", "king", "man", "woman", "people",
                                             "prophet", "angel", "priest", "servant", "son",
                                             "daughter", "elders", "children", "captain",
                                             "Philistine", "Levite")]
    alone = [chat(client, p, max_tokens=24).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: streamed_chat(client, p, max_tokens=24), prompts))
    for (text, chunks), expected in zip(together, alone, strict=True):
        assert text == expected
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_variants_get_metas_format(tokenizer):
    engine = SimpleNamespace(tokenizer=tokenizer, context_len=128,
                             config=SimpleNamespace(chat=True, max_seq_len=128))
    dialog = [Message(role="system", content="be kind"), Message(role="user", content="the cat"),
              Message(role="assistant", content=" sat on the mat "),
              Message(role="user", content="the dog")]
    parsed = parse_request("chat", {"model": "m", "messages": dialog}, engine, "m")
    assert parsed.prompt == PromptBuilder(tokenizer, chat=True).from_messages(dialog)
    with pytest.raises(ApiError, match="context holds 128"):
        parse_request("chat", {"model": "m", "messages": [
            {"role": "user", "content": "the cat sat " * 100}]}, engine, "m")


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """One waiting place and 20 ms per token, so a stream can be left while others wait."""
    proc, url, log = start_server(tmp_path_factory.mktemp("slow"), "--max-queue", "1",
                                  "--token_delay", "0.02", "--api-key", KEY)
    yield SimpleNamespace(url=url, log=log)
    stop_server(proc)


def test_a_client_leaving_mid_stream_frees_the_engine_and_a_full_queue_is_503(slow_server):
    client = openai.OpenAI(base_url=slow_server.url, api_key=KEY, max_retries=0, timeout=60)
    leaving = chat(client, "And God said", max_tokens=400, stream=True)
    assert next(iter(leaving)).choices[0].delta.role == "assistant"
    waiting: dict = {}
    thread = threading.Thread(target=lambda: waiting.update(
        reply=chat(client, "And Moses", max_tokens=5), done=time.monotonic()))
    thread.start()
    time.sleep(0.5)  # the second request waits in the one place of the queue
    with pytest.raises(openai.InternalServerError) as caught:
        chat(client, "And Aaron", max_tokens=5)
    assert caught.value.status_code == 503 and caught.value.code == "queue_full"
    for _, _ in zip(range(3), leaving, strict=False):
        pass
    leaving.close()
    closed = time.monotonic()
    thread.join(30)
    assert waiting["reply"].choices[0].finish_reason == "length"
    assert waiting["done"] - closed < 3  # 400 tokens at 20 ms would take 8 s
    time.sleep(0.2)
    stopped = re.findall(r"stopped, prompt \d+ tokens \(prefilled \d+\), (\d+) new",
                         slow_server.log.read_text())
    assert stopped and int(stopped[0]) < 100


def test_a_client_giving_up_on_a_whole_response_frees_the_engine(slow_server):
    impatient = openai.OpenAI(base_url=slow_server.url, api_key=KEY, max_retries=0,
                              timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        chat(impatient, "And Aaron said", max_tokens=400)
    client = openai.OpenAI(base_url=slow_server.url, api_key=KEY, max_retries=0, timeout=60)
    start = time.monotonic()
    assert chat(client, "And Moses", max_tokens=5).choices[0].finish_reason == "length"
    assert time.monotonic() - start < 3
    time.sleep(0.2)
    stopped = re.findall(r"stopped, prompt \d+ tokens \(prefilled \d+\), (\d+) new",
                         slow_server.log.read_text())
    assert len(stopped) == 2 and int(stopped[1]) < 100


def test_a_client_leaving_right_after_its_request_costs_no_generation(slow_server):
    port = int(slow_server.url.rsplit(":", 1)[1].split("/")[0])
    body = json.dumps({**GREEDY, "prompt": "And Noah", "max_tokens": 400, "stream": True})
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                     f"{KEY}\r\nContent-Type: application/json\r\nContent-Length: "
                     f"{len(body)}\r\n\r\n{body}".encode())
    client = openai.OpenAI(base_url=slow_server.url, api_key=KEY, max_retries=0, timeout=60)
    start = time.monotonic()
    chat(client, "And Moses", max_tokens=5)
    assert time.monotonic() - start < 3  # the abandoned 400 tokens would take 8 s
    time.sleep(0.2)
    runs = re.findall(r"completion \w+: (\w+).*?(\d+) new tokens", slow_server.log.read_text())
    assert all(reason == "stopped" and int(made) < 50 for reason, made in runs)  # or skipped


@pytest.mark.parametrize("args, message", [
    (["--port", "-1"], "--port -1 is invalid"),
    (["--port", "http"], "invalid int value"),
    (["--variant", "nope"], "variant 'nope'"),
    (["--api-key", " "], "--api-key is empty"),
    (["--max-queue", "-1"], "--max-queue -1 is invalid"),
    (["--max-seq-len", "1"], "--max_seq_len 1 is too short"),
    (["--allowed-host", "http://llm.example/"], "--allowed-host 'http://llm.example/' is not a "
     "host name; give the name alone"),
    (["--api-key", "k\u00e9y"], "the key in --api-key has a character that is not printable "
     "ASCII (U+00E9 at position 2), which no client can send in a header; use letters"),
    (["--api-key", "a\tb"], "(U+0009 at position 2)"),
])
def test_command_line_mistakes_give_one_error_line(args, message):
    done = subprocess.run([sys.executable, str(SERVE), *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert message in done.stderr


def test_missing_server_packages_give_the_install_command(tmp_path):
    (tmp_path / "starlette").mkdir()
    (tmp_path / "starlette" / "__init__.py").write_text("raise ImportError('hidden by test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run([sys.executable, str(SERVE), "--variant", "demo"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr == (
        "error: the server needs Starlette and uvicorn; install them with "
        "`pip install -e .[serve]`.\n")


def load_cli():
    spec = importlib.util.spec_from_file_location("serve_cli", SERVE)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_flags_take_both_spellings():
    cli = load_cli()
    for spelling in ("--max-seq-len", "--max_seq_len"):
        assert cli.parse_args([spelling, "128"]).max_seq_len == 128
    args = cli.parse_args(["--api_key", "k", "--max_queue", "3"])
    assert (args.api_key, args.max_queue, args.host, args.port) == ("k", 3, "127.0.0.1", 8000)


def test_kubernetes_manifest_agrees_with_itself_and_the_server():
    import yaml
    cli = load_cli()
    docs = list(yaml.safe_load_all((ROOT / "tools" / "deploy" / "kubernetes.yaml").read_text()))
    deployment, service = sorted(docs, key=lambda d: d["kind"])
    assert (deployment["apiVersion"], deployment["kind"]) == ("apps/v1", "Deployment")
    assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
    spec, pod = deployment["spec"], deployment["spec"]["template"]
    assert spec["replicas"] > 1 and spec["selector"]["matchLabels"] == pod["metadata"]["labels"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    port = container["ports"][0]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert container["args"][:2] == ["python", "tools/serve.py"]
    args = cli.parse_args(container["args"][2:])
    assert (args.host, args.port) == ("0.0.0.0", port["containerPort"])
    assert (ROOT / args.variant).is_dir()
    (env,) = container["env"]
    assert env["name"] == "LLAMA2_ONNX_API_KEY" and "secretKeyRef" in env["valueFrom"]


def test_a_chat_variant_is_served_in_metas_format(make_variant):
    from starlette.testclient import TestClient

    from llama2_onnx.generation import Engine
    from llama2_onnx.server import create_app

    engine = Engine.from_variant(make_variant("hf", "float32", chat=True), provider="cpu")
    dialog = [Message(role="system", content="be kind"), Message(role="user", content="the cat"),
              Message(role="assistant", content="sat"), Message(role="user", content="the dog")]
    with TestClient(create_app(engine)) as http:
        reply = http.post("/v1/chat/completions", json={
            "model": engine.name, "messages": dialog, "max_tokens": 3, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3
    prompt = PromptBuilder(engine.tokenizer, chat=True).from_messages(dialog)
    assert engine.tokens[:len(prompt)] == prompt
