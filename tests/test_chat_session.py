"""Chat sessions: KV reuse between turns, Meta's format, clipping, regenerate, stop, isolation."""

from __future__ import annotations

import pytest

from llama2_onnx.chat_format import Exchange, Message, PromptBuilder
from llama2_onnx.chat_session import (
    ChatSettings,
    Conversation,
    EnginePool,
    fit_history,
    new_conversation,
    regenerate,
    remove_last,
    request_stop,
    respond,
)
from llama2_onnx.chat_ui import chat_settings, no_variant_page, variant_choices
from llama2_onnx.errors import GenerationError, VariantError
from llama2_onnx.generation import Engine, common_prefix
from llama2_onnx.sampling import SamplingSettings

GREEDY = ChatSettings(system="be brief", sampling=SamplingSettings(temperature=0),
                      max_new_tokens=6)


@pytest.fixture()
def chat_variant(make_variant):
    return str(make_variant("hf", "float32", True, chat=True))


@pytest.fixture()
def pool():
    loads: list[str] = []

    def load(variant: str) -> Engine:
        loads.append(variant)
        return Engine.from_variant(variant, provider="cpu")

    made = EnginePool(load)
    made.loads = loads
    return made


def last(answers) -> str:
    """Run a streamed answer to the end; its final text."""
    return ([""] + list(answers))[-1]


def turn(pool: EnginePool, conv: Conversation, text: str, settings=GREEDY) -> str:
    return last(respond(pool, conv, text, settings))


def test_second_turn_prefills_only_new_tokens(pool, chat_variant):
    conv = Conversation(variant=chat_variant)
    turn(pool, conv, "the cat sat")
    slot = pool.get(chat_variant)
    cached = list(slot.engine.tokens)
    prompt = slot.fmt.prompt(GREEDY.system, conv.exchanges, "and the dog ran")
    turn(pool, conv, "and the dog ran")
    assert common_prefix(cached, prompt) == len(cached)
    assert slot.engine.last_stats.prompt_tokens == len(prompt)
    assert slot.engine.last_prefill_count == len(prompt) - len(cached)
    new_segment = slot.fmt.user_ids("and the dog ran")
    assert slot.engine.last_prefill_count <= len(new_segment) + 3  # + answer tail and EOS
    assert len(conv.exchanges) == 2 and "prefilled" in conv.status


def test_history_is_metas_format_when_answers_retokenize_the_same(tokenizer):
    fmt = PromptBuilder(tokenizer, chat=True)
    talk = [("the cat sat", "on the mat"), ("he ran", " far away home "), ("she was", "")]
    exchanges = [Exchange(user, answer, fmt.answer_ids(user, answer)) for user, answer in talk]
    dialog = [Message(role="system", content="be kind")]
    for user, answer in talk:
        dialog += [Message(role="user", content=user), Message(role="assistant", content=answer)]
    dialog.append(Message(role="user", content="the dog"))
    assert fmt.prompt("be kind", exchanges, "the dog") == fmt.from_messages(dialog)
    clipped = dialog[:1] + dialog[3:]
    assert fmt.prompt("be kind", exchanges[1:], "the dog") == fmt.from_messages(clipped)


def test_generated_ids_that_retokenize_differently_are_kept(tokenizer):
    fmt = PromptBuilder(tokenizer, chat=True)
    spelled = [tokenizer.sp.PieceToId(f"<0x{ord(c):02X}>") for c in "cat"]
    answer = tokenizer.decode(spelled)
    assert answer == "cat" and tokenizer.encode("cat", bos=False) != spelled
    assert fmt.answer_ids("the", answer, spelled) == spelled + [tokenizer.eos_id]
    canonical = tokenizer.encode("cat", bos=False)
    assert fmt.answer_ids("the", answer, canonical)[:len(canonical)] == canonical


