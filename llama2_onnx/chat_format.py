"""Prompt tokens: the one builder the CLI, the chat app and the server use (PromptBuilder).

Chat variants get their tokenizer's own chat template when it has one (tokenizer.json models:
Llama 3, SmolLM2), else Llama-2-chat exactly as Meta's `chat_completion` builds it; base
variants continue a plain-text document."""

# A dialog is an optional system message, then alternating user/assistant messages ending
# with a user message. The system message is merged into the first user message inside
# <<SYS>> tags; each finished exchange is `<s>[INST] user [/INST] answer </s>` and the last
# user message is `<s>[INST] user [/INST]`, every content stripped of surrounding whitespace.
# The tokenizer encodes text a user types (`<s>`, `</s>`) as plain text pieces, never as
# control tokens, so BOS and EOS ids come only from this formatting. The tags themselves are
# text, so a message holding `[/INST]` or `<<SYS>>` would write the delimiters the model
# reads: a user could end their turn early or forge a system prompt token for token. Meta's
# reference refuses such dialogs for chat variants, and so does this builder.
#
# Template variants (a tokenizer with a `chat_template`): the whole conversation is rendered by
# the template (chat_template.py, as transformers renders it, with add_generation_prompt) and
# the text encoded with special-token parsing on: the template's `<|im_start|>` are the control
# tokens. Message text must not become control tokens, so the encoding is checked: when a
# special token lies inside a message's text, the text is encoded again in pieces, the
# template's pieces parsed and each message's text as plain text. Otherwise the tokens are the
# whole text's, exactly what transformers' `apply_chat_template(tokenize=True)` gives. Each
# turn's prompt is the whole conversation rendered cold from its texts; the engine keeps the
# cache's common prefix and pre-fills the rest (the answer ids kept per exchange are not used).
#
# Base variants: the conversation is one document. BOS, then the system prompt as plain text
# (if any), then each message's text as it was written; the tags are ordinary text there.

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypedDict

from .chat_template import ChatTemplate
from .errors import GenerationError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
CHAT_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    """One chat message."""

    role: Role
    content: str


class TextTokenizer(Protocol):
    """What formatting needs from `llama2_onnx.tokenizer`'s tokenizers."""

    bos_id: int | None
    eos_id: int
    chat_template: ChatTemplate | None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def encode_markup(self, text: str, plain: Sequence[tuple[int, int]] = ()) -> list[int]: ...

    def has_special_text(self, text: str) -> bool: ...


def _segment(tokenizer: TextTokenizer, user: str, answer: str | None) -> list[int]:
    """One finished exchange (BOS ... EOS), or the last user message when `answer` is None."""
    if answer is None:
        return tokenizer.encode(f"{B_INST} {user.strip()} {E_INST}", bos=True, eos=False)
    text = f"{B_INST} {user.strip()} {E_INST} {answer.strip()} "
    return tokenizer.encode(text, bos=True, eos=True)


def _with_system(system: str, user: str) -> str:
    return B_SYS + system + E_SYS + user


def check_no_tags(text: str, what: str = "a message") -> None:
    """Refuse text holding a Llama-2-chat tag (see the comment at the top).

    Raises:
        GenerationError naming the tag.
    """
    found = next((tag for tag in CHAT_TAGS if tag in text), None)
    if found:
        raise GenerationError(f"{what} contains {found!r}, which this chat variant reads as "
                              "a delimiter of its prompt format; remove the tag "
                              f"({', '.join(CHAT_TAGS)} are not allowed).")


def _check_roles(dialog: list[Message]) -> None:
    if not dialog:
        raise GenerationError("the dialog is empty; add a user message.")
    start = 1 if dialog[0].get("role") == "system" else 0
    for index, message in enumerate(dialog):
        if not isinstance(message.get("content"), str):
            raise GenerationError(f"message {index} has content {message.get('content')!r}; "
                                  "every message needs a 'content' string.")
        expected = "system" if index < start else ("user", "assistant")[(index - start) % 2]
        if message.get("role") != expected:
            raise GenerationError(f"message {index} has role {message.get('role')!r} where "
                                  f"{expected!r} was expected; after an optional system "
                                  "message, roles must alternate user, assistant, user, ...")
    if dialog[-1]["role"] != "user":
        raise GenerationError(f"the dialog ends with role {dialog[-1]['role']!r}; it must end "
                              "with a user message for the model to answer.")


@dataclass
class Exchange:
    """One user message and its answer; `answer_ids` are the answer's tokens in the prompt."""

    user: str
    answer: str = ""
    answer_ids: list[int] = field(default_factory=list)


