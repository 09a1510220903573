"""SentencePiece tokenizer wrapper and a streaming decoder that keeps word spacing right."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import GenerationError, VariantError

if TYPE_CHECKING:
    from .config import Config
from .files import check_not_lfs_pointer
from .variant_folder import TOKENIZER, TOKENIZER_CONFIG, TOKENIZER_JSON


class Tokenizer:
    """Llama 2's SentencePiece tokenizer. Text is encoded as plain text: a user typing `<s>` or
    `[INST]` gets those characters, never the control tokens."""

    def __init__(self, processor) -> None:
        self.sp = processor
        self.n_words: int = processor.vocab_size()
        self.bos_id: int = processor.bos_id()
        self.eos_id: int = processor.eos_id()

    @classmethod
    def from_file(cls, path: Path) -> Tokenizer:
        import sentencepiece

        path = Path(path)
        if not path.is_file():
            raise VariantError(f"tokenizer {path} does not exist; pass --tokenizer_path or "
                               "pull the variant's files.")
        check_not_lfs_pointer(path)
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError):
            raise VariantError(f"{path} is not a SentencePiece model; use the variant's "
                               f"{TOKENIZER}.") from None
        return cls(processor)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`.

        Raises:
            GenerationError when `text` holds lone surrogates (bytes that were not UTF-8).
        """
        check_text(text, "the text")
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(list(ids))


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (byte-level BPE: SmolLM2, Llama 3) behind the same
    interface as Tokenizer. Text is encoded with special-token parsing off, so a user typing
    `<|im_end|>` gets those characters' pieces, never the control token.

    A stand-in until the tokenizer work of issue 23 (its own backend, stop-token sets, chat
    templates) lands: the GGUF import writes the files that backend reads.
    """

    def __init__(self, backend, bos_id: int | None, eos_id: int | None) -> None:
        self.backend = backend
        self.n_words: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id = -1 if bos_id is None else bos_id
        self.eos_id = -1 if eos_id is None else eos_id

    @classmethod
    def from_file(cls, path: Path) -> HFTokenizer:
        import json

        from tokenizers import Tokenizer as Backend

        path = Path(path)
        check_not_lfs_pointer(path)
        try:
            backend = Backend.from_file(str(path))
        except Exception:  # tokenizers raises its own exception type for a bad file
            raise VariantError(f"{path} is not a Hugging Face {TOKENIZER_JSON}; use the "
                               f"variant's {TOKENIZER_JSON}.") from None
        settings = path.parent / TOKENIZER_CONFIG
        config = json.loads(settings.read_text(encoding="utf-8")) if settings.is_file() else {}
        bos, eos = (config.get(k) for k in ("bos_token", "eos_token"))
        return cls(backend, backend.token_to_id(bos) if bos else None,
                   backend.token_to_id(eos) if eos else None)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        check_text(text, "the text")
        ids = self.backend.encode(text, add_special_tokens=False, is_pretokenized=False).ids
        start = [self.bos_id] if bos and self.bos_id >= 0 else []
        return start + ids + ([self.eos_id] if eos and self.eos_id >= 0 else [])

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path: Path) -> Tokenizer | HFTokenizer:
    """The tokenizer in `path`: a SentencePiece model, or a Hugging Face tokenizer.json."""
    if Path(path).name == TOKENIZER_JSON:
        return HFTokenizer.from_file(path)
    return Tokenizer.from_file(path)


class StreamDecoder:
    """Turns tokens into text pieces as they arrive.

    SentencePiece drops the leading space of the first piece it decodes and a multi-byte
    character may span several byte tokens, so each new token is decoded together with the
    tokens before it and only the new, complete text is returned.
    """

    WINDOW = 16  # tokens decoded together at most (plus the one before them)

    def __init__(self, tokenizer: Tokenizer, context: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context or [])[-1:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.prefix = tokenizer.decode(self.ids)  # text of ids[prefix_offset:read_offset]

    def push(self, token: int) -> str:
        """The new complete text `token` adds ("" while a character is incomplete). One decode
        per token: the text already returned is kept, not decoded again."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(text) <= len(self.prefix) or text.endswith("\ufffd"):
            return ""
        new = text[len(self.prefix):]
        self.read_offset, self.prefix = len(self.ids), text
        if self.read_offset - self.prefix_offset > self.WINDOW:  # keep the decodes short
            self.prefix_offset = self.read_offset - 1
            self.prefix = self.tokenizer.decode(self.ids[self.prefix_offset:])
        return new

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end), as decoded now."""
        new = self.tokenizer.decode(self.ids[self.prefix_offset:])[len(self.prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.prefix = ""
        return new


def check_vocab(tokenizer: Tokenizer, config: Config, tokenizer_path: Path) -> None:
    """Raise VariantError unless the tokenizer has the model's vocabulary size."""
    if tokenizer.n_words != config.vocab_size:
        raise VariantError(
            f"the tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but the model "
            f"expects {config.vocab_size}; use the {TOKENIZER} that belongs to this variant.")


def check_text(text: str, what: str) -> None:
    """Refuse text that cannot be encoded: a lone surrogate, which is how Python carries bytes
    that were not UTF-8 (a command-line argument) or what a page script can send ("\\ud800").

    Raises:
        GenerationError: naming `what` and the position of the bad character.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise GenerationError(
            f"{what} contains an invalid character at position {exc.start + 1} (a lone "
            f"surrogate, U+{ord(text[exc.start]):04X}, which is not UTF-8 text); remove it or "
            "pass the text again as UTF-8.") from None
