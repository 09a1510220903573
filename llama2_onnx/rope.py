"""Rotary position embeddings: the inverse frequencies (with rope scaling) and the graph's tables.

`inverse_frequencies` is the one definition of the frequencies; the graph's cos/sin tables
(here) and the PyTorch reference (reference.py, which rotates with its own code) both take
them from it. The scaled forms follow Hugging Face transformers' definitions
(`modeling_rope_utils`), checked against transformers itself in tests/test_llama_family.py:

- "linear" (position interpolation): every frequency divided by `factor`.
- "llama3" (Llama 3.1's): wavelengths shorter than original_max_position_embeddings /
  high_freq_factor keep their frequency, those longer than original_max_position_embeddings /
  low_freq_factor are divided by `factor`, and the ones between are interpolated smoothly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

ROPE_TYPES = ("linear", "llama3")
# The keys each scaling type's dict holds (Hugging Face's names), besides "rope_type".
ROPE_KEYS = {"linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings")}


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: dict[str, Any] | None = None) -> np.ndarray:
    """Angle per position of each rotary pair, float64 of shape (head_dim // 2,).

    Pair i turns by theta^(-2i/head_dim) per position, then `scaling` (a validated
    Config.rope_scaling, or None) adjusts it.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(half, dtype=np.float64) / half))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    assert scaling["rope_type"] == "llama3", scaling  # Config refuses every other type
    return _llama3(inv_freq, scaling)


def _llama3(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    trained = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    long_waves = wavelength > trained / low  # the slowest pairs: fully interpolated
    short_waves = wavelength < trained / high  # the fastest pairs: unchanged
    smooth = (trained / wavelength - low) / (high - low)  # 0 at the long end, 1 at the short end
    between = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(long_waves, inv_freq / factor, np.where(short_waves, inv_freq, between))


def rotary_cos_sin(head_dim: int, theta: float, length: int,
                   scaling: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables of shape (length, head_dim // 2), computed in float64.

    Row p holds the angles of position p; column j pairs element j with element j + head_dim/2
    of each head (the half-split layout).
    """
    inv_freq = inverse_frequencies(head_dim, theta, scaling)
    angles = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    return np.cos(angles), np.sin(angles)
