"""The server's limits and refusals (issue 19): the queue, bodies, connections, hosts, content
types and parameters, each answered in OpenAI's error shape and without a traceback in the log.
An app over a stand-in engine (stub_engine) where no model is needed, tools/serve.py where the
HTTP layer itself is checked."""

from __future__ import annotations

import asyncio
import threading

import pytest
from stub_engine import chain_engine, piece_ids

from llama2_onnx.generation import GenerationStats
from llama2_onnx.sampling import SamplingSettings
from llama2_onnx.scheduler import Job, QueueFull, Scheduler
from llama2_onnx.server import create_app

ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture()
def stub(tokenizer):
    """An engine that answers "the" with " cat sat with you" (then EOS)."""
    prompt = [tokenizer.bos_id, *piece_ids(tokenizer, "▁the")]
    return chain_engine(tokenizer, prompt, piece_ids(tokenizer, "▁cat", "▁s", "at", "▁with",
                                                     "▁you"))


def http_client(engine, **options):
    from starlette.testclient import TestClient

    return TestClient(create_app(engine, **options))


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
