"""Parallel slots (issue 20): a batched decode step gives each row what it gets alone, requests
served together get the tokens they get alone, slots keep their conversations (prefix reuse)
and a stopped request frees its slot. Tiny models on the CPU; the server's side is in
tests/test_serve_parallel.py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from llama2_onnx import session
from llama2_onnx.batching import SlotEngine
from llama2_onnx.errors import UserError
from llama2_onnx.generation import Engine, common_prefix
from llama2_onnx.loading import check_memory
from llama2_onnx.placement import RunOptions, place
from llama2_onnx.sampling import SamplingSettings
from llama2_onnx.scheduler import Scheduler
from llama2_onnx.variant_folder import find_graph

ROOT = Path(__file__).resolve().parent.parent
GREEDY = SamplingSettings(temperature=0)
PRECISIONS = [("float32", False), ("float32", True), ("float16", True), ("int4", True)]


def assert_row_logits(ours: np.ndarray, alone: np.ndarray, precision: str) -> None:
    """A row of a batched decode step against the same step alone: within 1e-4, except int4
    on the CPU. There MLAS quantizes each row's activations to int8 per block, and its one-row
    and several-row kernels may round a value that sits on a tie differently: seen on an AVX2
    AMD EPYC, one step in 96 off by 1.7 % of the logits' spread, the others
    within 1e-6. Such a step is allowed 3 % of the spread; the tokens must still be equal."""
    bound = 1e-4 if precision != "int4" else max(1e-4, 0.03 * float(alone.std()))
    np.testing.assert_allclose(ours, alone, atol=bound)


def greedy_alone(engine: Engine, prompt: list[int], steps: int) -> tuple[list, list]:
    """Greedy tokens and the logits before each, from the one-slot engine."""
    engine.reset()
    logits, tokens, seen = engine.prefill(prompt), [], []
    for _ in range(steps):
        seen.append(logits.copy())
        tokens.append(int(logits.argmax()))
        logits = engine.decode_step(tokens[-1])
    return tokens, seen


@pytest.mark.parametrize("capture", [False, True], ids=["plain", "captured-bindings"])
@pytest.mark.parametrize("precision, gqa", PRECISIONS)
def test_a_batched_decode_step_gives_each_row_the_logits_it_gets_alone(make_variant, precision,
                                                                       gqa, capture):
    """Rows of different lengths decoded together at batch 4, 3 and 1 (the step's width is the
    highest busy row + 1) against each sequence decoded alone by the one-slot runtime (plain).
    With graph capture asked on the CPU, the steps run the captured path's bindings: the whole
    cache as total length and a run option per width."""
    folder = make_variant("hf", precision, gqa)
    one = Engine.from_variant(folder, provider="cpu")
    runtime = Engine.from_variant(folder, provider="cpu", parallel=4,
                                  graph_capture=capture).runner
    assert runtime.graph_capture == capture
    layer = 4 * one.config.n_kv_heads * one.context_len * one.config.head_dim * (
        np.dtype(runtime.dtype).itemsize)  # one layer's K (or V) for 4 rows
    assert runtime.slots == 4 and np.diff(runtime.caches).tolist() == [layer] * 3
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, one.config.vocab_size, n)) for n in (5, 17, 9, 30)]
    alone = [greedy_alone(one, p, 24) for p in prompts]
    embeddings = one.embeddings
    for width in (4, 3, 1):
        logits = np.stack([runtime.run(embeddings[p], 0, row=i).copy()
                           for i, p in enumerate(prompts[:width])])
        positions = [len(p) for p in prompts[:width]]
        for step in range(24):
            for row in range(width):
                assert_row_logits(logits[row], alone[row][1][step], precision)
                assert int(logits[row].argmax()) == alone[row][0][step], (width, row, step)
            tokens = logits.argmax(-1)
            logits = runtime.run_rows(embeddings[tokens], positions).copy()
            positions = [p + 1 for p in positions]


@pytest.mark.parametrize("precision, gqa", PRECISIONS)
def test_decode_steps_of_every_width_up_to_16_rows_match_one_row_steps(make_variant, precision,
                                                                       gqa):
    """Matrix products of 2 to 16 rows against the one-row step (MLAS picks its kernels by
    the number of rows)."""
    folder = make_variant("hf", precision, gqa)
    one = Engine.from_variant(folder, provider="cpu")
    runtime = Engine.from_variant(folder, provider="cpu", parallel=16).runner
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(3, one.config.vocab_size, int(n)))
               for n in rng.integers(2, 60, 16)]
    alone = [greedy_alone(one, p, 2) for p in prompts]  # the first token, then the step's logits
    for row, prompt in enumerate(prompts):
        runtime.run(one.embeddings[prompt], 0, row=row)
    for width in range(1, 17):
        tokens = [alone[row][0][0] for row in range(width)]
        logits = runtime.run_rows(one.embeddings[tokens], [len(p) for p in prompts[:width]])
        for row in range(width):
            assert_row_logits(logits[row], alone[row][1][1], precision)
            assert int(logits[row].argmax()) == alone[row][0][1], (width, row)


@pytest.mark.parametrize("precision, gqa", PRECISIONS)
def test_a_prefill_bound_into_a_row_gives_the_logits_of_the_one_slot_runtime(make_variant,
                                                                              precision, gqa):
    folder = make_variant("hf", precision, gqa)
    one = Engine.from_variant(folder, provider="cpu")
    runtime = Engine.from_variant(folder, provider="cpu", parallel=4).runner
    prompt = list(np.random.default_rng(1).integers(3, one.config.vocab_size, 100))
    whole = one.prefill(prompt).copy()
    for row in (3, 1):
        np.testing.assert_allclose(runtime.run(one.embeddings[prompt], 0, row=row), whole,
                                   atol=1e-4)
    follow = one.prefill(prompt + [5, 6, 7]).copy()  # continued from the cache, as a turn
    np.testing.assert_allclose(runtime.run(one.embeddings[[5, 6, 7]], 100, row=1), follow,
                               atol=1e-4)


def test_the_memory_check_counts_every_slot(make_variant):
    folder = make_variant("hf", "float32", True)
    config = tiny_config(320, True)
    graph = find_graph(folder)
    check_memory(graph, config, place(config, RunOptions(provider="cpu", parallel=4)))
    huge = place(config, RunOptions(provider="cpu", parallel=10**8))
    with pytest.raises(UserError, match=r"with 100000000 slots of a 128-token context .*KV "
                       r"cache .* GiB.*--max_seq_len or --parallel"):
        check_memory(graph, config, huge)


def run_all(slots: SlotEngine, requests: list, ticks: int = 5000) -> dict:
    """Tick until every request ended; their texts."""
    texts = {request: "" for request in requests}
    for _ in range(ticks):
        if not slots.requests:
            return texts
        for request in slots.step():
            texts[request] = texts.get(request, "") + request.take_text()
    raise AssertionError("the requests did not end")


@pytest.fixture(scope="module", params=[(None, False), (16, False), (16, True)],
                ids=["whole-prompts", "chunks-of-16", "chunks-of-16-captured-bindings"])
def engines(make_variant, request):
    """The one-slot engine and a four-slot SlotEngine of one variant, pre-filling whole prompts
    (the CPU's default) or in power-of-two runs of up to 16 tokens, padded, with decode steps
    at widths 1, 2 and 4 only (the CUDA default's way: every shape seen at load), and that way
    with the captured path's bindings (CUDA's default: a graph per width)."""
    folder = make_variant("hf", "float32", True)
    chunk, capture = request.param
    options = RunOptions(provider="cpu", prefill_chunk=chunk)
    slots = SlotEngine(Engine.from_variant(folder, replace(options, parallel=4,
                                                           graph_capture=capture)))
    assert slots.runner.graph_capture == capture
    return Engine.from_variant(folder, options), slots


ASKS = [  # (text, settings, max tokens, stop strings): long and short, greedy and seeded
    ("the cat sat on the mat and the dog ran far away home " * 4, GREEDY, 30, ()),
    ("the sun", GREEDY, 12, ()),
    ("he was in the tree", SamplingSettings(temperature=0.8, seed=7), 25, ()),
    ("she ran to the moon and", GREEDY, 40, (" the",)),
    ("we sat", SamplingSettings(temperature=1.0, top_k=20, seed=3), 20, ()),
    ("a dog", GREEDY, 1, ()),
]


def test_requests_served_together_get_the_tokens_they_get_alone(engines):
    """Six requests in four slots, two of them arriving while the others decode: each request's
    text, tokens and finish equal the one-slot engine's for it alone (seeded sampling too)."""
    one, slots = engines
    prompts = [one.tokenizer.encode(text) for text, *_ in ASKS]
    alone = []
    for prompt, (_, settings, limit, stop) in zip(prompts, ASKS, strict=True):
        one.reset()
        text = "".join(one.generate(prompt, settings, limit, stop, ignore_eos=True))
        alone.append((text, one.last_stats.tokens, one.last_stats.stop_reason))
    assert len(prompts[0]) > 16 * 3  # in runs between the others' steps, with chunks of 16
    first = [slots.start(p, s, n, st, ignore_eos=True)
             for p, (_, s, n, st) in zip(prompts[:4], ASKS[:4], strict=True)]
    texts = {}
    for _ in range(5):
        for request in slots.step():
            texts[request] = texts.get(request, "") + request.take_text()
    assert slots.free() == 0
    later = []
    for prompt, (_, s, n, st) in zip(prompts[4:], ASKS[4:], strict=True):
        while not slots.free():
            for request in slots.step():
                texts[request] = texts.get(request, "") + request.take_text()
        later.append(slots.start(prompt, s, n, st, ignore_eos=True))
    for request, text in run_all(slots, first + later).items():
        texts[request] = texts.get(request, "") + text
    for request, expected in zip(first + later, alone, strict=True):
        assert (texts[request], request.stats.tokens, request.stats.stop_reason) == expected
        assert request.done and request.error is None
    assert slots.free() == 4


def emptied(slots: SlotEngine) -> SlotEngine:
    """`slots` as if no request had run (the fixture is shared)."""
    assert not slots.requests
    for slot in slots.slots:
        slot.tokens.clear()
        slot.last_used = 0
    return slots


def test_a_follow_up_goes_to_the_slot_holding_its_conversation(engines):
    one, slots = engines[0], emptied(engines[1])
    tokenizer = one.tokenizer
    asks = [tokenizer.encode(t) for t in ("the cat sat on the mat", "the dog ran far away",
                                          "a tree in the sun")]
    first = [slots.start(p, GREEDY, 10, ignore_eos=True) for p in asks]
    run_all(slots, first)
    rows = [r.slot.row for r in first]
    follow = asks[1] + first[1].stats.tokens + tokenizer.encode("and the moon", bos=False)
    again = slots.start(follow, GREEDY, 10, ignore_eos=True)
    assert rows == [0, 1, 2] and again.slot.row == 1  # the slot holding that conversation
    run_all(slots, [again])
    held = len(asks[1]) + 10 - 1  # all but the last answer token, never run through the model
    assert again.stats.prefilled_tokens == len(follow) - held
    one.reset()
    cold = "".join(one.generate(follow, GREEDY, 10, ignore_eos=True))
    assert again.stats.tokens == one.last_stats.tokens and cold
    fresh = slots.start(tokenizer.encode("he was far"), GREEDY, 2)
    assert fresh.slot.row == 3  # not one holding a conversation that shares only BOS
    run_all(slots, [fresh])


def test_an_idle_slots_conversation_survives_the_others_decode_steps(engines):
    """Slot rows below the busiest one run in every step with garbage past their end; the
    conversation a slot holds still continues as a cold run does, also from a full row."""
    one, slots = engines[0], emptied(engines[1])
    tokenizer = one.tokenizer
    held = slots.start(tokenizer.encode("the moon and the sun"), GREEDY, 8, ignore_eos=True)
    full = slots.start(tokenizer.encode("she was"), GREEDY, 1000, ignore_eos=True)
    run_all(slots, [held, full])
    assert full.stats.stop_reason == "context full"
    assert len(full.slot.tokens) == one.context_len
    busy = [slots.start(tokenizer.encode(t), GREEDY, 60, ignore_eos=True)
            for t in ("we ran home", "they sat")]
    assert max(r.slot.row for r in busy) > max(held.slot.row, full.slot.row)  # idle rows step
    run_all(slots, busy)
    assert len(full.slot.tokens) == one.context_len - 1  # its last position took the writes
    for request, extra in ((held, "and the cat"), (full, "")):
        prompt = (request.prompt + request.stats.tokens)[:one.context_len - 20]
        prompt += tokenizer.encode(extra, bos=False) if extra else []
        before = list(request.slot.tokens)
        shared = common_prefix(before, prompt)
        assert shared == min(len(prompt), len(before))  # all it holds, or all the prompt
        again = slots.start(prompt, GREEDY, 12, ignore_eos=True)
        assert again.slot is request.slot
        run_all(slots, [again])
        assert again.stats.prefilled_tokens == len(prompt) - min(shared, len(prompt) - 1)
        one.reset()
        list(one.generate(prompt, GREEDY, 12, ignore_eos=True))
        assert again.stats.tokens == one.last_stats.tokens


def test_a_stopped_request_frees_its_slot_before_the_next_step(engines):
    _, slots = engines
    tokenizer = slots.engine.tokenizer
    stop = {"now": False}
    leaving = slots.start(tokenizer.encode("the cat"), GREEDY, 100, ignore_eos=True,
                          should_stop=lambda: stop["now"])
    waiting = slots.start(tokenizer.encode("the dog"), GREEDY, 100, ignore_eos=True)
    for _ in range(4):
        slots.step()
    made = leaving.stats.new_tokens
    stop["now"] = True
    changed = slots.step()
    assert leaving in changed and leaving.done and leaving.stats.stop_reason == "stopped"
    assert leaving.stats.new_tokens == made and leaving.slot.request is None
    assert slots.free() == 3
    run_all(slots, [waiting])
    assert waiting.stats.stop_reason == "max tokens"


class RowRunner:
    """A stand-in runtime of `slots` cache rows that records the token each position holds
    (the embedding of a token is its id, stub_engine's way); the next token is the last + 1."""

    provider, supports_continued_prefill, max_chunk, pads = "rows", True, None, False

    def __init__(self, slots: int, cache_len: int, vocab: int) -> None:
        self.slots, self.cache_len, self.vocab = slots, cache_len, vocab
        self.cells = np.full((slots, cache_len), -1)
        self.widths: list[int] = []

    def _after(self, token: int) -> np.ndarray:
        logits = np.zeros(self.vocab, np.float32)
        logits[token + 1 if token + 1 < self.vocab else 3] = 1.0
        return logits

    def run(self, embeds: np.ndarray, start: int, row: int = 0) -> np.ndarray:
        assert (self.cells[row, :start] >= 0).all()  # a run reads only written positions
        self.cells[row, start:start + len(embeds)] = embeds[:, 0]
        return self._after(int(embeds[-1, 0]))

    def run_rows(self, embeds: np.ndarray, positions: list[int]) -> np.ndarray:
        self.widths.append(len(positions))
        for row, (embed, position) in enumerate(zip(embeds, positions, strict=True)):
            self.cells[row, position] = embed[0]
        return np.stack([self._after(int(e[0])) for e in embeds])

    def decode_width(self, rows: int) -> int:
        return rows

    def warm_up_decode(self) -> None:
        pass


def test_slot_bookkeeping_reuses_rows_and_holds_what_each_row_holds(tokenizer):
    """Two slots, five requests: rows are reused, a follow-up goes to its conversation's slot,
    a full row's last position is given up when it steps idle, and after every tick each slot's
    tokens are exactly what its row holds (so no run reads past a slot's end, where the other
    slots' steps write garbage)."""
    vocab = tokenizer.n_words
    runner = RowRunner(2, 40, vocab)
    engine = Engine(runner, tokenizer, np.arange(vocab, dtype=np.float32)[:, None],
                    tiny_config(vocab, max_seq_len=40), name="rows")
    slots = SlotEngine(engine)

    def tick() -> None:
        slots.step()
        for slot in slots.slots:
            assert runner.cells[slot.row, :len(slot.tokens)].tolist() == slot.tokens

    def start(prompt: list[int], limit: int):
        request = slots.start(prompt, GREEDY, limit, ignore_eos=True)
        requests.append(request)
        return request

    requests: list = []
    long, first = start([1, 20, 21], 100), start([1, 10, 11, 12], 6)
    assert (long.slot.row, first.slot.row) == (0, 1)
    while not first.done:
        tick()
    assert first.stats.tokens == [13, 14, 15, 16, 17, 18]
    follow = start([1, 10, 11, 12, 13, 14, 15, 16, 17, 50, 51], 3)
    assert follow.slot.row == 1 and follow.new == 2  # the prompt and 5 answer tokens held
    while not follow.done:
        tick()
    other = start([1, 30], 2)
    assert other.slot.row == 1 and other.new == 1  # the only free slot, holding only BOS alike
    while slots.requests:
        tick()
    assert long.stats.stop_reason == "context full" and len(long.slot.tokens) == 40
    last = start([1, 30, 31, 32, 33], 3)
    assert last.slot.row == 1 and last.new == 2  # (row 0, full, is the oldest but holds less)
    while slots.requests:
        tick()
    assert len(long.slot.tokens) == 39  # stepped idle beside row 1: its last position written
    assert [r.stats.stop_reason for r in requests[1:]] == ["max tokens"] * 4
    assert set(runner.widths) == {1, 2}


@pytest.mark.parametrize("budget, ticks", [(0, 3), (6, 2), (100, 1)])
def test_a_tick_prefills_up_to_its_token_budget(tokenizer, budget, ticks):
    """With prefill_tokens 0 a tick runs one prefill; with more it goes on to the next waiting
    prompts until that many prompt tokens ran (the first run always goes), and the requests
    still get the same tokens."""
    vocab = tokenizer.n_words
    runner = RowRunner(3, 40, vocab)
    engine = Engine(runner, tokenizer, np.arange(vocab, dtype=np.float32)[:, None],
                    tiny_config(vocab, max_seq_len=40), name="rows")
    slots = SlotEngine(engine, prefill_tokens=budget)
    requests = [slots.start([1, 10 * k + 10, 10 * k + 11, 10 * k + 12], GREEDY, 3,
                            ignore_eos=True) for k in range(3)]
    for _ in range(ticks):
        assert any(r.runs for r in requests)
        slots.step()
    assert not any(r.runs for r in requests)  # every prompt pre-filled in `ticks` ticks
    while slots.requests:
        slots.step()
    assert [r.stats.tokens for r in requests] == [[13, 14, 15], [23, 24, 25], [33, 34, 35]]


def test_a_new_conversation_takes_a_low_row(tokenizer):
    """With 16 slots and every row once used, new requests go to rows below the width the
    decode step runs at (so 3 requests never make a step of 16 rows), and alone a request
    takes one of the lowest LOW_ROWS rows used longest ago."""
    vocab = tokenizer.n_words
    runner = RowRunner(16, 40, vocab)
    runner.decode_width = lambda rows: min(1 << (rows - 1).bit_length(), 16)
    engine = Engine(runner, tokenizer, np.arange(vocab, dtype=np.float32)[:, None],
                    tiny_config(vocab, max_seq_len=40), name="rows")
    slots = SlotEngine(engine)
    for k in range(16):  # every row used once, row 15 last
        slots.start([1, 100 + k], GREEDY, 1, ignore_eos=True)
    while slots.requests:
        slots.step()
    rows = [slots.start([1, 200 + k], GREEDY, 4, ignore_eos=True).slot.row for k in range(3)]
    assert rows == [0, 1, 2]  # below 4, the oldest first
    while slots.requests:
        slots.step()
    assert max(runner.widths[-4:]) == 4
    assert slots.start([1, 300], GREEDY, 4, ignore_eos=True).slot.row == 3


@pytest.mark.parametrize("chunk, capture, widths", [
    (None, False, []),  # the CPU's default: no shape is fixed at load, nothing captured
    (16, False, [1, 2, 4]),
    (16, True, [1, 1, 1, 2, 2, 2, 4, 4, 4]),  # CAPTURE_RUNS each: captured before any request
])
def test_slots_warm_up_every_decode_width_before_the_first_request(make_variant, chunk,
                                                                   capture, widths):
    folder = make_variant("hf", "float32", True)
    engine = Engine.from_variant(folder, provider="cpu", parallel=4, prefill_chunk=chunk,
                                 graph_capture=capture)
    seen, run_rows = [], engine.runner.run_rows
    engine.runner.run_rows = lambda embeds, positions: (seen.append(len(positions)),
                                                        run_rows(embeds, positions))[1]
    assert session.CAPTURE_RUNS == 3
    SlotEngine(engine)
    assert seen == widths


def test_the_servers_slots_warm_up_on_the_thread_that_decodes(make_variant):
    """A captured graph belongs to the thread that captured it (ONNX Runtime's CUDA provider
    keeps it per thread): the scheduler's worker makes its SlotEngine, so the warm-up runs
    there."""
    engine = Engine.from_variant(make_variant("hf", "float32", True), provider="cpu",
                                 parallel=4, prefill_chunk=16, graph_capture=True)
    threads, warm_up = [], engine.runner.warm_up_decode
    engine.runner.warm_up_decode = lambda: (threads.append(threading.current_thread()),
                                            warm_up())
    scheduler = Scheduler(engine, slots=4)
    try:
        for _ in range(200):
            if threads:
                break
            time.sleep(0.01)
        assert threads == [scheduler._thread]
    finally:
        scheduler.close()


def test_the_slots_capture_check_finds_the_cpus_batched_tokens_equal_to_one_slots():
    """tools/slots_capture_check.py (run on the GPU for docs/serving.md) on the demo: on the CPU
    captured bindings, plain batched steps and one slot give every request the same tokens."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "slots_capture_check.py"),
                           "--variant", str(ROOT / "demo"), "--provider", "cpu", "--parallel",
                           "4", "--requests", "6", "--max-seq-len", "512"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["captured_equals_uncaptured"] and report["tokens"] > 6 * 32
    assert report["requests_equal_to_one_slot"] == 6 and report["divergences_from_one_slot"] == []
