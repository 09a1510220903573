"""A warm chat turn equals a cold one: after KV reuse through the chat session, the prompt is
Meta's format of the conversation, and its logits and greedy answer are those of a fresh engine
given the whole conversation at once; the same after regenerate, remove-last-turn and clipping."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from conftest import WORDS, tiny_config

from llama2_onnx.chat_format import Exchange
from llama2_onnx.chat_session import (
    ChatSettings,
    Conversation,
    EnginePool,
    regenerate,
    remove_last,
    respond,
)
from llama2_onnx.generation import Engine
from llama2_onnx.sampling import SamplingSettings

GREEDY = SamplingSettings(temperature=0)
SETTINGS = ChatSettings(system="be brief", sampling=GREEDY, max_new_tokens=8)


class Warm:
    """A chat engine pool whose engine records every prefill: the tokens asked for, how many
    were actually computed, and the logits returned."""

    def __init__(self, variant: str) -> None:
        self.variant, self.prefills, self.generated = variant, [], {}
        self.last_computed = 0
        self.pool = EnginePool(self._load)

    def _load(self, variant: str) -> Engine:
        engine = Engine.from_variant(variant, provider="cpu")
        prefill = engine.prefill

        def recording(tokens):
            logits = prefill(tokens)
            self.prefills.append((list(tokens), engine.last_prefill_count, np.array(logits)))
            return logits

        engine.prefill = recording
        return engine


@pytest.fixture(scope="module")
def chat_variant(tmp_path_factory) -> Path:
    """A tiny chat variant whose tokenizer keeps whitespace as written, as Llama 2's does
    (identity normalization, no collapsing of spaces), so every space of the format counts."""
    import sentencepiece as spm

    from llama2_onnx.export import ExportRequest, export_variant
    from llama2_onnx.synthetic import write_hf

    folder = tmp_path_factory.mktemp("chat_oracle")
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)]
    (folder / "corpus.txt").write_text("\n".join(lines + ["[INST] <<SYS>> <</SYS>> [/INST]"] * 5))
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
        vocab_size=320, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        num_threads=1, minloglevel=2)
    checkpoint = write_hf(folder / "hf", tiny_config(320, gqa=True), seed=21)
    return export_variant(ExportRequest(variant="chat", precision="float32", hf=checkpoint,
                                        tokenizer=folder / "tokenizer.model", out=folder,
                                        chat=True, progress=False))


@pytest.fixture()
def warm(chat_variant) -> Warm:
    return Warm(str(chat_variant))


def expected_prompt(tokenizer, conv: Conversation, system: str, generated: dict) -> list[int]:
    """The tokens the model should see for the last exchange of `conv`: Meta's chat format
    (restated here: system folded into the first kept user message, `<s>[INST] q [/INST] a </s>`
    per exchange, `<s>[INST] q [/INST]` last), where an answer whose generated ids are not how
    Meta's format would tokenize its text keeps the generated ids followed by EOS (what the
    model produced, so the cached keys and values stay valid)."""
    kept, last = conv.exchanges[conv.start:-1], conv.exchanges[-1].user
    bos, eos, encode = tokenizer.bos_id, tokenizer.eos_id, tokenizer.sp.EncodeAsIds
    ids: list[int] = []
    for index, exchange in enumerate(kept):
        question = exchange.user
        if index == 0 and system:
            question = f"<<SYS>>\n{system}\n<</SYS>>\n\n{question}"
        head = [bos] + encode(f"[INST] {question.strip()} [/INST]")
        full = [bos] + encode(f"[INST] {question.strip()} [/INST] {exchange.answer.strip()} ")
        made = generated[id(exchange)]
        canonical = full[:len(head)] == head and full[len(head):len(head) + len(made)] == made
        ids += full + [eos] if canonical else head + made + [eos]
    question = f"<<SYS>>\n{system}\n<</SYS>>\n\n{last}" if system and not kept else last
    return ids + [bos] + encode(f"[INST] {question.strip()} [/INST]")


def send(warm: Warm, conv: Conversation, user: str, settings: ChatSettings = SETTINGS,
         again: bool = False) -> None:
    """One turn (or a regenerate) through the chat session, checked against a cold engine."""
    for _ in (regenerate(warm.pool, conv, settings) if again
              else respond(warm.pool, conv, user, settings)):
        pass
    engine = warm.pool.get(warm.variant).engine
    warm.generated[id(conv.exchanges[-1])] = list(engine.last_stats.tokens)
    prompt, warm.last_computed, logits = warm.prefills[-1]
    assert prompt == expected_prompt(engine.tokenizer, conv, settings.system, warm.generated)
    cold = Engine.from_variant(warm.variant, provider="cpu")
    np.testing.assert_allclose(logits, cold.prefill(prompt), atol=1e-5, rtol=0)
    cold.reset()
    answer = "".join(cold.generate(prompt, settings.sampling, settings.max_new_tokens))
    assert conv.exchanges[-1].answer == answer


def test_warm_turns_equal_cold_turns(warm):
    conv = Conversation(variant=warm.variant)
    for i, user in enumerate(["the cat sat", "the dog ran", "she was home"]):
        send(warm, conv, user)
        prompt = warm.prefills[-1][0]
        assert conv.start == 0, "the history was clipped: shorten the messages"
        if i:
            assert warm.last_computed < len(prompt) // 2, "the cache was not reused"
    assert all(exchange.answer.strip() for exchange in conv.exchanges)


def test_regenerate_equals_a_cold_turn(warm):
    conv = Conversation(variant=warm.variant)
    send(warm, conv, "the cat sat")
    send(warm, conv, "the dog ran home")
    send(warm, conv, "", again=True)
    assert conv.exchanges[-1].user == "the dog ran home"
    assert warm.last_computed == 1 and len(conv.exchanges) == 2


def test_remove_last_turn_then_a_new_turn_equals_a_cold_turn(warm):
    conv = Conversation(variant=warm.variant)
    send(warm, conv, "the cat sat")
    send(warm, conv, "the dog ran home")
    remove_last(conv)
    send(warm, conv, "he was far away")
    assert len(conv.exchanges) == 2 and warm.last_computed < len(warm.prefills[-1][0])


def test_clipped_history_equals_a_cold_turn_on_what_is_kept(warm):
    conv = Conversation(variant=warm.variant)
    settings = ChatSettings(system="be kind", sampling=GREEDY, max_new_tokens=8,
                            max_history_tokens=70)
    for word in "sat ran was far home tree".split():
        send(warm, conv, f"the cat {word}", settings)
    assert conv.start > 1, "the history was never clipped"
    send(warm, conv, "the sun", settings)  # a warm turn after clipping reuses the new cache
    assert warm.last_computed < len(warm.prefills[-1][0]) // 2


def test_a_conversation_from_another_variant_is_metas_format(warm):
    """Answers written with another variant are re-tokenized as Meta's format has them
    (`[/INST] answer </s>`); the next turn's prompt, logits and answer then match a cold run."""
    talk = [("the cat sat", "the dog ran far away")]
    conv = Conversation(variant=warm.variant, ids_for="another variant",
                        exchanges=[Exchange(user, answer) for user, answer in talk])
    encode = warm.pool.get(warm.variant).engine.tokenizer.sp.EncodeAsIds
    for exchange in conv.exchanges:
        warm.generated[id(exchange)] = encode(exchange.answer)
    send(warm, conv, "the sun")
    send(warm, conv, "and the moon")
    assert warm.last_computed < len(warm.prefills[-1][0]) // 2
