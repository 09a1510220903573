"""Generations on one engine: a bounded first-come-first-served queue of jobs, a worker thread
that runs them, one at a time or several together in the engine's slots, and their text handed
back to asyncio as it is made."""

# Why a thread: the engine is synchronous (ONNX Runtime releases the GIL while it runs), so
# one worker thread owns it and the event loop stays free to accept, stream and refuse
# requests. Each job carries an asyncio queue; the worker posts events onto it with
# `call_soon_threadsafe`:
#
#   ("piece", str) ... then ("done", GenerationStats) or ("error", Exception)
#
# With one slot the worker runs a job's Engine.generate to its end, then the next. With several
# (RunOptions.parallel) it starts waiting jobs while slots are free and runs batching.SlotEngine's
# ticks: a prefill run of one job, a decode step of all of them; a job waits only while every
# slot is busy. Cancelling a job (its client went away) takes effect before its next token (the
# engine checks `should_stop` between tokens; with slots, before every tick), freeing its slot.
# A job cancelled while still waiting is skipped.

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .batching import SlotEngine, SlotRequest
from .sampling import SamplingSettings

if TYPE_CHECKING:
    from .generation import Engine, GenerationStats

log = logging.getLogger("llama2_onnx.server")


class QueueFull(Exception):
    """Every place in the queue is taken."""


@dataclass
class Job:
    """One generation: what to run, and where its events go."""

    prompt: list[int]
    sampling: SamplingSettings
    max_tokens: int
    stop: Sequence[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    name: str = ""

    def cancel(self) -> None:
        self.cancelled.set()

    def post(self, kind: str, value: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Scheduler:
    """Runs jobs on `engine` in the order they were submitted: one at a time, or up to `slots`
    together (the engine's Placement.slots).

    At most `max_waiting` jobs wait while every slot is busy; `submit` refuses more (with 0, a
    job runs only when a slot is free). `token_delay` (seconds per text piece; with several
    slots, per tick) slows generation down for tests only.
    """

    def __init__(self, engine: Engine, max_waiting: int = 32, token_delay: float = 0.0,
                 slots: int = 1) -> None:
        self.engine, self.max_waiting, self.token_delay = engine, max_waiting, token_delay
        self.slots = slots
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None  # one slot: the job generating
        self._busy = 0  # several slots: the jobs in them
        self._ready = threading.Condition()
        self._closed = False
        work = self._work if slots == 1 else self._work_in_slots
        self._thread = threading.Thread(target=work, name="engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`.

        Raises:
            QueueFull: when `job` would make more than `max_waiting` jobs wait.
        """
        with self._ready:
            self._waiting = collections.deque(j for j in self._waiting
                                              if not j.cancelled.is_set())
            running = (self._running is not None) + self._busy
            if len(self._waiting) + running >= self.slots + self.max_waiting:
                raise QueueFull
            self._waiting.append(job)
            self._ready.notify()

    def waiting(self) -> int:
        with self._ready:
            return len(self._waiting)

    def close(self) -> None:
        """Cancel every job and stop the worker after the running job ends."""
        with self._ready:
            self._closed = True
            for job in self._waiting:
                job.cancel()
            self._ready.notify()

    def _next(self) -> Job | None:
        """The next job to run (now counted as running), or None once closed."""
        with self._ready:
            while not self._closed:
                while self._waiting and self._waiting[0].cancelled.is_set():
                    self._waiting.popleft()
                if self._waiting:
                    self._running = self._waiting.popleft()
                    return self._running
                self._ready.wait()
            return None

    def _work(self) -> None:
        while (job := self._next()) is not None:
            last = self._run(job)
            with self._ready:
                self._running = None  # before the client hears "done": it may send the next
            job.post(*last)

    def _run(self, job: Job) -> tuple[str, object]:
        """Stream the job's pieces; returns its last event, ("done", stats) or ("error", exc)."""
        engine = self.engine
        try:
            pieces = engine.generate(job.prompt, job.sampling, job.max_tokens, job.stop,
                                     should_stop=job.cancelled.is_set)
            for piece in pieces:
                job.post("piece", piece)
                if self.token_delay:
                    time.sleep(self.token_delay)
        except Exception as exc:  # noqa: BLE001  # reported to the client, the worker goes on
            log.exception("%s failed", job.name)
            return "error", exc
        _log_stats(job, engine.last_stats)
        return "done", engine.last_stats

    def _work_in_slots(self) -> None:
        slots, jobs = SlotEngine(self.engine), {}
        while self._admit(slots, jobs):
            changed = slots.step()
            for request in changed:
                self._hand_back(request, jobs)
            if self.token_delay and changed:
                time.sleep(self.token_delay)

    def _admit(self, slots: SlotEngine, jobs: dict[SlotRequest, Job]) -> bool:
        """Start waiting jobs in free slots (waiting for one when idle); False once closed and
        every job has ended."""
        with self._ready:
            while not jobs and not self._waiting and not self._closed:
                self._ready.wait()
            if self._closed and not jobs:
                return False
            starting = []
            while self._waiting and len(starting) < slots.free():
                if not (job := self._waiting.popleft()).cancelled.is_set():
                    starting.append(job)
            self._busy += len(starting)
        for job in starting:
            try:
                request = slots.start(job.prompt, job.sampling, job.max_tokens, job.stop,
                                      should_stop=job.cancelled.is_set)
            except Exception as exc:  # noqa: BLE001  # reported to the client, as in _run
                log.exception("%s failed", job.name)
                self._end(job, ("error", exc))
                continue
            jobs[request] = job
        return True

    def _hand_back(self, request: SlotRequest, jobs: dict[SlotRequest, Job]) -> None:
        """Post a tick's text of `request` to its job, and its end."""
        job = jobs[request]
        if text := request.take_text():
            job.post("piece", text)
        if not request.done:
            return
        del jobs[request]
        if request.error is not None:
            log.error("%s failed", job.name, exc_info=request.error)
            self._end(job, ("error", request.error))
            return
        _log_stats(job, request.stats)
        self._end(job, ("done", request.stats))

    def _end(self, job: Job, last: tuple[str, object]) -> None:
        with self._ready:
            self._busy -= 1  # before the client hears the end: it may send the next
        job.post(*last)


def _log_stats(job: Job, stats: GenerationStats) -> None:
    log.info("%s: %s, prompt %d tokens (prefilled %d), %d new tokens, first token %.1f ms, "
             "%.1f tokens/s", job.name, stats.stop_reason, stats.prompt_tokens,
             stats.prefilled_tokens, stats.new_tokens, stats.ttft_s * 1e3, stats.decode_tok_s)
