"""Exported variants against transformers' LlamaForCausalLM on the same weights (an oracle that
shares no code with the package): tiny seeded models, both checkpoint formats, MHA and GQA,
several rope_theta and norm_eps values; logits within the precision's bound and 32 greedy
tokens equal."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from oracles import transformers_from_hf, transformers_from_meta, transformers_logits

from llama2_onnx.export import ExportRequest, export_variant
from llama2_onnx.generation import Engine

PROVIDER = os.environ.get("LLAMA2_ONNX_TEST_PROVIDER", "cpu")


def provider_for(precision: str) -> str:
    """float32 variants run on the CPU on every machine (placement.place)."""
    return "cpu" if precision == "float32" else PROVIDER
# Largest |logit difference| against the float64 oracle; logits here are of magnitude ~1-5.
BOUND = {"float32": 1e-4, "float16": 5e-2}
STEPS = 32
PROMPT = "the cat sat on the mat and the dog"

# (format, precision, n_kv_heads, rope_theta, norm_eps, seed)
CASES = [
    ("hf", "float32", 4, 10000.0, 1e-5, 11),
    ("hf", "float16", 2, 500000.0, 1e-6, 12),
    ("hf", "float32", 2, 100.0, 1e-5, 13),
    ("meta", "float32", 4, 10000.0, 1e-6, 14),
    ("meta", "float16", 2, 1000000.0, 1e-5, 15),
    ("meta", "float32", 1, 100.0, 1e-5, 16),
]


def write_checkpoint(folder: Path, fmt: str, config, seed: int) -> Path:
    from llama2_onnx.synthetic import write_hf, write_meta

    if fmt == "hf":
        return write_hf(folder, config, seed=seed, shards=2)
    return write_meta(folder, config, seed=seed, shards=2)


def export(folder: Path, fmt: str, precision: str, tokenizer_path: Path, out: Path) -> Path:
    """Our exporter, its own verification skipped: the oracle is the only judge here."""
    return export_variant(ExportRequest(variant="oracle", precision=precision, out=out,
                                        tokenizer=tokenizer_path, progress=False,
                                        skip_verify=True, **{fmt: folder}))


def free_running(engine: Engine, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits (steps, vocab) they were chosen from, using the KV cache."""
    logits, tokens, seen = engine.prefill(prompt), [], []
    for _ in range(steps):
        seen.append(np.array(logits, dtype=np.float64))
        tokens.append(int(logits.argmax()))
        logits = engine.decode_step(tokens[-1])
    return tokens, np.stack(seen)


def check_against(oracle: np.ndarray, prompt: list[int], tokens: list[int], logits: np.ndarray,
                  bound: float) -> None:
    """`oracle` holds the oracle's logits at every position of prompt + tokens (teacher-forced
    on our tokens): each step's logits within `bound`, and each greedy token the oracle's
    argmax (a different token only where the oracle itself has a tie within `bound`)."""
    expected = oracle[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
    worst = float(np.abs(logits - expected).max())
    assert worst <= bound, f"max |logit diff| {worst:.3g} > {bound:g}"
    for step, (token, row) in enumerate(zip(tokens, expected, strict=True)):
        best = int(row.argmax())
        gap = row[best] - row[token]
        assert token == best or gap <= bound, (
            f"step {step}: greedy token {token}, the oracle's {best} (gap {gap:.3g})")


@pytest.mark.parametrize("fmt,precision,kv_heads,theta,eps,seed", CASES)
def test_export_matches_transformers(tmp_path, tokenizer, tokenizer_path, fmt, precision,
                                     kv_heads, theta, eps, seed):
    config = tiny_config(tokenizer.n_words, n_kv_heads=kv_heads, rope_theta=theta, norm_eps=eps)
    checkpoint = write_checkpoint(tmp_path / "ckpt", fmt, config, seed)
    engine = Engine.from_variant(export(checkpoint, fmt, precision, tokenizer_path,
                                        tmp_path / "out"), provider=provider_for(precision))
    prompt = tokenizer.encode(PROMPT)
    tokens, logits = free_running(engine, prompt, STEPS)
    model = (transformers_from_hf if fmt == "hf" else transformers_from_meta)(checkpoint)
    oracle = transformers_logits(model, prompt + tokens[:-1])
    check_against(oracle, prompt, tokens, logits, BOUND[precision])
    assert len(set(tokens)) > 3, "a degenerate continuation would prove little"
