"""Next-token sampling: pure functions on a logits vector with an explicit random generator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import GenerationError

# Tokens examined before falling back to sorting the whole vocabulary for top-p.
_NUCLEUS_FIRST_LOOK = 64


REPETITION_WINDOW = 64


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen; checked when constructed.

    `temperature=0` is greedy decoding (argmax, no random draw). `top_k=0` and `top_p=1`
    switch those filters off; `repetition_penalty=1` switches the penalty off. The penalty
    applies to the tokens of the last REPETITION_WINDOW positions, in every mode when given;
    left unset it is 1.1 when sampling (llama.cpp's default, which keeps small models out of
    loops) and 1.0 for greedy decoding, so plain greedy stays a pure argmax. Temperature and
    top-p default to Meta's reference values.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.repetition_penalty is None:
            default = 1.1 if _is_real(self.temperature) and self.temperature > 0 else 1.0
            object.__setattr__(self, "repetition_penalty", default)
        self.validate()

    def validate(self) -> None:
        """Check every field.

        Raises:
            GenerationError: naming the first invalid field, its value and the valid range.
        """
        t, p, k, r = self.temperature, self.top_p, self.top_k, self.repetition_penalty
        if not _is_real(t) or not (0 <= t < math.inf):
            _bad("temperature", t, "use 0 for greedy decoding or a positive number like 0.6")
        if not _is_real(p) or not (0 < p <= 1):
            _bad("top_p", p, "use a number above 0 and at most 1 (1 switches it off)")
        if not _is_int(k) or k < 0:
            _bad("top_k", k, "use a whole number of tokens, or 0 to switch it off")
        if not _is_real(r) or not (0 < r < math.inf):
            _bad("repetition_penalty", r, "use a positive number such as 1.1 (1 is off)")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            _bad("seed", self.seed, "use a non-negative whole number, or leave it unset")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _bad(name: str, value: object, fix: str) -> None:
    raise GenerationError(f"{name}={value!r} is invalid; {fix}.")


def make_rng(seed: int | None = None) -> np.random.Generator:
    """Create the random generator that `sample_token` draws from.

    Args:
        seed: a non-negative integer for reproducible draws, or None for a fresh random seed.

    Returns:
        A numpy Generator (PCG64).

    Raises:
        GenerationError: if `seed` is negative or not an integer.
    """
    if seed is not None and (not _is_int(seed) or seed < 0):
        _bad("seed", seed, "use a non-negative whole number, or leave it unset")
    return np.random.default_rng(seed)


def apply_repetition_penalty(
    logits: np.ndarray, previous_tokens: Sequence[int] | np.ndarray, penalty: float
) -> np.ndarray:
    """Make tokens already seen less likely (CTRL, Keskar et al. 2019).

    A seen token's positive logit is divided by `penalty` and a negative one multiplied by
    it, once per distinct token however often it occurred.

    Args:
        logits: scores over the vocabulary, shape (vocab,).
        previous_tokens: token ids already in the context (prompt and/or generated).
        penalty: above 1 discourages repetition, 1 changes nothing.

    Returns:
        A new array; `logits` is left unchanged.
    """
    out = np.array(logits, copy=True)
    ids = np.asarray(previous_tokens, dtype=np.intp)
    if penalty == 1 or ids.size == 0:
        return out
    seen = out[ids]  # read before writing, so a repeated id is penalized once
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def sample_token(
    logits: np.ndarray,
    settings: SamplingSettings,
    rng: np.random.Generator,
    previous_tokens: Sequence[int] | np.ndarray = (),
) -> int:
    """Choose the next token id.

    Order: repetition penalty, then greedy argmax when temperature is 0; otherwise
    temperature, top-k, top-p (the smallest most-probable set whose probability reaches
    top_p, at least one token) and one draw from `rng`.

    Args:
        logits: scores for the next position, shape (vocab,); float16 is upcast.
        settings: validated sampling settings.
        rng: the generator to draw from (see `make_rng`); untouched when greedy.
        previous_tokens: ids the repetition penalty applies to; pass an int array to avoid
            converting a long list on every step.

    Returns:
        The chosen token id.
    """
    scores = np.asarray(logits, dtype=np.float32)
    assert scores.ndim == 1, f"expected logits of shape (vocab,), got {scores.shape}"
    if settings.repetition_penalty != 1 and len(previous_tokens):
        scores = apply_repetition_penalty(scores, previous_tokens, settings.repetition_penalty)
    if settings.temperature == 0:
        return int(np.argmax(scores))
    ids, scores = _top_k(scores, settings.top_k)
    weights = np.exp((scores - scores.max()) / np.float32(settings.temperature))
    keep = _nucleus(weights, settings.top_p)
    ids, weights = ids[keep], weights[keep]
    cumulative = np.cumsum(weights, dtype=np.float64)
    choice = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(ids[min(choice, ids.size - 1)])


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the k highest scores (unordered, argpartition is O(vocab)) and those scores."""
    if k == 0 or k >= scores.size:
        return np.arange(scores.size), scores
    ids = np.argpartition(scores, scores.size - k)[scores.size - k:]
    return ids, scores[ids]


def _nucleus(weights: np.ndarray, top_p: float) -> np.ndarray | slice:
    """Indices of the smallest most-probable set holding top_p of the (unnormalized) weight."""
    if top_p >= 1:
        return slice(None)
    target = top_p * weights.sum(dtype=np.float64)
    # Usually a few tokens hold the mass: look among the top few first, with no full sort.
    top, _ = _top_k(weights, _NUCLEUS_FIRST_LOOK)
    top = top[np.argsort(-weights[top])]
    keep = _count_to(np.cumsum(weights[top], dtype=np.float64), target)
    if keep <= top.size:
        return top[:keep]
    descending = np.sort(weights)[::-1]
    keep = min(_count_to(np.cumsum(descending, dtype=np.float64), target), weights.size)
    threshold = descending[keep - 1]
    above = np.flatnonzero(weights > threshold)
    tied = np.flatnonzero(weights == threshold)[: keep - above.size]  # ties: lowest ids first
    return np.concatenate([above, tied])


def _count_to(cumulative: np.ndarray, target: float) -> int:
    """How many leading entries it takes for `cumulative` to reach `target` (len + 1: never)."""
    return int(np.searchsorted(cumulative, target, side="left")) + 1
