"""The OpenAI API's wire format: request bodies checked into prompts and settings, and the JSON
of responses, stream chunks and errors. No HTTP here: server.py moves these over the network."""

# What a request becomes:
#
#   /v1/chat/completions  messages -> chat_format.PromptBuilder.from_messages: Meta's format
#                         for chat variants, one plain-text document for base variants, from
#                         the builder the CLI and the chat app use (answers re-encoded).
#   /v1/completions       prompt   -> PromptBuilder.completion (BOS + the text).
#
# The prompt is a function of the request alone (never of earlier requests), so any replica
# answers a request the same way; the engine still reuses its KV cache for the longest prefix
# the new prompt shares with the previous one (with several slots, with the conversation a free
# slot holds), which is a whole conversation when a client sends it back with one more message.
#
# Parameters this server cannot honour (n > 1, logprobs, tools, penalties other than
# repetition) are refused with a 400 naming them, never silently ignored; so are parameters
# it does not know (a misspelt `temprature` would otherwise change nothing).

from __future__ import annotations

import difflib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .chat_format import Message, PromptBuilder
from .errors import GenerationError, is_whole_number
from .sampling import SamplingSettings

if TYPE_CHECKING:
    from .generation import Engine, GenerationStats

Endpoint = Literal["chat", "completion"]
MAX_JSON_DEPTH = 64  # a request needs a handful of levels; deeper ones only cost recursion
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # no client needs more; each one's matcher is built on the engine's thread
FINISH_REASONS = {"eos": "stop", "stop string": "stop", "max tokens": "length",
                  "context full": "length"}
# Fields refused unless they hold the value that means "off".
_UNSUPPORTED_OFF_VALUES = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
}
# Every top-level field a request may have, besides its input (INPUT_FIELD).
_PARAMETERS = frozenset({
    "model", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_tokens",
    "max_completion_tokens", "stop", "stream", "stream_options", "n", "response_format", "user",
    *_UNSUPPORTED_OFF_VALUES})
INPUT_FIELD = {"chat": "messages", "completion": "prompt"}


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict:
        """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class GenerationRequest:
    """A checked request, ready for the engine."""

    endpoint: Endpoint
    prompt: list[int]
    sampling: SamplingSettings
    max_tokens: int
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def decode_body(raw: bytes) -> object:
    """The JSON value of a request body.

    Raises:
        ApiError: 400 for a body that is not JSON or nests more than MAX_JSON_DEPTH levels.
    """
    try:
        value = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError):
        raise bad("the request body is not valid JSON.") from None
    if _nests_deeper_than(value, MAX_JSON_DEPTH):
        raise _too_deep()
    return value


def _nests_deeper_than(value: object, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:  # a loop, not recursion: any depth is fine here
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in item)
    return False


def _too_deep() -> ApiError:
    return bad(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep; send a "
               "flatter JSON object (a request needs only a few levels).")


def parse_request(endpoint: Endpoint, body: object, engine: Engine, model: str
                  ) -> GenerationRequest:
    """Check a request body and turn it into prompt tokens and settings.

    Args:
        endpoint: "chat" for /v1/chat/completions, "completion" for /v1/completions.
        body: the decoded JSON body.
        engine: the loaded engine (tokenizer, chat or base variant, context length).
        model: the id this server serves under.

    Returns:
        The request, with `max_tokens` clipped to the room left in the context.

    Raises:
        ApiError: 400 for bad or unsupported parameters and prompts over the context, 404 for
            another model.
    """
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object.")
    _check_model(body.get("model"), model)
    _refuse_unknown(body, endpoint)
    _refuse_unsupported(body)
    if endpoint == "chat":
        prompt = _chat_prompt(body.get("messages"), engine)
    else:
        prompt = _completion_prompt(body.get("prompt"), engine)
    room = engine.context_len - len(prompt)
    if room < 1:
        raise bad(f"the prompt has {len(prompt)} tokens but the context holds "
                  f"{engine.context_len}; shorten it (or start the server with a larger "
                  f"--max-seq-len, up to {engine.config.max_seq_len}).",
                  "messages" if endpoint == "chat" else "prompt", "context_length_exceeded")
    return GenerationRequest(
        endpoint, prompt, _sampling(body), min(_max_tokens(body, endpoint), room),
        _stop(body.get("stop")), stream=_flag(body, "stream"),
        include_usage=_include_usage(body))


def _check_model(value: object, model: str) -> None:
    if value is None:
        raise bad(f"'model' is required; this server serves {model!r}.", "model")
    if value != model:
        raise ApiError(404, f"the model {_short(value)} does not exist; this server serves "
                       f"{model!r} (GET /v1/models lists it).", "model", "model_not_found")


def _refuse_unknown(body: dict, endpoint: Endpoint) -> None:
    known = _PARAMETERS | {INPUT_FIELD[endpoint]}
    unknown = [name for name in body if name not in known]
    if not unknown:
        return
    named = ", ".join(_short(name, 40) + _guess(name, known, endpoint) for name in unknown[:3])
    more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
    raise bad(f"unknown parameter{'s' if len(unknown) > 1 else ''} {named}{more}; remove or "
              "rename it (the README's server section lists the parameters).",
              unknown[0][:80], "unknown_parameter")


def _guess(name: str, known: frozenset[str], endpoint: Endpoint) -> str:
    other = INPUT_FIELD["completion" if endpoint == "chat" else "chat"]
    if name == other:
        return f" (this endpoint reads {INPUT_FIELD[endpoint]!r})"
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _refuse_unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise bad(f"n={_short(n)} is not supported; this server makes one choice per request "
                  "(n=1): send several requests instead.", "n")
    for name, off in _UNSUPPORTED_OFF_VALUES.items():
        if body.get(name) not in off:
            raise bad(f"{name}={_short(body[name])} is not supported by this server; leave it "
                      "out.", name)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad(f"user={_short(body['user'])} is invalid; use a string naming your end user, "
                  "or leave it out.", "user")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad("response_format other than {'type': 'text'} is not supported.",
                  "response_format")


def _chat_prompt(messages: object, engine: Engine) -> list[int]:
    """Prompt tokens for a chat request, from the builder the CLI and the chat app use."""
    builder = PromptBuilder(engine.tokenizer, chat=engine.config.chat)
    try:
        return builder.from_messages(_dialog(messages))
    except GenerationError as exc:
        raise bad(f"in 'messages', {exc}", "messages") from None


def _dialog(messages: object) -> list[Message]:
    """OpenAI's message list as chat_format's dialog: text contents, and OpenAI's
    "developer" role (its newer name for the system message) as "system"."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} objects.",
                  "messages")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    return [Message(role="system" if index == 0 and role == "developer" else role,
                    content=_content(message, index))
            for index, (role, message) in enumerate(zip(roles, messages, strict=True))]