def test_clipping_keeps_the_newest_exchanges_that_fit(tokenizer):
    fmt = PromptBuilder(tokenizer, chat=True)
    talk = [(f"the cat {word}", f"the dog {word}") for word in "sat ran was far home".split()]
    conv = Conversation(exchanges=[Exchange(u, a, fmt.answer_ids(u, a)) for u, a in talk])
    settings = ChatSettings(system="be kind", max_history_tokens=90, max_new_tokens=8)
    prompt = fit_history(fmt, conv, "the sun", settings, context_len=128)
    assert 0 < conv.start < len(talk)
    assert len(prompt) <= 90
    assert prompt == fmt.prompt("be kind", conv.exchanges[conv.start:], "the sun")
    one_more = fmt.prompt("be kind", conv.exchanges[conv.start - 1:], "the sun")
    assert len(one_more) > 90
    start = conv.start
    with pytest.raises(GenerationError, match="shorten it"):
        fit_history(fmt, conv, "the moon " * 40, settings, context_len=128)
    assert conv.start == start


def test_a_message_too_long_for_the_history_changes_nothing(pool, chat_variant):
    conv = Conversation(variant=chat_variant)
    settings = ChatSettings(sampling=SamplingSettings(temperature=0), max_new_tokens=8,
                            max_history_tokens=100)
    turn(pool, conv, "the cat sat", settings)
    turn(pool, conv, "the dog ran", settings)
    before = (conv.start, list(conv.exchanges), conv.messages())
    with pytest.raises(GenerationError, match="history allows 100"):
        turn(pool, conv, "the moon " * 60, settings)
    assert (conv.start, conv.exchanges, conv.messages()) == before and not conv.busy
    turn(pool, conv, "he was", settings)
    slot = pool.get(chat_variant)
    seen = slot.fmt.prompt("", conv.exchanges[:2], "he was")
    assert conv.start == 0 and slot.engine.last_stats.prompt_tokens == len(seen)
    assert slot.engine.tokens[:len(seen)] == seen


def test_long_chat_drops_oldest_exchanges_and_keeps_answering(pool, chat_variant):
    conv = Conversation(variant=chat_variant)
    settings = ChatSettings(sampling=SamplingSettings(temperature=0), max_new_tokens=8,
                            max_history_tokens=70)
    for word in "sat ran was far home tree".split():
        turn(pool, conv, f"the cat {word}", settings)
        assert pool.get(chat_variant).engine.last_stats.prompt_tokens <= 70
    assert conv.start > 0 and len(conv.exchanges) == 6
    slot = pool.get(chat_variant)
    seen = slot.fmt.prompt("", conv.exchanges[conv.start:-1], "the cat tree")
    assert slot.engine.tokens[:len(seen)] == seen


def test_regenerate_replaces_the_answer_and_prefills_one_token(pool, chat_variant):
    conv = Conversation(variant=chat_variant)
    first = turn(pool, conv, "the cat sat")
    again = last(regenerate(pool, conv, GREEDY))
    assert again == first and len(conv.exchanges) == 1
    assert pool.get(chat_variant).engine.last_prefill_count == 1


def test_remove_last_turn_and_new_conversation(pool, chat_variant):
    conv = Conversation(variant=chat_variant)
    turn(pool, conv, "the cat sat")
    turn(pool, conv, "the dog ran")
    engine = pool.get(chat_variant).engine
    cached = list(engine.tokens)
    assert remove_last(conv).user == "the dog ran" and len(conv.exchanges) == 1
    prompt = pool.get(chat_variant).fmt.prompt(GREEDY.system, conv.exchanges, "he was")
    turn(pool, conv, "he was")
    shared = common_prefix(cached, prompt)
    assert shared >= len(prompt) - len(pool.get(chat_variant).fmt.user_ids("he was"))
    assert engine.last_prefill_count == len(prompt) - shared
    new_conversation(conv)
    assert conv.exchanges == [] and conv.messages() == []
    with pytest.raises(GenerationError, match="no turn to remove"):
        remove_last(conv)
    with pytest.raises(GenerationError, match="nothing|no answer"):
        list(regenerate(pool, conv, GREEDY))


