"""Parallel slots: several requests decoded together over one KV cache, a row per slot (DESIGN.md,
"Serving and slots"), each with its own sampling, stop strings, limits and statistics."""

# One tick of SlotEngine.step():
#
#   requests their callers stopped end     their slots are free before the next run
#   prefill runs of the oldest requests    batch 1, each bound to its slot's row of the cache;
#     still pre-filling                    one run, then more while this tick's runs hold
#                                          fewer than `prefill_tokens` prompt tokens
#   one decode step of every request       batch k: rows 0..k-1 together, each at its own
#     with a token to run                  position (session.Runtime.run_rows)
#
# so a new prompt is pre-filled a run at a time between the decode steps of the others, in the
# runs the engine makes alone (Engine.prefill_runs: the runtime's chunks where it has them,
# placement.PREFILL_CHUNK, else the whole prompt). Runs cut elsewhere compute otherwise: on the
# CPU a prompt pre-filled in runs of 33 tokens, or with a one-token run after a past, differs
# from one whole run in the last bits, which can change a greedy token. RunOptions.prefill_chunk
# chunks prompts alike with one slot or several.
#
# A row of the step with no token to run (a free slot, or one still pre-filling) is given its own
# length as position: what the step writes there lands just past the conversation the row
# holds, where that row's next run overwrites it. A full row has no such place: its last
# position takes the write and leaves the tokens the slot counts as held.
#
# Prefix reuse is per slot: each slot remembers the tokens its row holds, and a request goes to
# the free slot whose tokens share the longest prefix with its prompt (at least half of them;
# none: the slot used longest ago among the low rows, LOW_ROWS), which pre-fills only the rest.
#
# Each request decodes through generation.Decoding, as Engine.generate does, so its tokens are
# those it gets served alone: a decode step of many rows is compared with one-row steps in
# tests/test_parallel.py.

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .errors import GenerationError
from .generation import Decoding, Engine, GenerationStats, Runner, common_prefix
from .sampling import SamplingSettings


class SlotRunner(Runner, Protocol):
    """What SlotEngine asks of its engine's runner besides generation.Runner (session.Runtime
    with several slots, or one)."""

    def run(self, embeds: np.ndarray, start: int, row: int = 0) -> np.ndarray:
        """Runner.run into slot `row`."""
        ...

    def run_rows(self, embeds: np.ndarray, positions: Sequence[int]) -> np.ndarray:
        """One decode step of slots 0..k-1 (embeds (k, dim)); logits (k, vocab)."""
        ...

    def decode_width(self, rows: int) -> int:
        """The k that a step of slots 0..rows-1 runs at (k >= rows)."""
        ...

    def warm_up_decode(self) -> None:
        """Run (and capture) the decode step of each width on the calling thread."""
        ...


@dataclass(eq=False)
class Slot:
    """One row of the KV cache and the tokens it holds, in order."""

    row: int
    tokens: list[int] = field(default_factory=list)
    request: SlotRequest | None = None
    last_used: int = 0  # when its last request ended (prefix-reuse ties go to the oldest)


class SlotRequest:
    """One generation in a slot: its decoding, the prefill runs still to do, and the text made
    since the caller last took it (take_text). `done` once it ended; `error` if it failed;
    `stats` as Engine.last_stats."""

    def __init__(self, prompt: list[int], decoding: Decoding) -> None:
        self.prompt, self.decoding, self.stats = prompt, decoding, decoding.stats
        self.slot: Slot | None = None
        self.runs: list[tuple[int, int]] = []  # prefill runs still to do
        self.new = 0  # prompt tokens those runs compute (the rest the slot held)
        self.pieces: list[str] = []
        self.done, self.error = False, None

    def take_text(self) -> str:
        """The text made since the last call."""
        text, self.pieces = "".join(self.pieces), []
        return text


