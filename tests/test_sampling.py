"""Sampling: greedy, seeded draws, top-k, top-p, temperature and repetition penalty."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from llama2_onnx.errors import GenerationError
from llama2_onnx.sampling import (
    SamplingSettings,
    apply_repetition_penalty,
    make_rng,
    sample_token,
)

VOCAB = 32000


def _logits(seed: int = 0, scale: float = 3.0, vocab: int = VOCAB) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * scale).astype(np.float32)


def _draws(logits: np.ndarray, settings: SamplingSettings, n: int, seed: int = 0) -> Counter:
    rng = make_rng(seed)
    return Counter(sample_token(logits, settings, rng) for _ in range(n))


def _nucleus_by_sorting(logits: np.ndarray, temperature: float, top_p: float) -> set[int]:
    """The smallest most-probable set reaching top_p, by a full sort in float64."""
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    n = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
    return set(order[:n].tolist())


def test_greedy_is_argmax_and_draws_nothing() -> None:
    rng = make_rng(5)
    state = rng.bit_generator.state
    greedy = SamplingSettings(temperature=0)
    for seed in range(20):
        logits = _logits(seed)
        assert sample_token(logits, greedy, rng) == int(np.argmax(logits))
        assert sample_token(logits.astype(np.float16), greedy, rng) == int(
            np.argmax(logits.astype(np.float16)))
    assert rng.bit_generator.state == state


def test_seeded_draws_are_reproducible() -> None:
    settings = SamplingSettings(temperature=1.0, top_p=0.95, top_k=50, seed=42)
    logits = [_logits(seed, scale=1.0) for seed in range(50)]
    first = [sample_token(x, settings, make_rng(settings.seed)) for x in logits]
    rng_a, rng_b = make_rng(7), make_rng(7)
    assert [sample_token(x, settings, rng_a) for x in logits] == [
        sample_token(x, settings, rng_b) for x in logits]
    assert first == [sample_token(x, settings, make_rng(42)) for x in logits]
    assert len(set(_draws(_logits(0, scale=0.1), settings, 200))) > 1  # really random


def test_top_k_1_equals_greedy() -> None:
    rng = make_rng(0)
    for seed in range(20):
        logits = _logits(seed)
        settings = SamplingSettings(temperature=1.5, top_k=1, top_p=1.0)
        assert sample_token(logits, settings, rng) == int(np.argmax(logits))


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    logits = _logits(3, scale=0.01)  # nearly flat: the top token holds ~1/32000
    assert _draws(logits, SamplingSettings(temperature=1.0, top_p=1e-9), 50).keys() == {
        int(np.argmax(logits))}


def test_top_k_keeps_the_k_highest() -> None:
    logits = _logits(1, scale=0.01)
    allowed = set(np.argsort(-logits)[:5].tolist())
    seen = _draws(logits, SamplingSettings(temperature=1.0, top_k=5, top_p=1.0), 500)
    assert set(seen) == allowed


@pytest.mark.parametrize("scale, top_p", [(3.0, 0.9), (3.0, 0.5), (0.3, 0.9), (0.05, 0.2)])
def test_top_p_keeps_the_nucleus(scale: float, top_p: float) -> None:
    """Both the quick path (nucleus among the top 64) and the full-sort path."""
    logits = _logits(2, scale=scale)
    nucleus = _nucleus_by_sorting(logits, 0.7, top_p)
    small = len(nucleus) < 100
    seen = _draws(logits, SamplingSettings(temperature=0.7, top_p=top_p), 3000 if small else 300)
    assert set(seen) <= nucleus
    if small:
        assert set(seen) == nucleus


def test_top_p_ties_keep_lowest_ids() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    seen = _draws(logits, SamplingSettings(temperature=1.0, top_p=0.5), 5000)
    assert max(seen) < 500 and len(seen) > 450


def test_top_p_applies_after_top_k() -> None:
    logits = np.log(np.array([0.05, 0.4, 0.3, 0.2, 0.05], dtype=np.float32))
    settings = SamplingSettings(temperature=1.0, top_k=3, top_p=0.6)
    assert set(_draws(logits, settings, 2000)) == {1, 2}  # 0.4/0.9 < 0.6 <= 0.7/0.9


def test_masked_tokens_are_never_drawn() -> None:
    logits = np.full(100, -np.inf, dtype=np.float32)
    logits[[3, 70]] = [0.0, 1.0]
    assert set(_draws(logits, SamplingSettings(temperature=1.0, top_p=1.0), 300)) == {3, 70}


def test_temperature_1_draws_follow_softmax() -> None:
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    logits = np.log(probs).astype(np.float32) + 5.0
    n = 20000
    seen = _draws(logits, SamplingSettings(temperature=1.0, top_p=1.0), n)
    for token, p in enumerate(probs):
        assert abs(seen[token] / n - p) < 0.015, (token, seen[token] / n, p)


def test_low_temperature_sharpens() -> None:
    logits = np.log(np.array([0.2, 0.3, 0.5], dtype=np.float32))
    cold = _draws(logits, SamplingSettings(temperature=0.2, top_p=1.0), 2000)
    hot = _draws(logits, SamplingSettings(temperature=1.0, top_p=1.0), 2000)
    assert cold[2] > 1800 > hot[2]


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = np.array([2.0, -2.0, 1.0, 0.0, 4.0], dtype=np.float32)
    before = logits.copy()
    out = apply_repetition_penalty(logits, [0, 1, 1, 1, 3, 0], 2.0)
    np.testing.assert_array_equal(out, [1.0, -4.0, 1.0, 0.0, 4.0])
    np.testing.assert_array_equal(logits, before)
    assert apply_repetition_penalty(logits, [0, 1], 1.0) is not logits
    np.testing.assert_array_equal(apply_repetition_penalty(logits, [], 1.3), logits)


def test_repetition_penalty_steers_sampling() -> None:
    logits = np.array([3.0, 2.5, -1.0], dtype=np.float32)
    greedy = SamplingSettings(temperature=0, repetition_penalty=1.5)
    assert sample_token(logits, greedy, make_rng(0), previous_tokens=[0]) == 1
    assert sample_token(logits, greedy, make_rng(0), previous_tokens=np.array([2])) == 0
    hot = SamplingSettings(temperature=1.0, top_p=1.0, repetition_penalty=3.0)
    rng = make_rng(0)
    seen = Counter(sample_token(logits, hot, rng, previous_tokens=[0, 0]) for _ in range(2000))
    assert seen[1] > seen[0]


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan), ("top_p", -1),
    ("top_k", -1), ("top_k", 2.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
    ("seed", -3), ("seed", 1.5),
])
def test_invalid_settings_name_the_value(field: str, value: float) -> None:
    with pytest.raises(GenerationError, match=rf"{field}={value!r} is invalid; "):
        SamplingSettings(**{field: value})


def test_valid_edge_settings() -> None:
    """The edges of each range are accepted and mean what SamplingSettings says: temperature 0
    is argmax, top_k 0 and top_p 1 switch those filters off; numpy scalars are numbers."""
    logits = _logits(4)
    edges = SamplingSettings(temperature=0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0)
    assert (edges.temperature, edges.top_p, edges.top_k, edges.repetition_penalty,
            edges.seed) == (0, 1.0, 0, 1.0, 0)
    assert sample_token(logits, edges, make_rng(0)) == int(np.argmax(logits))
    numpy_typed = SamplingSettings(temperature=np.float32(0.7), top_p=1, top_k=np.int64(40))
    assert numpy_typed.top_k == 40 and numpy_typed.repetition_penalty == 1.1  # sampling default
    assert set(_draws(logits, numpy_typed, 300)) <= set(np.argsort(-logits)[:40].tolist())


def test_make_rng_rejects_negative_seed() -> None:
    with pytest.raises(GenerationError, match="seed=-1"):
        make_rng(-1)
    assert make_rng(None).random() != make_rng(None).random()


def test_default_repetition_penalty_is_for_sampling_only() -> None:
    assert SamplingSettings().repetition_penalty == 1.1
    assert SamplingSettings(temperature=0).repetition_penalty == 1.0
    assert SamplingSettings(temperature=0, repetition_penalty=1.3).repetition_penalty == 1.3
