"""Llama-2-chat prompt tokens as Meta's chat_completion builds them; user text stays plain."""

# A dialog is an optional system message, then alternating user/assistant messages ending
# with a user message. The system message is merged into the first user message inside
# <<SYS>> tags; each finished exchange is `<s>[INST] user [/INST] answer </s>` and the last
# user message is `<s>[INST] user [/INST]`, every content stripped of surrounding whitespace.
# Meta's reference refuses messages that contain the tags; that is not needed here: the
# tokenizer encodes text a user types (`<s>`, `[INST]`, `<<SYS>>`) as plain text pieces,
# never as control tokens, so BOS and EOS ids come only from this formatting.

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, TypedDict

from .errors import GenerationError

if TYPE_CHECKING:
    from .generation import Engine
    from .tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    """One chat message."""

    role: Role
    content: str


class TextTokenizer(Protocol):
    """What formatting needs from `llama2_onnx.tokenizer.Tokenizer`."""

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...


def complete_tokens(tokenizer: TextTokenizer, text: str) -> list[int]:
    """Prompt tokens for a base (non-chat) variant: BOS then the plain text.

    Args:
        tokenizer: the variant's tokenizer.
        text: the text to continue.

    Returns:
        Token ids starting with BOS.

    Raises:
        GenerationError: if `text` is empty.
    """
    if not text:
        raise GenerationError("the prompt is empty; pass some text to complete.")
    return tokenizer.encode(text, bos=True, eos=False)


def dialog_tokens(tokenizer: TextTokenizer, dialog: list[Message]) -> list[int]:
    """Prompt tokens for a chat variant, as Meta's `chat_completion` builds them.

    Args:
        tokenizer: the variant's tokenizer.
        dialog: optional system message, then user/assistant turns ending with a user turn.

    Returns:
        Token ids ending with `[/INST]`, ready for the model to write the answer.

    Raises:
        GenerationError: if the roles are not in that order or a content is not a string.
    """
    return [token for segment in dialog_segments(tokenizer, dialog) for token in segment]


def dialog_segments(tokenizer: TextTokenizer, dialog: list[Message]) -> list[list[int]]:
    """`dialog_tokens` split into one list per exchange, then one for the last user message.

    Each finished exchange is `<s>...</s>`. A turn that keeps its KV cache from the previous
    turn only needs to pre-fill the segments that are new.

    Args:
        tokenizer: the variant's tokenizer.
        dialog: as for `dialog_tokens`.

    Returns:
        Token id lists whose concatenation is `dialog_tokens(tokenizer, dialog)`.

    Raises:
        GenerationError: as for `dialog_tokens`.
    """
    return [_segment(tokenizer, user, answer) for user, answer in _pairs(_merge_system(dialog))]


def _segment(tokenizer: TextTokenizer, user: str, answer: str | None) -> list[int]:
    """One finished exchange (BOS ... EOS), or the last user message when `answer` is None."""
    if answer is None:
        return tokenizer.encode(f"{B_INST} {user.strip()} {E_INST}", bos=True, eos=False)
    text = f"{B_INST} {user.strip()} {E_INST} {answer.strip()} "
    return tokenizer.encode(text, bos=True, eos=True)


def _pairs(contents: list[str]) -> list[tuple[str, str | None]]:
    """(user, assistant) contents per exchange, then (last user, None)."""
    return [*zip(contents[:-1:2], contents[1::2], strict=True), (contents[-1], None)]


def _merge_system(dialog: list[Message]) -> list[str]:
    """Check the roles and return the contents (user, assistant, ..., user), with the system
    message folded into the first user message the way Meta's reference does it."""
    _check_roles(dialog)
    contents = [message["content"] for message in dialog]
    if dialog[0]["role"] == "system":
        contents = [_with_system(contents[0], contents[1]), *contents[2:]]
    return contents


def _with_system(system: str, user: str) -> str:
    return B_SYS + system + E_SYS + user


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


# How a chat variant and a base variant turn a conversation into tokens (chat_session keeps the
# conversation and its cache; the reasons are in its comment at the top).


@dataclass
class Exchange:
    """One user message and its answer; `answer_ids` are the answer's tokens in the prompt."""

    user: str
    answer: str = ""
    answer_ids: list[int] = field(default_factory=list)


class PromptFormat(Protocol):
    """How a variant turns a conversation into tokens (see chat_session's comment at the top)."""

    def head(self, system: str) -> list[int]: ...

    def user_ids(self, user: str, system: str, first: bool) -> list[int]: ...

    def answer_ids(self, user: str, answer: str, generated: Sequence[int] | None = None
                   ) -> list[int]: ...


class LlamaChatFormat:
    """Llama-2-chat exactly as Meta's reference formats dialogs."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def head(self, system: str) -> list[int]:
        return []

    def user_ids(self, user: str, system: str, first: bool) -> list[int]:
        """`<s>[INST] user [/INST]`, with the system prompt merged in when `first`."""
        before = [Message(role="system", content=system)] if system and first else []
        return dialog_segments(self.tokenizer, before + [Message(role="user", content=user)])[0]

    def answer_ids(self, user: str, answer: str, generated: Sequence[int] | None = None
                   ) -> list[int]:
        """Meta's tokens after the user segment (`answer </s>`) if they start with `generated`
        (default: the answer re-encoded), else `generated` + EOS."""
        if generated is None:
            generated = self.tokenizer.encode(answer.strip(), bos=False)
        generated = list(generated)
        prompt = self.user_ids(user, "", first=False)
        exchange = dialog_segments(self.tokenizer, [
            Message(role="user", content=user), Message(role="assistant", content=answer),
            Message(role="user", content="")])[0]
        tail = exchange[len(prompt):]
        if exchange[:len(prompt)] == prompt and tail[:len(generated)] == generated:
            return tail
        return generated + [self.tokenizer.eos_id]


class PlainTextFormat:
    """Base variants: the conversation is one document the model continues."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def head(self, system: str) -> list[int]:
        text = self.tokenizer.encode(system, bos=False) if system.strip() else []
        return [self.tokenizer.bos_id] + text

    def user_ids(self, user: str, system: str, first: bool) -> list[int]:
        return self.tokenizer.encode(user, bos=False)

    def answer_ids(self, user: str, answer: str, generated: Sequence[int] | None = None
                   ) -> list[int]:
        if generated is None:
            return self.tokenizer.encode(answer, bos=False)
        return list(generated)


def prompt_format(engine: Engine) -> PromptFormat:
    """The format for this engine's variant: Llama-2-chat or plain text."""
    if engine.config.chat:
        return LlamaChatFormat(engine.tokenizer)
    return PlainTextFormat(engine.tokenizer)


def prompt_ids(fmt: PromptFormat, system: str, exchanges: Sequence[Exchange], user: str
               ) -> list[int]:
    """The prompt for `user` after `exchanges` (see chat_session's comment at the top)."""
    ids = fmt.head(system)
    for index, exchange in enumerate(exchanges):
        ids += fmt.user_ids(exchange.user, system, first=index == 0) + exchange.answer_ids
    return ids + fmt.user_ids(user, system, first=not exchanges)
