"""Tokenizers (Llama 2's SentencePiece, Hugging Face tokenizer.json) and a streaming decoder
that keeps word spacing and multi-byte characters right."""

# Which backend: the file decides (variant_folder.is_hf_tokenizer): tokenizer.model is
# SentencePiece, tokenizer.json is Hugging Face `tokenizers` with tokenizer_config.json (BOS,
# EOS, add_bos_token, chat_template) and optionally generation_config.json (more stop ids) beside
# it. A variant folder carries the one it was exported with (variant_folder.variant_tokenizer).
#
# Both encode text a user typed as plain text: SentencePiece has no control tokens in text, and
# the tokenizer.json backend encodes with special-token parsing off (`encode_special_tokens`),
# so `<|im_end|>` typed in a message is the pieces of those characters. Only `encode_markup`
# (a chat template's own text, chat_format) parses them.

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .chat_template import ChatTemplate
from .errors import GenerationError, VariantError

if TYPE_CHECKING:
    from .config import Config
from .files import check_not_lfs_pointer
from .variant_folder import (
    GENERATION_CONFIG,
    HF_TOKENIZER,
    TOKENIZER,
    TOKENIZER_CONFIG,
    is_hf_tokenizer,
)


class Tokenizer:
    """Llama 2's SentencePiece tokenizer. Text is encoded as plain text: a user typing `<s>` or
    `[INST]` gets those characters, never the control tokens."""

    chat_template: ChatTemplate | None = None  # Llama 2 chat's format is chat_format's own

    def __init__(self, processor) -> None:
        self.sp = processor
        self.n_words: int = processor.vocab_size()
        self.bos_id: int = processor.bos_id()
        self.eos_id: int = processor.eos_id()
        self.stop_ids: frozenset[int] = frozenset({self.eos_id})

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

    def encode_markup(self, text: str, plain: Sequence[tuple[int, int]] = ()) -> list[int]:
        """A template's text: SentencePiece reads no control tokens in text, so as `encode`."""
        return self.encode(text, bos=False)

    def has_special_text(self, text: str) -> bool:
        """Whether `encode_markup` would read control tokens in `text`: never here."""
        return False

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; an id past the tokenizer's pieces (a model whose embedding table is
        padded to a round size can choose one) gives none, as with tokenizer.json."""
        return self.sp.DecodeIds([i for i in ids if i < self.n_words])


def open_tokenizer(path: Path) -> Tokenizer | HFTokenizer:
    """The tokenizer in `path`: tokenizer.json (with its tokenizer_config.json beside it) or a
    SentencePiece model.

    Raises:
        VariantError naming the fix when the files are missing or not a tokenizer.
    """
    return HFTokenizer.from_file(path) if is_hf_tokenizer(path) else Tokenizer.from_file(path)


class HFTokenizer:
    """A Hugging Face tokenizer.json (byte-level BPE: Llama 3, SmolLM2; or any other model the
    `tokenizers` library reads) with its tokenizer_config.json and generation_config.json.

    `encode(text, bos)` adds BOS only where the tokenizer does (`add_bos_token`, else its
    post-processor: Llama 3 adds `<|begin_of_text|>`, SmolLM2 nothing), so BOS is never doubled;
    special tokens typed in `text` stay text. `stop_ids` is EOS and generation_config's
    `eos_token_id` (`<|eot_id|>`, `<|im_end|>`): generation ends at any of them.
    """

    def __init__(self, plain, markup, bos_id: int | None, eos_id: int, adds_bos: bool,
                 stop_ids: frozenset[int], chat_template: ChatTemplate | None) -> None:
        self.plain, self.markup = plain, markup  # special-token parsing off / on
        vocab = plain.get_vocab(with_added_tokens=True)
        self.n_words: int = max(vocab.values()) + 1 if vocab else 0
        self.bos_id, self.eos_id, self.adds_bos = bos_id, eos_id, adds_bos
        self.stop_ids, self.chat_template = stop_ids, chat_template
        special = {i: t.content for i, t in plain.get_added_tokens_decoder().items() if t.special}
        self.special_ids, self.special_texts = frozenset(special), tuple(special.values())

    @classmethod
    def from_file(cls, path: Path) -> HFTokenizer:
        """Read tokenizer.json, the tokenizer_config.json beside it and, if present,
        generation_config.json.

        Raises:
            VariantError naming the file and the fix.
        """
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        text = _read_text(path, f"pass the {HF_TOKENIZER} that came with the model")
        try:
            plain, markup = Backend.from_str(text), Backend.from_str(text)
        except Exception:  # the Rust library raises plain Exception for a malformed file
            raise VariantError(f"{path} is not a Hugging Face tokenizer file; use the "
                               f"{HF_TOKENIZER} that came with the model.") from None
        plain.encode_special_tokens = True
        settings = _read_json(path.with_name(TOKENIZER_CONFIG), required=True)
        generation = _read_json(path.with_name(GENERATION_CONFIG), required=False)
        token_ids = _TokenIds(plain, path.with_name(TOKENIZER_CONFIG))
        bos_id = token_ids.of(settings.get("bos_token"), "bos_token")
        eos_id = token_ids.of(settings.get("eos_token"), "eos_token")
        extra = generation.get("eos_token_id")
        extra = [extra] if isinstance(extra, int) else (extra or [])
        if not isinstance(extra, list) or not all(isinstance(i, int) and 0 <= i < token_ids.n
                                                  for i in extra):
            raise VariantError(f"{path.with_name(GENERATION_CONFIG)} has eos_token_id "
                               f"{generation.get('eos_token_id')!r}; it must be a token id or a "
                               "list of them: fix or remove the file.")
        if eos_id is None and not extra:
            raise VariantError(f"{path.with_name(TOKENIZER_CONFIG)} names no eos_token, so "
                               "generation could not end; add the model's eos_token.")
        eos_id = extra[0] if eos_id is None else eos_id
        adds_bos = _adds_bos(plain, bos_id, settings.get("add_bos_token"))
        template = _template(settings.get("chat_template"), path.with_name(TOKENIZER_CONFIG))
        tokens = {name: _token_text(settings.get(name)) for name in
                  ("bos_token", "eos_token", "unk_token", "pad_token")}
        chat = ChatTemplate(template, tokens, str(path.with_name(TOKENIZER_CONFIG))) \
            if template else None
        return cls(plain, markup, bos_id, eos_id, adds_bos, frozenset({eos_id, *extra}), chat)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text` as plain text (special tokens in it are not parsed); BOS first
        when `bos` and the tokenizer adds one, EOS last when `eos`.

        Raises:
            GenerationError when `text` holds lone surrogates (bytes that were not UTF-8).
        """
        check_text(text, "the text")
        ids = self.plain.encode(text, add_special_tokens=False).ids
        head = [self.bos_id] if bos and self.adds_bos and self.bos_id is not None else []
        return head + ids + ([self.eos_id] if eos else [])

    def encode_markup(self, text: str, plain: Sequence[tuple[int, int]] = ()) -> list[int]:
        """A chat template's text, its special tokens parsed (they are the format's control
        tokens), nothing added; the (start, end) character spans `plain` (messages' text) stay
        plain text.

        The whole text is encoded in one go (the tokens transformers gives) unless a special
        token lies inside a plain span; then the spans are encoded apart, as plain text.

        Raises:
            GenerationError when `text` holds lone surrogates, as `encode`.
        """
        check_text(text, "the chat template's text")
        encoding = self.markup.encode(text, add_special_tokens=False)
        if not any(a < end and start < b for (a, b), token in
                   zip(encoding.offsets, encoding.ids, strict=True)
                   if token in self.special_ids for start, end in plain):
            return list(encoding.ids)
        ids, pos = [], 0
        for start, end in plain:
            ids += self.markup.encode(text[pos:start], add_special_tokens=False).ids
            ids += self.plain.encode(text[start:end], add_special_tokens=False).ids
            pos = end
        return ids + self.markup.encode(text[pos:], add_special_tokens=False).ids

    def has_special_text(self, text: str) -> bool:
        """Whether `encode_markup` would read control tokens in `text`."""
        return any(t in text for t in self.special_texts)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special (control) tokens and ids past the vocabulary give none, as
        SentencePiece's control tokens do."""
        return self.plain.decode(list(ids), skip_special_tokens=True)


