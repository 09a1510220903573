"""Chat conversations: history kept as the token ids the model saw, engines behind locks, and the
streaming step that answers one message. No UI code: the Gradio app and the tests drive it."""

# How a conversation becomes prompt tokens, and why its KV cache survives between turns.
#
# The prompt of a turn is `head + exchange_1 + ... + exchange_n + new user segment`, and every
# exchange is `user segment + answer ids`. The answer ids are stored when the answer is made,
# from the ids the model generated, so the next prompt starts with exactly the tokens already
# in the engine's cache and the engine pre-fills only what follows (Engine.prefill keeps the
# common prefix).
#
# Chat variants (Llama-2-chat): Meta's `chat_completion` format, built by chat_format: no
# head, the system prompt merged into the first kept user message inside <<SYS>>, each
# exchange `<s>[INST] user [/INST] answer </s>`. The answer ids are Meta's tokens for the
# stripped answer text whenever those start with the generated ids (the usual case), else
# the generated ids + EOS: what the model actually produced, so the cache stays valid.
#
# Template variants (a tokenizer.json model with its own chat template): each turn's prompt is
# the whole conversation rendered by the template from its texts (chat_format); the engine keeps
# the part of the cache that prompt starts with (usually up to the last answer's tokens) and
# pre-fills the rest, so a re-tokenized answer costs a longer prefill, never wrong tokens.
#
# Base variants: the conversation is one plain-text document that the model continues. Head
# is BOS and the system prompt as plain text (if any); each message is appended as plain
# text and the model's continuation follows it. No tags, no role names, no stop strings.
#
# Either way user text is encoded as text, never as control tokens (see chat_format).
#
# When the prompt exceeds the budget (max history tokens, and the context minus the room
# kept for the answer), the oldest exchanges leave the model's view for good (`start`
# moves forward): the cache is rebuilt once and later turns reuse it again.

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .chat_format import Exchange, Message, PromptBuilder
from .errors import GenerationError, UserError, is_whole_number
from .sampling import SamplingSettings
from .tokenizer import check_text

if TYPE_CHECKING:
    from .generation import Engine, GenerationStats


@dataclass
class ChatSettings:
    """What a turn is generated with; checked when constructed."""

    system: str = ""
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_new_tokens: int = 256
    max_history_tokens: int = 4096

    def __post_init__(self) -> None:
        check_text(self.system, "the system prompt")
        for name in ("max_new_tokens", "max_history_tokens"):
            value = getattr(self, name)
            if not is_whole_number(value):
                raise GenerationError(f"{name.replace('_', ' ')}={value!r} is invalid; use a "
                                      "whole number of at least 1.")


@dataclass
class Conversation:
    """One browser tab's chat. `start` is the first exchange the model still sees."""

    variant: str = ""
    exchanges: list[Exchange] = field(default_factory=list)
    pending: Exchange | None = None
    start: int = 0
    status: str = ""
    stop_requested: bool = False
    busy: bool = False
    ids_for: str = ""  # the variant whose tokenizer made the stored answer ids

    def messages(self) -> list[Message]:
        """The chat as shown: every exchange, dropped ones included, then the one in progress."""
        shown = self.exchanges + ([self.pending] if self.pending else [])
        out: list[Message] = []
        for exchange in shown:
            out.append(Message(role="user", content=exchange.user))
            if exchange.answer.strip() or exchange is not self.pending:
                out.append(Message(role="assistant", content=exchange.answer.strip()))
        return out


