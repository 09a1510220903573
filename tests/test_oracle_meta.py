"""Meta's format against Meta's own formulation (complex-number interleaved rotary on the raw
consolidated.*.pth tensors, written in tests/oracles.py), never through our reader or its
half-split permutation; and the synthetic Meta writer checked against the same formulas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from oracles import (
    load_meta,
    meta_logits,
    transformers_from_hf,
    transformers_from_meta,
    transformers_logits,
)
from test_oracle_transformers import BOUND, PROMPT, STEPS, check_against, export, free_running

from llama2_onnx.generation import Engine

SEQUENCE = [1, 17, 93, 5, 250, 42, 42, 7, 311, 64, 3, 128, 200, 9, 77, 150]


def write_raw_meta(folder: Path, vocab: int, dim: int = 64, n_layers: int = 2, n_heads: int = 4,
                   n_kv_heads: int = 2, theta: float = 10000.0, eps: float = 1e-5,
                   shards: int = 2, dtype=torch.float32, seed: int = 0) -> Path:
    """A Meta checkpoint made here with torch alone (not by llama2_onnx.synthetic): random
    tensors under Meta's names, split over `shards` files the way model parallelism splits."""
    gen = torch.Generator().manual_seed(seed)
    head_dim, multiple_of = dim // n_heads, 32
    hidden = int(2 * 4 * dim / 3)  # Meta's FeedForward: 2/3 of 4*dim, rounded up to multiple_of
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,),
              "output.weight": (vocab, dim)}
    for i in range(n_layers):
        shapes.update({
            f"layers.{i}.attention.wq.weight": (n_heads * head_dim, dim),
            f"layers.{i}.attention.wk.weight": (n_kv_heads * head_dim, dim),
            f"layers.{i}.attention.wv.weight": (n_kv_heads * head_dim, dim),
            f"layers.{i}.attention.wo.weight": (dim, n_heads * head_dim),
            f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
            f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.ffn_norm.weight": (dim,)})
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensor = 1 + 0.1 * torch.randn(shape, generator=gen)
            pieces = [tensor] * shards
        else:
            scale = 1.0 if name.startswith("tok_") else shape[1] ** -0.5
            tensor = torch.randn(shape, generator=gen) * scale
            rows = name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight",
                                  "w3.weight", "output.weight"))
            pieces = torch.chunk(tensor, shards, dim=0 if rows else 1)
        for s, piece in enumerate(pieces):
            parts[s][name] = piece.contiguous().to(dtype)
    folder.mkdir(parents=True)
    for s, part in enumerate(parts):
        torch.save(part, folder / f"consolidated.{s:02d}.pth")
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
              "multiple_of": multiple_of, "ffn_dim_multiplier": None, "norm_eps": eps,
              "rope_theta": theta, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))
    return folder


@pytest.mark.parametrize("precision,kv_heads,theta,dtype", [
    ("float32", 4, 10000.0, torch.float32),
    ("float32", 2, 100.0, torch.bfloat16),
    ("float16", 2, 500000.0, torch.bfloat16),
])
def test_meta_export_follows_metas_formulas(tmp_path, tokenizer, tokenizer_path, precision,
                                            kv_heads, theta, dtype):
    folder = write_raw_meta(tmp_path / "meta", tokenizer.n_words, n_kv_heads=kv_heads,
                            theta=theta, dtype=dtype, seed=kv_heads)
    engine = Engine.from_variant(export(folder, "meta", precision, tokenizer_path,
                                        tmp_path / "out"), provider="cpu")
    prompt = tokenizer.encode(PROMPT)
    tokens, logits = free_running(engine, prompt, STEPS)
    params, state = load_meta(folder)
    check_against(meta_logits(params, state, prompt + tokens[:-1]), prompt, tokens, logits,
                  BOUND[precision])


def test_the_two_oracles_agree_on_a_meta_checkpoint(tmp_path, tokenizer):
    """Complex interleaved rotary on raw tensors == transformers' rotate_half on the rows
    reordered by our reading of the permutation: each formulation checks the other."""
    folder = write_raw_meta(tmp_path / "meta", tokenizer.n_words, n_kv_heads=1, theta=50.0)
    params, state = load_meta(folder)
    expected = meta_logits(params, state, SEQUENCE)
    got = transformers_logits(transformers_from_meta(folder), SEQUENCE)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("gqa,shards", [(False, 1), (True, 2)])
def test_synthetic_meta_writer_follows_metas_formulas(tmp_path, tokenizer, gqa, shards):
    """write_meta(seed) read with Meta's formulas is the model write_hf(seed) is for
    transformers: the writer's permutation is Meta's layout, not just our reader's inverse."""
    from llama2_onnx.synthetic import write_hf, write_meta

    config = tiny_config(tokenizer.n_words, gqa, rope_theta=300.0)
    meta = write_meta(tmp_path / "meta", config, seed=5, shards=shards)
    hf = write_hf(tmp_path / "hf", config, seed=5)
    params, state = load_meta(meta)
    expected = transformers_logits(transformers_from_hf(hf), SEQUENCE)
    np.testing.assert_allclose(meta_logits(params, state, SEQUENCE), expected, atol=1e-5)