def _content(message: object, index: int) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "".join(p["text"] for p in content)
    raise bad(f"messages[{index}].content must be a string or a list of text parts; got "
              f"{_short(content)}.", f"messages[{index}].content")


def _completion_prompt(prompt: object, engine: Engine) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("'prompt' must be one string (lists of prompts and token arrays are not "
                  "supported).", "prompt")
    try:
        return PromptBuilder(engine.tokenizer, chat=engine.config.chat).completion(prompt)
    except GenerationError as exc:
        raise bad(str(exc), "prompt") from None


def _sampling(body: dict) -> SamplingSettings:
    """Temperature, top_p, seed, plus the extensions top_k and repetition_penalty; unset ones
    take this project's defaults (Meta's temperature 0.6 and top_p 0.9)."""
    names = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
    given = {name: body[name] for name in names if body.get(name) is not None}
    for name, value in given.items():
        if isinstance(value, (str, list, dict)):  # SamplingSettings would quote all of it
            raise bad(f"{name}={_short(value)} is invalid; use a number.", name)
    try:
        return SamplingSettings(**given)
    except GenerationError as exc:
        param = str(exc).split("=")[0]
        raise bad(str(exc), param if param in names else None) from None


def _max_tokens(body: dict, endpoint: Endpoint) -> int:
    """max_tokens (or chat's newer max_completion_tokens); unset: as many as the context
    allows for chat, 16 for completions (OpenAI's defaults)."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else (
        "max_tokens")
    value = body.get(name)
    if value is None:
        return 2**31 if endpoint == "chat" else 16
    if not is_whole_number(value):
        raise bad(f"{name}={_short(value)} is invalid; use a whole number of at least 1.", name)
    return value


def _stop(value: object) -> tuple[str, ...]:
    """Up to MAX_STOP_STRINGS strings of 1 to MAX_STOP_CHARS characters (OpenAI allows 4)."""
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad(f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of "
                  f"them, not {_short(value)}.", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"stop has {len(stops)} strings; use at most {MAX_STOP_STRINGS}.", "stop")
    if longest := max((len(s) for s in stops if len(s) > MAX_STOP_CHARS), default=0):
        raise bad(f"a stop string has {longest} characters; use at most {MAX_STOP_CHARS} "
                  "characters per stop string.", "stop")
    return tuple(stops)


def _short(value: object, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters (a value quoted in an error message)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(f"{name}={_short(value)} is invalid; use true or false.", name)
    return bool(value)


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or not _flag(body, "stream"):
        raise bad("stream_options needs stream: true and must be an object such as "
                  "{\"include_usage\": true}.", "stream_options")
    return _flag(options, "include_usage")


def models_body(model: str, created: int) -> dict:
    """GET /v1/models: the one model this server serves."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "llama2-onnx"}]}


def usage(stats: GenerationStats) -> dict:
    """Token counts; cached_tokens are the prompt tokens whose KV cache was reused."""
    cached = stats.prompt_tokens - stats.prefilled_tokens
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(stats: GenerationStats) -> str:
    return FINISH_REASONS.get(stats.stop_reason, "stop")


def _envelope(request: GenerationRequest, model: str, chunk: bool) -> dict:
    chat = request.endpoint == "chat"
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else (
        "text_completion")
    prefix = "chatcmpl-" if chat else "cmpl-"
    return {"id": prefix + request.id, "object": kind, "created": request.created,
            "model": model}


def response_body(request: GenerationRequest, model: str, text: str, stats: GenerationStats
                  ) -> dict:
    """The whole (non-streamed) response."""
    if request.endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish_reason(stats)}
    else:
        choice = {"index": 0, "text": text, "logprobs": None,
                  "finish_reason": finish_reason(stats)}
    return {**_envelope(request, model, False), "choices": [choice], "usage": usage(stats)}


def chunk_body(request: GenerationRequest, model: str, text: str | None,
               finish: str | None = None, role: bool = False) -> dict:
    """One stream chunk: a piece of text, the opening role (chat), or the finish reason."""
    if request.endpoint == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
            {} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    body = {**_envelope(request, model, True), "choices": [choice]}
    if request.include_usage:
        body["usage"] = None
    return body


def usage_chunk_body(request: GenerationRequest, model: str, stats: GenerationStats) -> dict:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    return {**_envelope(request, model, True), "choices": [], "usage": usage(stats)}


class LeadingSpaceFilter:
    """Drops the whitespace a chat answer starts with, as Meta's decode and the chat app show
    answers (the model writes `▁Sure` after `[/INST]`)."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def push(self, piece: str) -> str:
        if self.active:
            piece = piece.lstrip()
            self.active = not piece
        return piece
