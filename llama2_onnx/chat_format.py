"""Llama-2-chat prompt tokens as Meta's chat_completion builds them; user text stays plain."""

# A dialog is an optional system message, then alternating user/assistant messages ending
# with a user message. The system message is merged into the first user message inside
# <<SYS>> tags; each finished exchange is `<s>[INST] user [/INST] answer </s>` and the last
# user message is `<s>[INST] user [/INST]`, every content stripped of surrounding whitespace.
# Meta's reference refuses messages that contain the tags; that is not needed here: the
# tokenizer encodes text a user types (`<s>`, `[INST]`, `<<SYS>>`) as plain text pieces,
# never as control tokens, so BOS and EOS ids come only from this formatting.

from __future__ import annotations

from typing import Literal, Protocol, TypedDict

from .errors import GenerationError

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


