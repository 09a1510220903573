"""Perplexity of a variant over a text, scored in sliding windows of the variant's context."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import UserError


@dataclass
class Perplexity:
    perplexity: float
    tokens: int  # tokens scored (every token of the text but the first)
    window: int
    stride: int


def perplexity(engine, tokens: Sequence[int], window: int | None = None,
               stride: int | None = None) -> Perplexity:
    """exp(mean negative log-likelihood) of `tokens[1:]`, each predicted from what precedes it.

    Windows of `window` tokens (default: the engine's context) start every `stride` tokens
    (default: half a window); after the first, a window re-reads its first window - stride
    tokens as context in one prefill and scores the others one decode step at a time, so every
    token is scored once, with at least window - stride tokens of context when the text has them.

    Raises:
        UserError when the text has fewer than two tokens or the window/stride do not fit.
    """
    window = engine.context_len if window is None else window  # 0 is refused, not replaced
    stride = window // 2 if stride is None else stride
    if len(tokens) < 2:
        raise UserError("the text has fewer than two tokens; give a longer text.")
    if not 0 < stride <= window - 1 or window > engine.context_len:
        raise UserError(f"a window of {window} with stride {stride} does not fit a context of "
                        f"{engine.context_len}.")
    nll, scored, begin = 0.0, 0, 0
    while True:
        first = begin + window - stride if begin else 1  # first token this window scores
        end = min(begin + window, len(tokens))
        engine.reset()
        logits = engine.prefill(list(tokens[begin:first]))
        for j in range(first, end):
            nll -= _log_prob(logits, tokens[j])
            scored += 1
            if j + 1 < end:
                logits = engine.decode_step(tokens[j])
        if end == len(tokens):
            break
        begin += stride
    return Perplexity(float(np.exp(nll / scored)), scored, window, stride)


def _log_prob(logits: np.ndarray, token: int) -> float:
    x = logits.astype(np.float64)
    top = x.max()
    return float(x[token] - top - np.log(np.exp(x - top).sum()))
