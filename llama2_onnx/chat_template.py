"""A model's own chat template (tokenizer_config.json's Jinja `chat_template`), rendered in a
sandbox the way transformers' `apply_chat_template` renders it."""

# The environment is what transformers gives a template: an immutable sandbox (a template cannot
# reach Python objects or change the data it is given), trim_blocks and lstrip_blocks, the
# loop-controls extension (`break`, `continue`), `raise_exception(message)`, `strftime_now(format)`,
# a `tojson` filter that keeps non-ASCII text as it is, and the variables `messages`, `tools` and
# `documents` (none here), `add_generation_prompt` and the special tokens (`bos_token`, ...).
# `{% generation %}` blocks (transformers' assistant-mask extension) are not supported: such a
# template is refused when the tokenizer loads.
#
# `content_spans` says where each message's text landed in the rendered text, so that
# chat_format can encode message text with special-token parsing off (see there). It renders the
# conversation a second time with every content replaced by an unguessable placeholder; the text
# between placeholders is the template's own, and the real rendering must be exactly those
# pieces with the messages' contents (or their stripped forms: templates often `| trim`) between
# them. A template that changes message text in other ways gives no spans (None).

from __future__ import annotations

import datetime
import json
import re
import secrets
from collections.abc import Sequence

from .errors import GenerationError, VariantError
from .variant_folder import TOKENIZER_CONFIG

# What a broken template raises while rendering: Jinja's errors and Python's from its operators.
_RENDER_ERRORS = (ArithmeticError, LookupError, TypeError, ValueError, AttributeError)


class ChatTemplate:
    """One compiled chat template and the special tokens it may name."""

    def __init__(self, source: str, tokens: dict[str, str | None], origin: str) -> None:
        """Compile `source` (from `origin`, for messages).

        Raises:
            VariantError when the template is not valid Jinja.
        """
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self.compiled = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise VariantError(f"the chat template in {origin} is not a valid Jinja template "
                               f"({exc}); fix it or take the model's own {TOKENIZER_CONFIG}."
                               ) from None
        self.tokens, self.origin = dict(tokens), origin

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` ({role, content} dicts).

        Raises:
            GenerationError with the template's own message when it refuses the conversation
            (`raise_exception`) or fails on it.
        """
        import jinja2

        try:
            return self.compiled.render(
                messages=[dict(m) for m in messages], tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.tokens)
        except TemplateRaised as exc:
            raise GenerationError(f"the chat template refuses this conversation: {exc}") from None
        except (jinja2.TemplateError, *_RENDER_ERRORS) as exc:
            raise GenerationError(f"the chat template of {self.origin} fails on this "
                                  f"conversation ({type(exc).__name__}: {exc}); change the "
                                  "messages or fix the template.") from None

    def content_spans(self, messages: Sequence[dict], text: str
                      ) -> list[tuple[int, int]] | None:
        """Where the messages' contents are in `text` (= render(messages)): (start, end) pairs in
        order; None when the template changes message text beyond stripping it."""
        nonce = secrets.token_hex(8)
        marks = [dict(m, content=f"\ue000{nonce}:{i}\ue001") for i, m in enumerate(messages)]
        try:
            marked = self.render(marks)
        except GenerationError:  # the template reads the contents (a check on their text)
            return None
        pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", marked)
        literals, indices = pieces[0::2], [int(i) for i in pieces[1::2]]
        return _match(text, literals, [messages[i]["content"] for i in indices])


def _match(text: str, literals: list[str], contents: list[str]) -> list[tuple[int, int]] | None:
    """Spans of `contents` in `text` = literals[0] + c_0 + literals[1] + c_1 + ... where each
    c_k is contents[k] or a stripped form of it; None if `text` is not made that way."""
    if not text.startswith(literals[0]):
        return None
    pos, spans = len(literals[0]), []
    for content, after in zip(contents, literals[1:], strict=True):
        forms = dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip()))
        found = next((form for form in forms if text.startswith(form + after, pos)), None)
        if found is None:
            return None
        spans.append((pos, pos + len(found)))
        pos += len(found) + len(after)
    return spans if pos == len(text) else None


class TemplateRaised(Exception):
    """What a template's raise_exception(message) raises."""


def _raise_exception(message: str):
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)
