"""The committed demo variant: exact greedy tokens (regenerated only by retraining) and the
README's first command working on a fresh clone."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

from llama2_onnx.generation import Engine
from llama2_onnx.sampling import SamplingSettings
from llama2_onnx.variant_folder import check_files
from llama2_onnx.variants import DEMO_VARIANT

DEMO = ROOT / DEMO_VARIANT
PROMPT = "In the beginning"
# Greedy continuation of PROMPT by demo/ (tools/train_demo.py on an H100, see MODEL-CARD.md).
EXPECTED_TOKENS = [271, 261, 1040, 271, 502, 350, 329, 2004, 403, 2001, 290, 261, 385, 339, 290,
                   261, 505, 271, 261, 1731, 2001, 270, 290, 261, 505, 271, 735, 2001, 385, 339,
                   290, 261]
EXPECTED_TEXT = (" of the reign of Damascus, in the which is in the land of the living, and in the "
                 "land of Egypt, which is in the")


def test_demo_files_match_their_manifest_and_stay_small():
    assert check_files(DEMO, sha256=True) == []
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert size <= 25 * 2**20
    assert not (DEMO / ".gitattributes").exists()  # committed as plain files, not LFS


def test_demo_greedy_tokens_are_the_recorded_ones():
    engine = Engine.from_variant(DEMO, provider="cpu")
    prompt = engine.tokenizer.encode(PROMPT)
    text = "".join(engine.generate(prompt, SamplingSettings(temperature=0), max_new_tokens=32))
    assert engine.last_stats.tokens == EXPECTED_TOKENS
    assert text == EXPECTED_TEXT


def test_readme_first_command_uses_the_demo_and_prints_english():
    run = subprocess.run([sys.executable, str(ROOT / "MinimumExample" / "Example_ONNX_LlamaV2.py"),
                          "--prompt", "And God said", "--seed", "0", "--max_gen_len", "40"],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert run.returncode == 0, run.stderr
    assert "[demo on cpu]" in run.stderr
    words = run.stdout.split()
    assert run.stdout.startswith("And God said") and len(words) > 15
    common = {"the", "and", "of", "unto", "he", "that", "to", "in", "him", "said", "LORD"}
    assert sum(w.strip(",.;:") in common for w in words) >= 5


def test_running_needs_only_the_core_dependencies():
    """`pip install -e .` brings numpy, sentencepiece, onnx (to derive the provider's graph
    form, graph_forms.py) and onnxruntime; export-only packages (torch, tqdm) and the
    chat/publish extras must not be needed to run a variant."""
    blocked = ["torch", "tqdm", "gradio", "huggingface_hub", "safetensors"]
    code = ("import sys, runpy\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "sys.argv = ['x', '--prompt', 'And God said', '--max_gen_len', '5']\n"
            f"runpy.run_path({str(ROOT / 'MinimumExample' / 'Example_ONNX_LlamaV2.py')!r},"
            " run_name='__main__')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("And God said")
