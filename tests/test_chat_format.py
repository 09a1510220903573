"""Llama-2-chat formatting checked against a transcription of Meta's `chat_completion`."""

from __future__ import annotations

import random

import pytest

from llama2_onnx.chat_format import CHAT_TAGS, Exchange, Message, PromptBuilder
from llama2_onnx.errors import GenerationError
from llama2_onnx.tokenizer import Tokenizer

WORDS = ("the a cat dog sat on mat ran far away home system user answer question please help "
         "kind short reply tell me about river mountain sun moon light tree green blue").split()


def _corpus(lines: int = 400) -> list[str]:
    rng = random.Random(0)
    text = []
    for _ in range(lines):
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        text.append(sentence.capitalize() + rng.choice([".", "?", "!", ","]))
    return text + ["[INST] <<SYS>> <</SYS>> [/INST]"] * 5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text("\n".join(_corpus()) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tok"), vocab_size=320,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, minloglevel=2,
    )
    return Tokenizer.from_file(folder / "tok.model")


def reference_tokens(tokenizer: Tokenizer, dialog: list[dict]) -> list[int]:
    """Meta's llama/generation.py chat_completion, restated: fold the system prompt into the
    first user turn, then BOS [INST] q [/INST] a EOS per exchange, then BOS [INST] q [/INST]."""
    messages = [dict(m) for m in dialog]
    if messages[0]["role"] == "system":
        head = "<<SYS>>\n" + messages[0]["content"] + "\n<</SYS>>\n\n" + messages[1]["content"]
        messages = [{"role": "user", "content": head}] + messages[2:]
    ids: list[int] = []
    for i in range(0, len(messages) - 1, 2):
        question, answer = messages[i]["content"], messages[i + 1]["content"]
        text = "[INST] " + question.strip() + " [/INST] " + answer.strip() + " "
        ids += [tokenizer.bos_id] + tokenizer.sp.EncodeAsIds(text) + [tokenizer.eos_id]
    last = "[INST] " + messages[-1]["content"].strip() + " [/INST]"
    return ids + [tokenizer.bos_id] + tokenizer.sp.EncodeAsIds(last)


def dialog_tokens(tokenizer: Tokenizer, dialog: list[Message]) -> list[int]:
    return PromptBuilder(tokenizer, chat=True).from_messages(dialog)


def _chat(*contents: str, system: str | None = None) -> list[Message]:
    roles = ["user", "assistant"] * len(contents)
    dialog = [Message(role=r, content=c) for r, c in zip(roles, contents, strict=False)]
    return ([Message(role="system", content=system)] if system is not None else []) + dialog


DIALOGS = {
    "single": _chat("Tell me about the river."),
    "multi": _chat("Tell me about the cat.", "The cat sat on the mat.", "And the dog?"),
    "system": _chat("Help me.", system="Always reply short."),
    "system multi": _chat("Hi", "Hello there!", "Tell me about the moon.", "It is light.",
                          "Why?", system="You are kind."),
    "whitespace": _chat("  \n padded question \t", "  answer with spaces \n", " next  ",
                        system="  system with spaces  "),
    "unicode": _chat("Qu'est-ce que c'est? \u00e9t\u00e9 \u2603", "Un bonhomme de neige.",
                     "Merci \u2764"),
}


@pytest.mark.parametrize("name", DIALOGS)
def test_dialog_tokens_match_meta_reference(tokenizer: Tokenizer, name: str) -> None:
    dialog = DIALOGS[name]
    assert dialog_tokens(tokenizer, dialog) == reference_tokens(tokenizer, dialog)


def test_single_turn_layout(tokenizer: Tokenizer) -> None:
    ids = dialog_tokens(tokenizer, _chat("  hello  "))
    assert ids[0] == tokenizer.bos_id and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == "[INST] hello [/INST]"


def test_exchanges_are_wrapped_in_bos_eos(tokenizer: Tokenizer) -> None:
    builder = PromptBuilder(tokenizer, chat=True)
    exchanges = [Exchange(u, a, builder.answer_ids(u, a))
                 for u, a in (("Hi", "Hello there!"), ("Tell me about the moon.", "It is light."))]
    first = builder.prompt("You are kind.", [], "Hi")
    assert tokenizer.decode(first) == "[INST] <<SYS>>\nYou are kind.\n<</SYS>>\n\nHi [/INST]"
    ids = builder.prompt("You are kind.", exchanges, "Why?")
    assert ids == dialog_tokens(tokenizer, DIALOGS["system multi"])
    assert ids.count(tokenizer.bos_id) == 3 and ids.count(tokenizer.eos_id) == 2
    for exchange in exchanges:
        assert exchange.answer_ids[-1] == tokenizer.eos_id


def test_user_text_never_becomes_control_tokens(tokenizer: Tokenizer) -> None:
    ids = dialog_tokens(tokenizer, _chat("<s> hi </s>"))
    assert ids.count(tokenizer.bos_id) == 1 and ids.count(tokenizer.eos_id) == 0
    assert "<s> hi </s>" in tokenizer.decode(ids)


@pytest.mark.parametrize("tag", CHAT_TAGS)
@pytest.mark.parametrize("where", ["system", "user", "assistant", "last user"])
def test_chat_tags_in_any_message_are_refused_as_metas_reference_does(tokenizer, tag, where):
    """A user could otherwise end their turn early or forge a system prompt token for token."""
    text = f"hi {tag} there"
    dialog = _chat("a" if where != "user" else text, text if where == "assistant" else "b",
                   text if where == "last user" else "c",
                   system=text if where == "system" else "be kind")
    with pytest.raises(GenerationError, match=f"contains '{tag.replace('[', '.')}"):
        dialog_tokens(tokenizer, dialog)


def test_base_variants_keep_the_tags_as_text(tokenizer: Tokenizer) -> None:
    builder = PromptBuilder(tokenizer, chat=False)
    ids = builder.prompt("<<SYS>> be kind", [], "[INST] hi [/INST]")
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.decode(ids) == "<<SYS>> be kind [INST] hi [/INST]"
    assert builder.prompt("", [], "The cat sat") == builder.completion("The cat sat")


@pytest.mark.parametrize("dialog, bad", [
    ([], "empty"),
    (_chat("a", "b"), "'assistant'"),
    ([Message(role="assistant", content="a")], "'assistant'"),
    ([Message(role="system", content="s")], "'system'"),
    (_chat("a", "b") + _chat("c") + _chat("d"), "'user'"),
    (_chat("a") + [Message(role="system", content="s")], "'system'"),
    ([{"role": "user", "content": None}], "None"),
    ([{"role": "bot", "content": "x"}], "'bot'"),
])
def test_bad_dialogs_raise(tokenizer: Tokenizer, dialog: list, bad: str) -> None:
    with pytest.raises(GenerationError, match=bad):
        dialog_tokens(tokenizer, dialog)


def test_completion_is_bos_plus_text(tokenizer: Tokenizer) -> None:
    for chat in (True, False):
        builder = PromptBuilder(tokenizer, chat=chat)
        ids = builder.completion("The cat sat")
        assert ids == [tokenizer.bos_id] + tokenizer.sp.EncodeAsIds("The cat sat")
        with pytest.raises(GenerationError, match="empty"):
            builder.completion("")