class PromptBuilder:
    """How a variant turns a conversation into tokens: Llama-2-chat for chat variants, one
    plain-text document for base variants (see the comment at the top). The CLI, the chat app
    and the server all build prompts here, so the same conversation gives the same tokens.

    The prompt of a turn is `head + exchange_1 + ... + exchange_n + the new user segment`;
    every exchange is `user segment + answer ids` (chat_session keeps them between turns).
    """

    def __init__(self, tokenizer: TextTokenizer, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat
        self.template = tokenizer.chat_template if chat else None

    def prompt(self, system: str, exchanges: Sequence[Exchange], user: str) -> list[int]:
        """The prompt for `user` after `exchanges`, with the system prompt `system` ("": none).

        Raises:
            GenerationError: (chat variants) for text holding a chat tag; (template variants)
                when the template refuses the conversation.
        """
        if self.template is not None:
            return self._rendered(_conversation(system, exchanges, user))
        ids = self._head(system)
        for index, exchange in enumerate(exchanges):
            ids += self._user_ids(exchange.user, system, first=index == 0) + exchange.answer_ids
        return ids + self._user_ids(user, system, first=not exchanges)

    def from_messages(self, dialog: list[Message]) -> list[int]:
        """The prompt for a whole dialog (optional system message, then user/assistant turns
        ending with a user turn), answers tokenized from their text.

        Raises:
            GenerationError: as for `prompt`, and for roles out of that order.
        """
        _check_roles(dialog)
        if self.template is not None:
            return self._rendered(dialog)
        start = 1 if dialog[0]["role"] == "system" else 0
        system = dialog[0]["content"] if start else ""
        turns = [m["content"] for m in dialog[start:]]
        exchanges = [Exchange(user, answer, self.answer_ids(user, answer))
                     for user, answer in zip(turns[:-1:2], turns[1::2], strict=True)]
        return self.prompt(system, exchanges, turns[-1])

    def answer_ids(self, user: str, answer: str, generated: Sequence[int] | None = None
                   ) -> list[int]:
        """The answer's tokens in later prompts.

        Chat variants: Meta's tokens after the user segment (`answer </s>`); when the answer
        was `generated` by the model and Meta's tokens do not start with those ids, the
        generated ids + EOS (what the cache holds). Base variants: the generated ids, or the
        answer's text encoded. Template variants: the same (later prompts render the answer's
        text; see the comment at the top).
        """
        if not self.chat or self.template is not None:
            return self.tokenizer.encode(answer, bos=False) if generated is None \
                else list(generated)
        check_no_tags(answer, "an assistant message")
        prompt, exchange = _segment(self.tokenizer, user, None), _segment(self.tokenizer, user,
                                                                          answer)
        tail = exchange[len(prompt):]
        if exchange[:len(prompt)] == prompt and (
                generated is None or tail[:len(generated)] == list(generated)):
            return tail
        if generated is None:  # Meta's exchange does not split after the user segment
            generated = self.tokenizer.encode(answer.strip(), bos=False)
        return list(generated) + [self.tokenizer.eos_id]

    def _head(self, system: str) -> list[int]:
        if self.chat:
            return []
        return self.tokenizer.encode(system if system.strip() else "", bos=True)

    def _rendered(self, dialog: Sequence[Message]) -> list[int]:
        """A template variant's prompt (see the comment at the top)."""
        assert self.template is not None
        messages = [dict(m) for m in dialog]
        text = self.template.render(messages)
        spans = self.template.content_spans(messages, text)
        if spans is None:
            if any(self.tokenizer.has_special_text(m["content"]) for m in messages):
                raise GenerationError(
                    "a message contains a special token of this model's chat format and its "
                    "chat template changes message text, so the message cannot be kept apart "
                    "from the format's own tokens; remove the special token from the message.")
            spans = []
        return self.tokenizer.encode_markup(text, spans)

    def _user_ids(self, user: str, system: str, first: bool) -> list[int]:
        """Chat: `<s>[INST] user [/INST]`, the system prompt merged in when `first`."""
        if not self.chat:
            return self.tokenizer.encode(user, bos=False)
        check_no_tags(user, "a user message")
        if system and first:
            check_no_tags(system, "the system prompt")
            user = _with_system(system, user)
        return _segment(self.tokenizer, user, None)

    def completion(self, text: str) -> list[int]:
        """Prompt tokens that continue `text` as it is (any variant): BOS then the text.

        Raises:
            GenerationError: if `text` is empty.
        """
        if not text:
            raise GenerationError("the prompt is empty; pass some text to complete.")
        return self.tokenizer.encode(text, bos=True, eos=False)

    def user_ids(self, user: str) -> list[int]:
        """A later turn's new user segment (no system prompt): what a turn adds to the cache.
        Template variants: the prompt of that message alone."""
        if self.template is not None:
            return self._rendered([Message(role="user", content=user)])
        return self._user_ids(user, "", first=False)


def _conversation(system: str, exchanges: Sequence[Exchange], user: str) -> list[Message]:
    """The messages of `PromptBuilder.prompt`'s arguments (no system message when "")."""
    dialog = [Message(role="system", content=system)] if system else []
    for exchange in exchanges:
        dialog += [Message(role="user", content=exchange.user),
                   Message(role="assistant", content=exchange.answer)]
    return dialog + [Message(role="user", content=user)]

