"""tools/make_random_checkpoint.py's Hugging Face output is a folder transformers itself loads
(sharded with its index, the stated torch_dtype), and its logits are our reference's."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from conftest import ROOT

from llama2_onnx.checkpoints import HFSource
from llama2_onnx.export import load_reference
from llama2_onnx.reference import Transformer
from llama2_onnx.staging import TOOL_MARK


def make_random(out, *args: str) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "make_random_checkpoint.py"),
                          "--shape", "small", *args, "--out", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_transformers_loads_a_sharded_random_checkpoint(tmp_path):
    import transformers

    out = tmp_path / "ckpt"
    out.mkdir()  # an empty folder is written into
    make_random(out, "--dtype", "float32", "--shards", "2")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 10
    model = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    reference = load_reference(HFSource(out), Transformer)
    tokens = torch.tensor([[1, 100, 2000, 31000, 7, 42]])
    with torch.no_grad():
        theirs = model(tokens).logits[0].numpy()
        ours = reference(tokens)[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=1e-3)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_running_again_replaces_only_its_own_files(tmp_path):
    """A second run into the folder it wrote (fewer shards) leaves no shard of the first,
    which would otherwise mix two checkpoints in one folder."""
    out = tmp_path / "ckpt"
    make_random(out, "--dtype", "float16", "--shards", "3")
    make_random(out, "--dtype", "float16", "--shards", "1")
    assert sorted(p.name for p in out.iterdir()) == [
        TOOL_MARK, "config.json", "model.safetensors", "tokenizer.model"]
    assert HFSource(out).config.dim == 512