# Prompt tokens a tick may pre-fill before its decode step (the first run always goes): more
# lets a burst of new requests reach their first token sooner, at the cost of a longer pause
# for the streams already decoding. LLAMA2_ONNX_PREFILL_TOKENS_PER_TICK sets it (0: one run a
# tick). Measured on an H200 (7B float16, 16 clients at once): docs/serving.md.
PREFILL_TOKENS_PER_TICK = 0


# A request that reuses no slot's conversation takes a row below the width the decode step
# runs at anyway (at least LOW_ROWS): rows 0..k-1 run together, so keeping the rows in use low
# keeps the steps narrow; among those rows, the one used longest ago (prefix reuse).
LOW_ROWS = 4


def prefill_tokens_per_tick() -> int:
    value = os.environ.get("LLAMA2_ONNX_PREFILL_TOKENS_PER_TICK", "")
    return int(value) if value.isdigit() else PREFILL_TOKENS_PER_TICK


class SlotEngine:
    """Runs requests in the engine's slots (Placement.slots rows of its KV cache), a tick at a
    time (see the module comment). It owns the cache: use the engine through it only, from the
    thread that made it (a captured decode graph belongs to the thread that captured it).
    `prefill_tokens`: see PREFILL_TOKENS_PER_TICK (None: that, or the variable).
    """

    def __init__(self, engine: Engine, prefill_tokens: int | None = None) -> None:
        assert engine.runner.supports_continued_prefill, "slots pre-fill in runs"
        self.engine = engine
        self.runner: SlotRunner = engine.runner
        self.slots = [Slot(row) for row in range(engine.runner.slots)]
        self.requests: list[SlotRequest] = []  # running, in order of arrival
        self._ended = itertools.count(1)
        self.prefill_tokens = prefill_tokens_per_tick() if prefill_tokens is None \
            else prefill_tokens
        self.runner.warm_up_decode()  # on the thread that will call step()

    def free(self) -> int:
        """How many slots have no request."""
        return sum(slot.request is None for slot in self.slots)

    def start(self, prompt: Sequence[int], settings: SamplingSettings | None = None,
              max_new_tokens: int = 256, stop: Sequence[str] = (), ignore_eos: bool = False,
              should_stop: Callable[[], bool] | None = None) -> SlotRequest:
        """Give `prompt` a free slot; its text comes from the next ticks. The arguments are
        Engine.generate's.

        Raises:
            GenerationError as Engine.generate does (before taking a slot).
        """
        engine = self.engine
        engine.check_request(prompt, max_new_tokens)
        assert self.free(), "every slot is busy"
        prompt = list(prompt)
        stats = GenerationStats(prompt_tokens=len(prompt))
        stops = frozenset() if ignore_eos else engine.tokenizer.stop_ids
        request = SlotRequest(prompt, Decoding(
            engine, list(prompt), settings or SamplingSettings(), max_new_tokens, stop, stats,
            stops, should_stop or (lambda: False)))
        slot = self._pick(prompt)
        keep = min(common_prefix(slot.tokens, prompt), len(prompt) - 1)
        del slot.tokens[keep:]
        request.new = len(prompt) - keep
        request.runs = engine.prefill_runs(keep, len(prompt))
        slot.request, request.slot = request, slot
        self.requests.append(request)
        return request

    def _pick(self, prompt: list[int]) -> Slot:
        """The free slot holding the longest prefix of `prompt`, if that prefix is at least
        half of what the slot holds (a shared BOS or system prompt alone is no reason to take
        another conversation's place); else the slot used longest ago, one never used first,
        among the rows a decode step runs anyway (module comment: a step runs rows 0..k-1, so a
        request alone in row 40 would cost a step of 64 rows)."""
        def reuse(slot: Slot) -> int:
            shared = min(common_prefix(slot.tokens, prompt), len(prompt) - 1)
            return shared if shared > 1 and 2 * shared >= len(slot.tokens) else 0

        free = [slot for slot in self.slots if slot.request is None]
        best = max(free, key=lambda slot: (reuse(slot), -slot.last_used))
        if reuse(best):
            return best
        busy = [slot.row for slot in self.slots if slot.request is not None]
        width = max(self.runner.decode_width(1 + max(busy)) if busy else 0,
                    self.runner.decode_width(len(busy) + 1), min(len(self.slots), LOW_ROWS))
        return max((slot for slot in free if slot.row < width), key=lambda slot: -slot.last_used)

    def step(self) -> list[SlotRequest]:
        """One tick: stopped requests end, prefill runs (one, or more up to prefill_tokens), one
        decode step of the others.

        Returns:
            The requests that made text (take_text) or ended in this tick.
        """
        running = list(self.requests)
        for request in running:
            if request.decoding.should_stop():
                request.stats.stop_reason = request.stats.stop_reason or "stopped"
                self._end(request)
        budget = self.prefill_tokens
        while (pending := next((r for r in self.requests if r.runs), None)) is not None:
            a, b = pending.runs[0]
            self._prefill_run(pending)
            budget -= b - a
            if budget <= 0:
                break
        decoding = [r for r in self.requests if not r.runs]  # with one just pre-filled
        if decoding:
            self._decode_step(decoding)
        return [r for r in running if r.pieces or r.done]

    def _prefill_run(self, request: SlotRequest) -> None:
        a, b = request.runs.pop(0)
        slot = request.slot
        try:
            logits = self.runner.run(self.engine.embeddings[request.prompt[a:b]], a,
                                     row=slot.row)
        except Exception as exc:  # noqa: BLE001  # ONNX Runtime's many kinds; the caller hears
            self._end(request, exc)
            return
        slot.tokens[a:] = request.prompt[a:b]
        if not request.runs:  # the prompt is in the cache: its first token
            request.decoding.prefilled(request.new)
            self._take(request, logits)

    def _decode_step(self, requests: list[SlotRequest]) -> None:
        """Run each request's chosen token at its next position, all in one step."""
        width = self.runner.decode_width(1 + max(r.slot.row for r in requests))
        tokens = np.zeros(width, np.int64)  # a row without a token to run: any embedding
        positions = [self._spare_position(slot) for slot in self.slots[:width]]
        for request in requests:
            tokens[request.slot.row] = request.decoding.token
            positions[request.slot.row] = len(request.slot.tokens)
        try:
            logits = self.runner.run_rows(self.engine.embeddings[tokens], positions)
        except Exception as exc:  # noqa: BLE001  # as in _prefill_run
            for request in requests:
                self._end(request, exc)
            return
        for request in requests:
            request.slot.tokens.append(request.decoding.token)
            self._take(request, logits[request.slot.row])

    def _spare_position(self, slot: Slot) -> int:
        """Where a decode step may write in a row with no token to run (module comment)."""
        if len(slot.tokens) < self.engine.context_len:
            return len(slot.tokens)
        del slot.tokens[-1]  # a full row: its last position takes the write
        return len(slot.tokens)

    def _take(self, request: SlotRequest, logits: np.ndarray) -> None:
        decoding = request.decoding
        try:
            piece = decoding.take(logits)
        except GenerationError as exc:
            self._end(request, exc)
            return
        if piece:
            request.pieces.append(piece)
        if not decoding.goes_on(len(request.slot.tokens), self.engine.context_len):
            self._end(request)

    def _end(self, request: SlotRequest, error: Exception | None = None) -> None:
        """End `request` (its tail of text, its statistics) and free its slot."""
        if error is None and (tail := request.decoding.tail()):
            request.pieces.append(tail)
        request.decoding.finish()
        request.done, request.error = True, error
        slot = request.slot
        if error is not None:
            slot.tokens.clear()  # a failed run may have left the row half written
        slot.request, slot.last_used = None, next(self._ended)
        self.requests.remove(request)
