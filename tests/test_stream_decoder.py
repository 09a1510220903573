"""Streamed text pieces join to exactly what decoding all the tokens at once gives."""

from __future__ import annotations

import numpy as np
from conftest import ROOT

from llama2_onnx.tokenizer import StreamDecoder, Tokenizer


def test_pieces_join_to_the_whole_decode_for_random_token_runs():
    tokenizer = Tokenizer.from_file(ROOT / "demo" / "tokenizer.model")
    vocab = tokenizer.sp.GetPieceSize()
    rng = np.random.default_rng(0)
    for _ in range(200):
        context = [int(i) for i in rng.integers(3, vocab, rng.integers(0, 4))]
        ids = [int(i) for i in rng.integers(3, vocab, rng.integers(1, 3 * StreamDecoder.WINDOW))]
        decoder = StreamDecoder(tokenizer, context)
        streamed = "".join(decoder.push(token) for token in ids) + decoder.flush()
        before = context[-1:]
        whole = tokenizer.decode(before + ids)[len(tokenizer.decode(before)):]
        assert streamed == whole, (context, ids)
