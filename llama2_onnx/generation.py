"""The generation engine: prefill, decode one token at a time, and stream text pieces."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from .config import Config
from .errors import GenerationError, is_whole_number
from .loading import load_variant
from .placement import RunOptions
from .sampling import REPETITION_WINDOW, SamplingSettings, make_rng, sample_token
from .session import EngineParts
from .tokenizer import StreamDecoder, Tokenizer


class Runner(Protocol):
    """What the engine may ask of a session wrapper (session.Runtime, legacy.LegacyRuntime)."""

    provider: str  # where it runs, for the user (placement.PROVIDERS' short names)
    cache_len: int  # KV cache positions
    slots: int  # sequences the cache holds (batching.SlotEngine runs several; run() is slot 0)
    supports_continued_prefill: bool  # a multi-token run may follow a past
    max_chunk: int | None  # longest prefill run (a power of two); None: any length
    pads: bool  # a run shorter than a warmed-up length is padded to one (Runtime.padded_length)

    def run(self, embeds: np.ndarray, start: int) -> np.ndarray:
        """Process `embeds` (seq, dim) at positions start..; logits (vocab,) of the last."""
        ...


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = ""
    tokens: list[int] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if self.decode_s and steps > 0 else 0.0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def prefill_spans(start: int, end: int, max_chunk: int | None,
                  pad_limit: int | None = None) -> list[tuple[int, int]]:
    """Positions [a, b) to run so the cache holds positions start..end-1, each run a power of
    two long (at most `max_chunk`), so every shape was seen at load (Runtime.warm_up).

    A short rest does not become more runs. When the runner pads (Runtime.padded_length) and
    the padded run still ends within `pad_limit` (the cache), the rest is one run that the
    runner pads up to a power of two (100 -> [0, 100), run as 128). Otherwise it is one
    power-of-two span that ends at `end` and reaches back over positions already in the cache,
    which are computed again from the same tokens at the same positions
    (1500 -> [0, 1024), [988, 1500)). None: one run.
    """
    if max_chunk is None:
        return [(start, end)]
    spans, pos = [], start
    while pos < end:
        rest = end - pos
        if rest >= max_chunk:
            spans.append((pos, pos + max_chunk))
            pos += max_chunk
            continue
        size = 1 << (rest - 1).bit_length()  # the power of two at or above the rest
        if pad_limit is not None and pos + size <= pad_limit:
            spans.append((pos, end))  # padded to `size` by the runner
            pos = end
        elif end - size < 0:
            size >>= 1  # cannot reach back before position 0: a smaller run first
            spans.append((pos, pos + size))
            pos += size
        else:
            spans.append((end - size, end))
            pos = end
    return spans


class Engine:
    """A loaded variant: tokenizer, embedding table and a runner holding the KV cache.

    `tokens` lists the tokens whose keys and values are in the cache, in order. A new prompt
    that starts with some of them (the next turn of a chat) pre-fills only the rest.
    """

    def __init__(self, runner: Runner, tokenizer: Tokenizer, embeddings: np.ndarray,
                 config: Config, name: str = "") -> None:
        self.runner, self.tokenizer, self.embeddings = runner, tokenizer, embeddings
        self.config, self.name = config, name
        self.tokens: list[int] = []
        self.last_prefill_count = 0
        self.last_stats = GenerationStats()
        self.notes: list[str] = []  # things the user should know about how it was loaded
        self.files = None  # session.FileStamps of files the session reads in place, if any

    @classmethod
    def from_variant(cls, path: Path, options: RunOptions | None = None, **fields) -> Engine:
        """Open a variant folder (our format or the original Llama-2-Onnx one) where and how
        `options` ask (placement.RunOptions; `fields` make one, for short calls in tests and
        tools: `Engine.from_variant(path, provider="cpu")`)."""
        if options is None:
            options = RunOptions(**fields)
        elif fields:
            raise TypeError("pass either options or its fields, not both")
        return cls.from_parts(load_variant(Path(path), options))

    @classmethod
    def from_parts(cls, parts: EngineParts) -> Engine:
        """An engine over parts opened by loading.load_variant / open_files / legacy."""
        engine = cls(parts.runner, parts.tokenizer, parts.embeddings, parts.config, parts.name)
        engine.notes, engine.files = list(parts.notes), parts.files
        return engine

    @property
    def context_len(self) -> int:
        return self.runner.cache_len

    @property
    def slots(self) -> int:
        """Sequences its cache holds (RunOptions.parallel); batching.SlotEngine runs several,
        the methods here use the first."""
        return self.runner.slots

    def reset(self) -> None:
        self.tokens = []

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Make the cache hold `tokens`, computing only what it does not already hold.

        Returns:
            Logits (vocab,) after the last token.
        """
        if not tokens:
            raise GenerationError("the prompt is empty; give some text to complete.")
        if len(tokens) > self.context_len:
            raise GenerationError(self._too_long(len(tokens)))
        keep = min(common_prefix(self.tokens, tokens), len(tokens) - 1)
        new = list(tokens[keep:])
        self.tokens = self.tokens[:keep]
        if keep == 0 or self.runner.supports_continued_prefill:
            tokens = list(tokens)
            for a, b in self.prefill_runs(keep, len(tokens)):
                logits = self.runner.run(self.embeddings[tokens[a:b]], a)
            self.tokens += new
        else:
            for token in new:
                logits = self.decode_step(token)
        self.last_prefill_count = len(new)
        return logits

    def prefill_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        """The runs [a, b) that pre-fill positions start..end-1 (generation.prefill_spans with
        the runner's chunk)."""
        pad_limit = self.context_len if self.runner.pads else None
        return prefill_spans(start, end, self.runner.max_chunk, pad_limit)

    def decode_step(self, token: int) -> np.ndarray:
        """Run one token at the next position; returns logits (vocab,)."""
        logits = self.runner.run(self.embeddings[token:token + 1], len(self.tokens))
        self.tokens.append(token)
        return logits

    def check_fits(self, prompt: Sequence[int]) -> None:
        """Raise GenerationError unless `prompt` leaves room for at least one new token."""
        if len(prompt) >= self.context_len:
            raise GenerationError(self._too_long(len(prompt)))

    def _too_long(self, n: int) -> str:
        fix = "shorten it"
        if self.context_len < self.config.max_seq_len:
            fix += (f" or raise --max_seq_len (this variant allows up to "
                    f"{self.config.max_seq_len})")
        return f"the prompt has {n} tokens but the context holds {self.context_len}; {fix}."

    def generate(self, prompt: Sequence[int], settings: SamplingSettings | None = None,
                 max_new_tokens: int = 256, stop: Sequence[str] = (),
                 ignore_eos: bool = False,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """Stream the continuation of `prompt` as text pieces.

        Stops on EOS or another of the tokenizer's stop ids (unless `ignore_eos`, for
        benchmarks), a stop string (not included in the output), `max_new_tokens`, a full
        context, or when `should_stop()` turns true (checked before every token, also those
        that complete no text yet). Statistics of the run land
        in `last_stats`, also when the caller stops early.

        Raises:
            GenerationError for an empty prompt, one that does not fit, or bad settings.
        """
        settings = settings or SamplingSettings()
        self.check_request(prompt, max_new_tokens)
        stats = self.last_stats = GenerationStats(prompt_tokens=len(prompt))
        stops = frozenset() if ignore_eos else self.tokenizer.stop_ids
        return self._generate(list(prompt), settings, max_new_tokens, stop, stats, stops,
                              should_stop or (lambda: False))

    def check_request(self, prompt: Sequence[int], max_new_tokens: int) -> None:
        """Raise GenerationError for a bad max_new_tokens, a prompt that does not fit, or
        files changed since loading (what generate checks before it starts)."""
        check_max_new_tokens(max_new_tokens)
        changed = self.files.changed() if self.files is not None else None
        if changed is not None:
            raise GenerationError(f"{changed} changed on disk after {self.name} was loaded "
                                  "(reading it now could crash); restart to load the new "
                                  "files.")
        self.check_fits(prompt)

    def _generate(self, prompt: list[int], settings: SamplingSettings, max_new_tokens: int,
                  stop: Sequence[str], stats: GenerationStats, stops: frozenset[int],
                  should_stop: Callable[[], bool]) -> Iterator[str]:
        decoding = Decoding(self, prompt, settings, max_new_tokens, stop, stats, stops,
                            should_stop)
        logits = self.prefill(prompt)
        decoding.prefilled(self.last_prefill_count)
        try:
            while True:
                if piece := decoding.take(logits):
                    yield piece
                if not decoding.goes_on(len(self.tokens), self.context_len):
                    break
                logits = self.decode_step(decoding.token)
            if tail := decoding.tail():
                yield tail
        finally:
            decoding.finish()


class Decoding:
    """One request after its prompt: from each run's logits the next token (its own random
    generator), the text that token lets out (stop strings held back), and whether to go on
    (EOS, a stop string, max tokens, a full context, `should_stop`), with its statistics.
    Engine.generate decodes through it, and so does every slot of batching.SlotEngine."""

    def __init__(self, engine: Engine, prompt: list[int], settings: SamplingSettings,
                 max_new_tokens: int, stop: Sequence[str], stats: GenerationStats,
                 stops: frozenset[int], should_stop: Callable[[], bool]) -> None:
        self.settings, self.max_new_tokens, self.stats = settings, max_new_tokens, stats
        self.stop_ids = stops  # EOS and the tokenizer's other stop tokens; none: ignore EOS
        self.name, self.should_stop = engine.name or "this variant", should_stop
        self.rng, self.decoder = make_rng(settings.seed), StreamDecoder(engine.tokenizer, prompt)
        self.stop = _StopFilter(stop)
        self.history = prompt if settings.repetition_penalty != 1.0 else ()
        self.start = time.perf_counter()
        self.token = -1  # the token chosen last: the next to run while it goes on
        self.ending = ""  # why the text ends once what the last token let out is given out

    def prefilled(self, count: int) -> None:
        """The prompt is in the cache, `count` of its tokens computed now."""
        self.stats.prefilled_tokens = count
        self.stats.prefill_s = time.perf_counter() - self.start

    def take(self, logits: np.ndarray) -> str:
        """Choose the token after `logits` (vocab,); returns the text it lets out.

        Raises:
            GenerationError for logits that are not finite (no token to choose).
        """
        stats = self.stats
        if not np.isfinite(logits).all():  # inf/NaN: no token to choose, say so
            raise GenerationError(_NON_FINITE.format(name=self.name))
        token = sample_token(logits, self.settings, self.rng, self.history[-REPETITION_WINDOW:])
        if not stats.new_tokens:
            stats.ttft_s = time.perf_counter() - self.start
        if token in self.stop_ids:
            stats.stop_reason = "eos"
            return ""
        self.token = token
        stats.new_tokens += 1
        stats.tokens.append(token)
        if self.history:
            self.history.append(token)
        piece, stopped = self.stop.push(self.decoder.push(token))
        if stopped or stats.new_tokens >= self.max_new_tokens:
            self.ending = "stop string" if stopped else "max tokens"
        return piece

    def goes_on(self, held: int, context_len: int) -> bool:
        """Whether the token taken last is to be run, at position `held` (the tokens the cache
        holds); if not, stats.stop_reason says why."""
        stats = self.stats
        stats.stop_reason = stats.stop_reason or self.ending
        if not stats.stop_reason and held >= context_len:
            stats.stop_reason = "context full"
        if not stats.stop_reason and self.should_stop():
            stats.stop_reason = "stopped"
        return not stats.stop_reason

    def tail(self) -> str:
        """The text held back until the end (none past a stop string). A stop string that the
        held-back text completes (a character finished only now) ends the text there too."""
        if self.stats.stop_reason == "stop string":
            return self.stop.flush()
        held, stopped = self.stop.push(self.decoder.flush())
        if stopped:
            self.stats.stop_reason = "stop string"
            return held
        return held + self.stop.flush()

    def finish(self) -> None:
        """Close the statistics, also when the caller stopped early ("stopped")."""
        self.stats.decode_s = time.perf_counter() - self.start - self.stats.ttft_s
        self.stats.stop_reason = self.stats.stop_reason or "stopped"


_NON_FINITE = ("{name} produced non-finite logits (inf or NaN), so no token can be chosen; "
               "check its files with `tools/export_and_publish.py verify` and re-export it "
               "(with --precision float32 if float16 overflows).")


def check_max_new_tokens(n: object, name: str = "max new tokens") -> None:
    if not is_whole_number(n):
        raise GenerationError(f"{name} must be a whole number of at least 1, not {n!r}.")


class _StopFilter:
    """Holds back text that might be the start of a stop string.

    Each stop string has a Knuth-Morris-Pratt matcher that remembers how much of it the text
    ends with, so a piece costs time linear in its own length, however long the text is.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.fallback = [_kmp_fallback(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # how much of each stop string the text ends with
        self.pending = ""  # the text not yet given out: the longest of those matches

    def push(self, piece: str) -> tuple[str, bool]:
        """The text that can be given out now, and whether a stop string was completed (then
        the text ends before the earliest one, the longest of those ending at the same place)."""
        if not self.stops:
            return piece, False
        text = self.pending + piece
        for end, char in enumerate(piece, len(self.pending) + 1):
            found = 0
            for k, stop in enumerate(self.stops):
                self.matched[k] = m = self._step(k, char)
                if m == len(stop):
                    found = max(found, m)
            if found:
                self.pending, self.matched = "", [0] * len(self.stops)
                return text[:end - found], True
        hold = max(self.matched)
        self.pending = text[len(text) - hold:]
        return text[:len(text) - hold], False

    def _step(self, k: int, char: str) -> int:
        """How much of stop string k the text ends with once `char` is added."""
        stop, m = self.stops[k], self.matched[k]
        while stop[m] != char:
            if not m:
                return 0
            m = self.fallback[k][m - 1]
        return m + 1

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _kmp_fallback(stop: str) -> list[int]:
    """fallback[i]: the longest proper prefix of stop[:i + 1] that is also its suffix."""
    fallback, m = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while m and stop[i] != stop[m]:
            m = fallback[m - 1]
        m += stop[i] == stop[m]
        fallback[i] = m
    return fallback