class _TokenIds:
    """Token text in tokenizer_config.json -> its id, refusing text that is not one token."""

    def __init__(self, backend, source: Path) -> None:
        self.backend, self.source = backend, source
        vocab = backend.get_vocab(with_added_tokens=True)
        self.n = max(vocab.values()) + 1 if vocab else 0

    def of(self, value: object, key: str) -> int | None:
        text = _token_text(value)
        if text is None:
            return None
        found = self.backend.token_to_id(text)
        if found is None:
            raise VariantError(f"{self.source} says {key} is {text!r}, which is not a token of "
                               f"the {HF_TOKENIZER} beside it; use the files that came together.")
        return found


def _token_text(value: object) -> str | None:
    """A token as tokenizer_config.json writes it: a string or {"content": ...}; None if unset."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _adds_bos(backend, bos_id: int | None, setting: object) -> bool:
    """add_bos_token when tokenizer_config.json says it, else whether the post-processor puts
    BOS first."""
    if bos_id is None:
        return False
    if isinstance(setting, bool):
        return setting
    ids = backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id and ids != backend.encode(
        "a", add_special_tokens=False).ids


def _template(value: object, source: Path) -> str | None:
    """chat_template: a string, or a list of {name, template} of which "default" is used."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise VariantError(f"{source} has a chat_template that is neither a string nor a list "
                       "holding a \"default\" {name, template}; fix it or take the model's own.")


