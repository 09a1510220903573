"""tools/serve.py --parallel N (issue 20): concurrent streams get the answers the one-slot engine
gives each alone, a follow-up finds the slot holding its conversation, a client that leaves
frees its slot, and --parallel is refused in one sentence where it cannot run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from test_serve import KEY, SERVE, start_server, stop_server

from llama2_onnx.chat_format import PromptBuilder
from llama2_onnx.generation import Engine
from llama2_onnx.sampling import SamplingSettings

ROOT = Path(__file__).resolve().parent.parent
GREEDY = dict(model="demo", temperature=0)
ASKS = [  # (prompt, request fields): short and long, greedy and seeded, limits and stops
    ("And God said", dict(max_tokens=24)),
    ("In the beginning God created the heaven and the earth. " * 6, dict(max_tokens=32)),
    ("And the LORD spake unto Moses, saying", dict(max_tokens=40, stop=[","])),
    ("And the king", dict(max_tokens=12)),
    ("And he said unto them", dict(max_tokens=30, temperature=0.8, seed=11)),
    ("Blessed are", dict(max_tokens=20)),
    ("And it came to pass", dict(max_tokens=28, temperature=1.0, top_k=40, seed=2)),
    ("The LORD is my shepherd", dict(max_tokens=16)),
]


@pytest.fixture(scope="module")
def parallel_server(tmp_path_factory):
    proc, url, log = start_server(tmp_path_factory.mktemp("parallel"), "--parallel", "4",
                                  "--max-seq-len", "256", "--api-key", KEY)
    yield SimpleNamespace(url=url, log=log)
    stop_server(proc)


@pytest.fixture()
def client(parallel_server):
    return openai.OpenAI(base_url=parallel_server.url, api_key=KEY, max_retries=0, timeout=120)


def alone(engine: Engine, prompt: str, fields: dict) -> tuple[str, str, int]:
    """Text, finish reason and completion tokens of the one-slot engine for a completion."""
    tokens = PromptBuilder(engine.tokenizer, chat=False).completion(prompt)
    sampling = {k: fields[k] for k in ("temperature", "top_k", "seed") if k in fields}
    settings = SamplingSettings(**{"temperature": 0, **sampling})
    text = "".join(engine.generate(tokens, settings, fields["max_tokens"], fields.get("stop", ())))
    stats = engine.last_stats
    finish = "length" if stats.stop_reason in ("max tokens", "context full") else "stop"
    return text, finish, stats.new_tokens


def streamed(client, prompt: str, fields: dict) -> tuple[str, str, int]:
    fields = dict(fields)
    extra = {"top_k": fields.pop("top_k")} if "top_k" in fields else None  # this server's own
    chunks = list(client.completions.create(prompt=prompt, stream=True, extra_body=extra,
                                            stream_options={"include_usage": True},
                                            **{**GREEDY, **fields}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    return text, finish, chunks[-1].usage.completion_tokens


def test_eight_streams_in_four_slots_get_the_answers_each_gets_alone(client, parallel_server):
    """Eight concurrent streaming clients, so four wait and start while the others decode."""
    one = Engine.from_variant(ROOT / "demo", provider="cpu", max_seq_len=256)
    expected = [alone(one, prompt, fields) for prompt, fields in ASKS]
    with ThreadPoolExecutor(len(ASKS)) as pool:
        together = list(pool.map(lambda ask: streamed(client, *ask), ASKS))
    assert together == expected
    assert expected[2][1] == "stop" and "," not in expected[2][0]  # the stop string ended it
    assert "4 slots" in parallel_server.log.read_text()


def test_a_follow_up_finds_the_slot_holding_its_conversation(client):
    """Another conversation in between goes to another slot, so the first is still held."""
    def ask(messages: list[dict], **fields):
        return client.chat.completions.create(messages=messages, **{**GREEDY, **fields})

    first = ask([{"role": "user", "content": "In the beginning"}], max_tokens=24)
    ask([{"role": "user", "content": "Unrelated words"}], max_tokens=24)
    messages = [{"role": "user", "content": "In the beginning"},
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And they went"}]
    follow = ask(messages, max_tokens=8)
    cached = follow.usage.prompt_tokens_details.cached_tokens
    assert cached == first.usage.prompt_tokens + first.usage.completion_tokens - 1


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    """Two slots, no waiting place and 20 ms per tick, so both slots can be held."""
    proc, url, log = start_server(tmp_path_factory.mktemp("busy"), "--parallel", "2",
                                  "--max-queue", "0", "--token_delay", "0.02",
                                  "--api-key", KEY)
    yield SimpleNamespace(url=url, log=log)
    stop_server(proc)


def test_a_client_leaving_frees_its_slot_and_a_full_server_is_503(busy_server):
    client = openai.OpenAI(base_url=busy_server.url, api_key=KEY, max_retries=0, timeout=60)
    streams = [client.completions.create(prompt=p, max_tokens=400, stream=True, **GREEDY)
               for p in ("And God said", "And Moses said")]
    for stream in streams:
        next(iter(stream))  # both slots are busy
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(prompt="And Aaron", max_tokens=5, **GREEDY)
    assert caught.value.status_code == 503 and "2 requests at a time" in caught.value.message
    streams[0].close()
    for _ in range(200):  # until the server has seen the client leave
        try:
            reply = client.completions.create(prompt="And Noah", max_tokens=5, **GREEDY)
            break
        except openai.InternalServerError:
            time.sleep(0.05)
    else:
        raise AssertionError("the slot of the client that left was never freed")
    assert reply.choices[0].finish_reason == "length"
    assert next(iter(streams[1])).choices  # the other stream still runs
    streams[1].close()
    for _ in range(100):
        if len(ended := re.findall(r"completion \w+: (\w+[ \w]*), prompt \d+ tokens \(prefilled "
                                   r"\d+\), (\d+) new", busy_server.log.read_text())) == 3:
            break
        time.sleep(0.05)
    assert [reason for reason, _ in ended] == ["stopped", "max tokens", "stopped"]
    assert int(ended[0][1]) < 400 and int(ended[2][1]) < 400


@pytest.mark.parametrize("args, message", [
    (["--parallel", "0"], "--parallel 0 is invalid"),
    (["--parallel", "two"], "--parallel 'two' is invalid; use a whole number"),
])
def test_parallel_mistakes_give_one_error_line(args, message):
    done = subprocess.run([sys.executable, str(SERVE), "--variant", "demo", "--provider", "cpu",
                           "--port", "0", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr


def test_the_serve_benchmark_runs_the_server_with_slots():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "serve",
                           "--variant", "demo", "--clients", "1,3", "--requests-per-client", "1",
                           "--new-tokens", "4", "--parallel", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["parallel"] == 2 and "--parallel 2" in report["command"]
    assert [level["requests"] for level in report["levels"]] == [1, 3]
    refused = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "serve",
                              "--parallel", "0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--parallel 0 is invalid" in refused.stderr
