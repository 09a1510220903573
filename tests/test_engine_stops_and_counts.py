"""Engine.generate on a stand-in model (stub_engine) whose answers are chosen token by token:
stop strings, why an answer ended, token counts, and the repetition penalty's window."""

from __future__ import annotations

import random

import numpy as np
import pytest
from stub_engine import chain_engine, engine_over, piece_ids

from llama2_onnx.chat_session import ChatSettings, Conversation, EnginePool, describe, respond
from llama2_onnx.generation import _StopFilter
from llama2_onnx.openai_api import finish_reason
from llama2_onnx.sampling import REPETITION_WINDOW, SamplingSettings

GREEDY = SamplingSettings(temperature=0)
ANSWER = ("▁cat", "▁s", "at", "▁with", "▁you")  # " cat sat with you", then EOS


@pytest.fixture()
def engine(tokenizer):
    return chain_engine(tokenizer, piece_ids(tokenizer, *ANSWER))


def prompt(tokenizer) -> list[int]:
    return [tokenizer.bos_id, *piece_ids(tokenizer, "▁the")]


def run(engine, stop=(), max_new_tokens=64) -> list[str]:
    return list(engine.generate(prompt(engine.tokenizer), GREEDY, max_new_tokens, stop))


def test_the_stand_in_answers_with_its_chain_then_eos(engine):
    assert "".join(run(engine)) == " cat sat with you"
    assert engine.last_stats.stop_reason == "eos"


def test_a_stop_string_completed_by_the_last_allowed_token_is_a_stop(engine):
    assert "".join(run(engine, stop=[" sat"], max_new_tokens=3)) == " cat"
    stats = engine.last_stats
    assert (stats.stop_reason, stats.new_tokens, finish_reason(stats)) == ("stop string", 3,
                                                                         "stop")
    assert "".join(run(engine, stop=[" sat"], max_new_tokens=2)) == " cat s"  # not completed
    assert finish_reason(engine.last_stats) == "length"


def test_a_stop_string_completed_by_the_text_held_to_the_end_is_a_stop(tokenizer):
    """The last token starts a character it does not finish: its replacement character comes
    out only when the answer ends, and a stop string it completes still ends the answer."""
    engine = chain_engine(tokenizer, piece_ids(tokenizer, "▁cat", "<0xE2>"))
    assert "".join(run(engine, stop=["t\ufffd"], max_new_tokens=2)) == " ca"
    assert finish_reason(engine.last_stats) == "stop"
    assert "".join(run(engine, stop=["x\ufffd"], max_new_tokens=2)) == " cat\ufffd"
    assert finish_reason(engine.last_stats) == "length"


def test_a_stop_string_over_four_pieces_ends_the_answer_before_it(engine):
    pieces = run(engine, stop=["zz", "t sat w"])  # " ca|t", " s", "at", " w|ith"
    assert "".join(pieces) == " ca" and engine.last_stats.stop_reason == "stop string"
    assert engine.last_stats.new_tokens == 4
    assert "".join(run(engine, stop=["t sat x"])) == " cat sat with you"  # held, then let go


def test_an_answer_that_ends_on_eos_does_not_count_the_eos(engine):
    run(engine)
    stats = engine.last_stats
    assert stats.new_tokens == len(ANSWER) and stats.tokens == piece_ids(engine.tokenizer,
                                                                         *ANSWER)
    assert describe(stats).startswith("end of answer · ")
    assert f" {len(ANSWER)} new tokens" in describe(stats)


def test_the_chat_status_line_counts_the_answer_without_its_eos(engine):
    conv = Conversation(variant="stub")
    answers = list(respond(EnginePool(lambda variant: engine), conv, "the",
                           ChatSettings(sampling=GREEDY, max_new_tokens=20)))
    assert answers[-1] == " cat sat with you" == conv.exchanges[0].answer
    assert conv.status.startswith("end of answer · ") and f" · {len(ANSWER)} new tokens · " in (
        conv.status)


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Where an answer ends: before the stop string that is completed first (the longest of
    those completed at the same character)."""
    ends = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
    if not ends:
        return text, False
    end, minus_len = min(ends)
    return text[:end + minus_len], True


def test_stop_matching_agrees_with_a_search_of_the_whole_text_however_it_is_split():
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 14)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5)))
                 for _ in range(rng.randint(1, 4))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        stop, out, stopped = _StopFilter(stops), [], False
        for piece in pieces:
            given, stopped = stop.push(piece)
            out.append(given)
            if stopped:
                break
        if not stopped:
            out.append(stop.flush())
        assert ("".join(out), stopped) == reference_cut(text, stops), (text, stops, pieces)


class CountingStr(str):
    """A stop string that counts how often the matcher reads a character of it."""

    reads = 0

    def __getitem__(self, index):
        CountingStr.reads += 1
        return super().__getitem__(index)


def test_stop_matching_reads_a_bounded_number_of_characters_per_new_character():
    matcher = _StopFilter([CountingStr("a" * 200 + "b")])  # 200 characters held at a time
    CountingStr.reads = 0
    out = "".join(matcher.push("a")[0] for _ in range(2000))
    assert out == "a" * 1800 and CountingStr.reads <= 2 * 2000  # Knuth-Morris-Pratt's bound
    assert matcher.push("b") == ("", True)


def test_the_repetition_penalty_sees_the_last_window_of_prompt_and_answer(tokenizer):
    a, b, filler = piece_ids(tokenizer, "▁cat", "▁sun", "▁the")
    logits = np.full(tokenizer.n_words, -5.0, dtype=np.float32)
    logits[a], logits[b] = 1.0, 0.9  # a wins unless the penalty (2) halves it
    engine = engine_over(tokenizer, lambda token: logits, cache_len=256)
    settings = SamplingSettings(temperature=0, repetition_penalty=2.0)
    # 64 tokens after a: out of the window, a wins, then a (just made) is in it and b wins.
    # 63 tokens after a: in the window, b wins, then a has slid out of it and wins again.
    for after, expected in ((REPETITION_WINDOW, [a, b]), (REPETITION_WINDOW - 1, [b, a])):
        list(engine.generate([tokenizer.bos_id, a] + [filler] * after, settings, 2))
        assert engine.last_stats.tokens == expected, after