def history_budget(settings: ChatSettings, context_len: int) -> int:
    """Most prompt tokens a turn may use: max history tokens, and the context minus the room
    kept for the answer (max new tokens, but at most half the context)."""
    room = min(settings.max_new_tokens, context_len // 2)
    return min(settings.max_history_tokens, context_len - room)


def fit_history(fmt: PromptBuilder, conv: Conversation, user: str, settings: ChatSettings,
                context_len: int) -> list[int]:
    """Drop the oldest exchanges (move `conv.start`) until the prompt for `user` fits.

    Returns:
        The prompt tokens.

    Raises:
        GenerationError: if the message (with the system prompt) does not fit alone; then
            `conv` is left as it was, so the next message still sees the conversation.
    """
    budget = history_budget(settings, context_len)
    start = conv.start
    while True:
        prompt = fmt.prompt(settings.system, conv.exchanges[start:], user)
        if len(prompt) <= budget:
            conv.start = start
            return prompt
        if start >= len(conv.exchanges):
            raise GenerationError(
                f"the message needs {len(prompt)} tokens but the history allows {budget} "
                f"(context {context_len}); shorten it or the system prompt, or lower max "
                "new tokens / raise max history tokens.")
        start += 1


@dataclass
class LoadedEngine:
    """An engine, its prompt format and the lock that serialises its use."""

    engine: Engine
    fmt: PromptBuilder
    lock: threading.Lock = field(default_factory=threading.Lock)


class EnginePool:
    """One engine per variant, loaded on first use and kept, each behind its own lock."""

    def __init__(self, load: Callable[[str], Engine]) -> None:
        self._load = load
        self._loaded: dict[str, LoadedEngine] = {}
        self._lock = threading.Lock()

    def is_loaded(self, variant: str) -> bool:
        return variant in self._loaded

    def get(self, variant: str) -> LoadedEngine:
        """The loaded engine for `variant`, loading it now if needed (UserError if it cannot)."""
        with self._lock:  # held while loading, so two tabs never load the same variant twice
            if variant not in self._loaded:
                engine = self._load(variant)
                builder = PromptBuilder(engine.tokenizer, engine.config.chat)
                self._loaded[variant] = LoadedEngine(engine, builder)
            return self._loaded[variant]


def respond(pool: EnginePool, conv: Conversation, user: str, settings: ChatSettings
            ) -> Iterator[str]:
    """Answer `user` in `conv`, yielding the answer text each time it grows.

    `conv.pending` shows the exchange while it runs; at the end it joins `conv.exchanges` (also
    when stopped) and `conv.status` tells time to first token, tokens/s and why it stopped.
    `request_stop(conv)` ends generation before the next token.

    Raises:
        GenerationError: an empty message or one that is not text (a lone surrogate), a
            conversation already answering, or a message that does not fit even alone;
            UserError if the variant cannot be loaded.
    """
    check_text(user, "the message")
    if not user.strip():
        raise GenerationError("the message is empty; type something first.")
    if conv.busy:
        raise GenerationError("still answering the previous message; press Stop first.")
    conv.busy = True  # a Stop pressed while this request waited (request_answer) still holds
    conv.pending = Exchange(user)
    try:
        if not pool.is_loaded(conv.variant):
            conv.status = f"loading {conv.variant} ..."
            yield ""
        yield from _answer_locked(pool.get(conv.variant), conv, settings)
    finally:
        conv.pending, conv.busy, conv.stop_requested = None, False, False


def request_answer(conv: Conversation) -> None:
    """Note that Send or Regenerate was pressed: from now on a Stop applies to that request,
    also while it waits in a queue before `respond` runs (no-op while an answer runs)."""
    if not conv.busy:
        conv.stop_requested = False


def _answer_locked(slot: LoadedEngine, conv: Conversation, settings: ChatSettings
                   ) -> Iterator[str]:
    if not slot.lock.acquire(blocking=False):
        conv.status = "waiting for another conversation to finish ..."
        yield ""
        slot.lock.acquire()
    try:
        _retokenize(conv, slot.fmt)
        yield from _answer(slot, conv, settings)
    finally:
        slot.lock.release()


def _retokenize(conv: Conversation, fmt: PromptBuilder) -> None:
    """After a variant switch, rebuild the stored answer ids with the new tokenizer."""
    if conv.ids_for != conv.variant:
        for exchange in conv.exchanges:
            exchange.answer_ids = fmt.answer_ids(exchange.user, exchange.answer)
        conv.ids_for = conv.variant


def _answer(slot: LoadedEngine, conv: Conversation, settings: ChatSettings) -> Iterator[str]:
    engine, fmt, exchange = slot.engine, slot.fmt, conv.pending
    assert exchange is not None
    start = conv.start
    prompt = fit_history(fmt, conv, exchange.user, settings, engine.context_len)
    conv.status = "generating ..."
    pieces = engine.generate(prompt, settings.sampling, settings.max_new_tokens, (),
                             should_stop=lambda: conv.stop_requested)
    try:
        for piece in pieces:
            exchange.answer += piece
            yield exchange.answer
            if conv.stop_requested:
                break
    except GeneratorExit:  # the consumer went away: keep what was answered so far
        _finish(slot, conv, pieces, conv.start - start)
        raise
    _finish(slot, conv, pieces, conv.start - start)


def _finish(slot: LoadedEngine, conv: Conversation, pieces: Iterator[str], dropped: int) -> None:
    """Store the answer (also a stopped one) with the ids the model generated."""
    pieces.close()  # type: ignore[attr-defined]  # ends the engine's generator: stats are final
    exchange, stats = conv.pending, slot.engine.last_stats
    assert exchange is not None
    exchange.answer_ids = slot.fmt.answer_ids(exchange.user, exchange.answer, stats.tokens)
    conv.exchanges.append(exchange)
    conv.status = describe(stats, dropped)


_REASONS = {"eos": "end of answer", "stopped": "stopped", "max tokens": "max new tokens reached",
            "context full": "context full", "stop string": "stop string"}


def describe(stats: GenerationStats, dropped: int = 0) -> str:
    """The status line after an answer: time to first token, tokens/s and why it ended."""
    parts = [_REASONS.get(stats.stop_reason, stats.stop_reason),
             f"time to first token {stats.ttft_s * 1000:.0f} ms",
             f"{stats.decode_tok_s:.1f} tokens/s",
             f"{stats.new_tokens} new tokens",
             f"prefilled {stats.prefilled_tokens} of {stats.prompt_tokens} prompt tokens"]
    if dropped:
        parts.append(f"dropped the {dropped} oldest exchange(s) to fit the history")
    return " · ".join(parts)


def request_stop(conv: Conversation) -> None:
    """Ask the running answer of `conv` to stop before its next token."""
    conv.stop_requested = True


def regenerate(pool: EnginePool, conv: Conversation, settings: ChatSettings) -> Iterator[str]:
    """Answer the last user message again, replacing its answer (see `respond`)."""
    if conv.busy:
        raise GenerationError("still answering; press Stop first.")
    if not conv.exchanges:
        raise GenerationError("there is no answer to regenerate yet; send a message first.")
    last = remove_last(conv)
    kept = len(conv.exchanges)
    try:
        yield from respond(pool, conv, last.user, settings)
    except UserError:
        if len(conv.exchanges) == kept:  # nothing replaced it: put the old answer back
            conv.exchanges.append(last)
        raise


def remove_last(conv: Conversation) -> Exchange:
    """Remove the last exchange and return it.

    Raises:
        GenerationError: if the conversation is answering or empty.
    """
    if conv.busy:
        raise GenerationError("still answering; press Stop first.")
    if not conv.exchanges:
        raise GenerationError("the conversation is empty; there is no turn to remove.")
    last = conv.exchanges.pop()
    conv.start = min(conv.start, len(conv.exchanges))
    return last


def new_conversation(conv: Conversation) -> None:
    """Forget every exchange (the engine's cache is simply overwritten by the next prompt)."""
    if conv.busy:
        raise GenerationError("still answering; press Stop first.")
    conv.exchanges, conv.start, conv.status = [], 0, ""