def _read_text(path: Path, fix: str) -> str:
    if not path.is_file():
        raise VariantError(f"tokenizer file {path} does not exist; {fix}.")
    check_not_lfs_pointer(path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VariantError(f"cannot read {path} ({exc}); {fix}.") from None


def _read_json(path: Path, required: bool) -> dict:
    """A JSON object file; {} for an optional one that is absent."""
    if not required and not path.is_file():
        return {}
    what = f"the {path.name} that came with the model's {HF_TOKENIZER}"
    try:
        data = json.loads(_read_text(path, f"put {what} beside it"))
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise VariantError(f"{path} is not a JSON object; use {what}.")
    return data


class StreamDecoder:
    """Turns tokens into text pieces as they arrive.

    SentencePiece drops the leading space of the first piece it decodes, and a multi-byte
    character may span several byte tokens (SentencePiece's byte fallback, every byte-level BPE:
    Llama 3, SmolLM2), so each new token is decoded together with the tokens before it and only
    the new, complete text is returned: a decode ending in U+FFFD (an incomplete character) is
    held back until the character's last byte arrives.
    """

    WINDOW = 16  # tokens decoded together at most (plus the one before them)

    def __init__(self, tokenizer: Tokenizer | HFTokenizer, context: list[int] | None = None
                 ) -> None:
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


def check_vocab(tokenizer: Tokenizer | HFTokenizer, config: Config, tokenizer_path: Path
                ) -> None:
    """Raise VariantError when the tokenizer has more ids than the model has embedding rows (a
    model may have more rows than its tokenizer has tokens: padded tables, Llama 3's 128256)."""
    if tokenizer.n_words > config.vocab_size:
        raise VariantError(
            f"the tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but the model "
            f"expects at most {config.vocab_size}; use the tokenizer that belongs to this "
            "variant.")


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
