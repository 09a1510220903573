"""A real Engine over a stand-in model whose next token depends only on the last one, so tests
choose the exact tokens an answer is made of (and where it ends) without an ONNX graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from conftest import tiny_config

from llama2_onnx.generation import Engine
from llama2_onnx.tokenizer import Tokenizer


class ChainRunner:
    """Implements generation.Runner: the logits after a token are `logits_after(token)`."""

    provider, supports_continued_prefill, max_chunk, pads, slots = "stub", True, None, False, 1

    def __init__(self, logits_after: Callable[[int], np.ndarray], cache_len: int = 128) -> None:
        self.logits_after, self.cache_len = logits_after, cache_len

    def run(self, embeds: np.ndarray, start: int) -> np.ndarray:
        return self.logits_after(int(embeds[-1, 0]))  # the embedding of a token is its id


def engine_over(tokenizer: Tokenizer, logits_after: Callable[[int], np.ndarray],
                cache_len: int = 128) -> Engine:
    vocab = tokenizer.n_words
    embeddings = np.arange(vocab, dtype=np.float32)[:, None]  # (vocab, 1)
    return Engine(ChainRunner(logits_after, cache_len), tokenizer, embeddings,
                  tiny_config(vocab), name="stub")


def chain_engine(tokenizer: Tokenizer, answer: Sequence[int], cache_len: int = 128) -> Engine:
    """An engine that answers any prompt (greedily) with `answer`, then EOS: after a token of
    the answer comes the next one, after any other token the first. The answer's tokens must
    all differ (and not be EOS)."""
    chain = [*answer, tokenizer.eos_id]
    assert len(set(chain)) == len(chain), "a chain's tokens must all differ"
    follows = dict(zip(chain[:-1], chain[1:], strict=True))

    def logits_after(token: int) -> np.ndarray:
        logits = np.zeros(tokenizer.n_words, dtype=np.float32)
        logits[follows.get(token, answer[0])] = 10.0
        return logits

    return engine_over(tokenizer, logits_after, cache_len)


def piece_ids(tokenizer: Tokenizer, *pieces: str) -> list[int]:
    """Token ids of SentencePiece pieces ("▁the"), each checked to be in the vocabulary."""
    ids = [tokenizer.sp.PieceToId(p) for p in pieces]
    assert all(tokenizer.sp.IdToPiece(i) == p for i, p in zip(ids, pieces, strict=True)), pieces
    return ids
