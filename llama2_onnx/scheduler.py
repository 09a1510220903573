"""One generation at a time on one engine: a bounded first-come-first-served queue of jobs, a
worker thread that runs them, and their text handed back to asyncio as it is made."""

# Why a thread: the engine is synchronous (ONNX Runtime releases the GIL while it runs), so
# one worker thread owns it and the event loop stays free to accept, stream and refuse
# requests. Each job carries an asyncio queue; the worker posts events onto it with
# `call_soon_threadsafe`:
#
#   ("piece", str) ... then ("done", GenerationStats) or ("error", Exception)
#
# Cancelling a job (its client went away) takes effect before its next token: the engine
# checks `should_stop` between tokens. A job cancelled while still waiting is skipped.

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    """Runs jobs on `engine` one at a time, in the order they were submitted.

    At most `max_waiting` jobs wait behind the running one; `submit` refuses more (with 0, a
    job runs only when the engine is free). `token_delay` (seconds per text piece) slows
    generation down for tests only.
    """

    def __init__(self, engine: Engine, max_waiting: int = 32, token_delay: float = 0.0) -> None:
        self.engine, self.max_waiting, self.token_delay = engine, max_waiting, token_delay
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`.

        Raises:
            QueueFull: when `job` would make more than `max_waiting` jobs wait.
        """
        with self._ready:
            self._waiting = collections.deque(j for j in self._waiting
                                              if not j.cancelled.is_set())
            if len(self._waiting) + (self._running is not None) > self.max_waiting:
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


def _log_stats(job: Job, stats: GenerationStats) -> None:
    log.info("%s: %s, prompt %d tokens (prefilled %d), %d new tokens, first token %.1f ms, "
             "%.1f tokens/s", job.name, stats.stop_reason, stats.prompt_tokens,
             stats.prefilled_tokens, stats.new_tokens, stats.ttft_s * 1e3, stats.decode_tok_s)
