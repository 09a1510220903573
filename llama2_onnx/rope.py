"""Rotary position embedding tables for the graph (the PyTorch reference computes its own)."""

from __future__ import annotations

import numpy as np


def rotary_cos_sin(head_dim: int, theta: float, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables of shape (length, head_dim // 2), computed in float64.

    Row p holds the angles of position p; column j pairs element j with element j + head_dim/2
    of each head (the half-split layout).
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(half, dtype=np.float64) / half))
    angles = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    return np.cos(angles), np.sin(angles)