def test_stop_ends_generation_before_the_next_token(pool, chat_variant):
    conv = Conversation(variant=chat_variant)
    settings = ChatSettings(sampling=SamplingSettings(temperature=0), max_new_tokens=60)
    pool.get(chat_variant)
    answers = respond(pool, conv, "the cat sat", settings)
    partial = next(answers) + next(answers)
    engine = pool.get(chat_variant).engine
    made = engine.last_stats.new_tokens
    request_stop(conv)
    assert list(answers) == []
    assert engine.last_stats.new_tokens == made and engine.last_stats.stop_reason == "stopped"
    assert conv.status.startswith("stopped") and conv.exchanges[0].answer in partial
    assert not conv.busy and conv.pending is None


def test_two_conversations_do_not_mix(pool, chat_variant):
    a, b = Conversation(variant=chat_variant), Conversation(variant=chat_variant)
    turn(pool, a, "the cat sat")
    pool.get(chat_variant)
    first_b = respond(pool, b, "the dog ran far", GREEDY)
    waiting_a = respond(pool, a, "he was home", GREEDY)
    next(first_b)  # b holds the engine now
    assert next(waiting_a) == "" and a.status.startswith("waiting")
    list(first_b)
    list(waiting_a)
    slot = pool.get(chat_variant)
    expected = slot.fmt.prompt(GREEDY.system, a.exchanges[:1], "he was home")
    assert slot.engine.tokens[:len(expected)] == expected
    assert [m["content"] for m in a.messages() if m["role"] == "user"] == [
        "the cat sat", "he was home"]
    assert [m["content"] for m in b.messages() if m["role"] == "user"] == ["the dog ran far"]
    assert pool.loads == [chat_variant]


def test_base_variant_continues_plain_text_and_reuses_the_cache(pool, make_variant):
    variant = str(make_variant("hf", "float32", True))
    conv = Conversation(variant=variant)
    turn(pool, conv, "the cat sat")
    slot = pool.get(variant)
    cached = list(slot.engine.tokens)
    tok = slot.engine.tokenizer
    assert cached[:4] == [tok.bos_id] + tok.encode("be brief", bos=False)[:3]
    turn(pool, conv, "and the dog")
    assert slot.engine.last_prefill_count == (slot.engine.last_stats.prompt_tokens
                                              - len(cached))


def test_bad_messages_and_busy_conversations_are_refused(pool, chat_variant):
    conv = Conversation(variant=chat_variant)
    with pytest.raises(GenerationError, match="empty"):
        list(respond(pool, conv, "  ", GREEDY))
    pool.get(chat_variant)
    running = respond(pool, conv, "the cat", GREEDY)
    next(running)
    with pytest.raises(GenerationError, match="Stop first"):
        list(respond(pool, conv, "the dog", GREEDY))
    running.close()
    assert not conv.busy and len(conv.exchanges) == 1
    with pytest.raises(GenerationError, match="max new tokens"):
        ChatSettings(max_new_tokens=0)


def test_page_helpers_list_variants_and_read_controls(tmp_path, chat_variant):
    choices, not_ready = variant_choices(tmp_path, None)
    assert choices == [] and not_ready and not any(s.ready for s in not_ready)
    page = no_variant_page(tmp_path, not_ready)
    assert "No variant is ready" in page and "git submodule init" in page
    assert variant_choices(tmp_path, chat_variant)[0] == [(chat_variant, chat_variant)]
    with pytest.raises(VariantError, match="nope"):
        variant_choices(tmp_path, "nope")
    settings = chat_settings("  ", 0, 1, 8.0, 100.0)
    assert settings.system == "" and settings.max_new_tokens == 8
    assert settings.sampling.temperature == 0
    with pytest.raises(GenerationError, match="top_p"):
        chat_settings("", 0.6, 0, 8, 100)
