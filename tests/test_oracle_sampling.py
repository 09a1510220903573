"""Sampled tokens follow the distribution defined by temperature, top-k and top-p, computed
here from the definitions (Meta's sample_top_p restated: sort, keep the tokens whose preceding
probability mass is below top_p, renormalise) and compared with many seeded draws."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from llama2_onnx.sampling import SamplingSettings, make_rng, sample_token

LOGITS = np.array([2.0, 1.6, 1.5, 0.9, 0.7, 0.4, 0.0, -0.3, -0.8, -1.2, -2.0, -3.0], np.float32)
DRAWS = 20000


def expected_distribution(logits: np.ndarray, temperature: float, top_k: int,
                          top_p: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    if top_k:
        probs[np.argsort(-probs)[top_k:]] = 0.0
    probs /= probs.sum()
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]  # mass of the more probable tokens
    kept = np.zeros_like(probs)
    kept[order[before < top_p]] = probs[order[before < top_p]]
    return kept / kept.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.5, 0, 0.8), (1.7, 0, 0.6), (0.8, 5, 0.95), (1.0, 0, 1.0), (2.5, 0, 0.97)])
def test_draws_follow_the_defined_distribution(temperature, top_k, top_p):
    expected = expected_distribution(LOGITS, temperature, top_k, top_p)
    settings = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=1.0)
    rng = make_rng(1234)
    seen = Counter(sample_token(LOGITS, settings, rng) for _ in range(DRAWS))
    got = np.array([seen[i] / DRAWS for i in range(LOGITS.size)])
    assert set(np.flatnonzero(got)) == set(np.flatnonzero(expected)), "a different support"
    assert np.abs(got - expected).max() < 0.015, np.round(np.stack([got, expected]), 3)
