"""The optimized-graph cache can never make a run silently wrong, nor grow without limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import ROOT

from llama2_onnx import graph_cache
from llama2_onnx.generation import Engine


def greedy(folder: Path, **kwargs) -> list[int]:
    engine = Engine.from_variant(folder, provider="cpu", **kwargs)
    logits, tokens = engine.prefill(engine.tokenizer.encode("the cat sat")), []
    for _ in range(8):
        tokens.append(int(logits.argmax()))
        logits = engine.decode_step(tokens[-1])
    return tokens


def cache_files(folder: Path) -> tuple[Path, Path, Path]:
    return graph_cache.paths(next((folder / "ONNX").glob("*.onnx")), "cpu")


def test_zeroed_and_touched_cache_is_rebuilt(variant):
    expected = greedy(variant, graph_cache=False)
    assert greedy(variant) == expected
    onnx_path, data, record = cache_files(variant)
    assert data.stat().st_size > 0 and record.exists()
    data.write_bytes(b"\0" * data.stat().st_size)  # same size, newest mtime
    os.utime(data)
    assert greedy(variant) == expected
    assert data.read_bytes().strip(b"\0")  # rebuilt


def test_cache_key_follows_the_source_content(variant):
    expected = greedy(variant)
    onnx_path, _, record = cache_files(variant)
    assert greedy(variant) == expected and record.read_text() == record.read_text()
    reused = record.stat().st_mtime_ns
    assert greedy(variant) == expected
    assert record.stat().st_mtime_ns == reused  # same content: reused
    manifest = variant / "manifest.json"
    data = json.loads(manifest.read_text())
    graph_rel = f"ONNX/{onnx_path.name.removesuffix('.cpu.onnx')}.onnx"
    data["files"][graph_rel]["sha256"] = "0" * 64  # the source says it changed (same size)
    manifest.write_text(json.dumps(data))
    assert greedy(variant) == expected
    assert json.loads(record.read_text())["key"]["source"][graph_rel]["sha256"] == "0" * 64


def test_verify_hashes_the_whole_cache(variant, monkeypatch):
    expected = greedy(variant)
    onnx_path, data, record = cache_files(variant)
    graph = next((variant / "ONNX").glob("*.onnx"))
    monkeypatch.setattr(graph_cache, "_SAMPLES", 2)  # sample only the first and last 64 bytes
    monkeypatch.setattr(graph_cache, "_BLOCK", 64)
    key = json.loads(record.read_text())["key"]
    graph_cache.record(graph_cache.CachePlan(graph, graph, write_to=onnx_path, key=key))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2 + 7] ^= 0xFF  # outside the sampled blocks
    data.write_bytes(bytes(raw))
    Engine.from_variant(variant, provider="cpu")
    assert data.read_bytes() == raw  # the cheap check cannot see it...
    assert greedy(variant, verify=True) == expected
    assert data.read_bytes() != raw  # ...--verify did, and rebuilt it


def test_one_cache_per_provider_whatever_the_context(variant):
    for length in (32, 64, 96, None):
        Engine.from_variant(variant, provider="cpu", max_seq_len=length)
    files = sorted(p.name for p in (variant / "ONNX" / ".cache").iterdir())
    assert len(files) == 3, files  # graph, its data, its record


def test_unreadable_cache_is_rebuilt(variant):
    expected = greedy(variant)
    onnx_path, _, _ = cache_files(variant)
    onnx_path.write_bytes(b"garbage" * 10)
    assert greedy(variant) == expected


def test_read_only_folder_runs_without_cache_and_says_so_once(variant):
    """A folder the process may not write (os.access says so; as root, chmod would not)."""
    run = subprocess.run(
        [sys.executable, "-c",
         "import os, sys, runpy; os.access = lambda *a, **k: False; "
         f"sys.argv = ['x', '--variant', {str(variant)!r}, '--prompt', 'the', "
         "'--temperature', '0', '--max_gen_len', '3', '--provider', 'cpu']; "
         f"runpy.run_path({str(ROOT / 'MinimumExample' / 'Example_ONNX_LlamaV2.py')!r}, "
         "run_name='__main__')"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("read-only") == 1
    assert not (variant / "ONNX" / ".cache" / "x").exists()
    assert not any((variant / "ONNX" / ".cache").glob("*.json"))


def test_cached_and_uncached_logits_agree(variant):
    first = Engine.from_variant(variant, provider="cpu")
    second = Engine.from_variant(variant, provider="cpu")
    third = Engine.from_variant(variant, provider="cpu", graph_cache=False)
    prompt = first.tokenizer.encode("the moon")
    a, b, c = (e.prefill(prompt).copy() for e in (first, second, third))
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)
