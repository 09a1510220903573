"""Values a variant cannot hold are refused, never written as inf (issue 19, case 4).

The exporter checks every tensor as it streams: finite, and within what the variant stores
(float16: 65504; int4 matrices: their float16 block scales, 8 x 65504). Verification says
plainly when a variant's logits are not finite, without numpy's warnings, and the runtime
refuses to sample from non-finite logits. Each refusal: exit code 2, one `error:` line, no
traceback, and the checkpoint and output folder as they were.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT
from onnx import numpy_helper
from test_safe_export import assert_refused, export_cli, tree_digest

from llama2_onnx import safetensors_io
from llama2_onnx.errors import VerificationError
from llama2_onnx.export import ExportRequest, export_variant
from llama2_onnx.variant_folder import write_manifest

EMBED = "model.embed_tokens.weight"
WQ = "model.layers.1.self_attn.q_proj.weight"


def edited_checkpoint(source: Path, folder: Path, key: str,
                      change: Callable[[np.ndarray], None]) -> Path:
    """A copy of a Hugging Face checkpoint with tensor `key` changed in place by `change`."""
    shutil.copytree(source, folder)
    for file in sorted(folder.glob("*.safetensors")):
        infos = safetensors_io.read_header(file)
        if key in infos:
            arrays = {k: safetensors_io.read_tensor(info).copy() for k, info in infos.items()}
            change(arrays[key])
            safetensors_io.write_streaming(file, [(k, a.dtype, a.shape) for k, a in
                                                  arrays.items()], arrays.__getitem__,
                                           {"format": "pt"})
            return folder
    raise AssertionError(f"{key} is in no shard of {source}")


def set_at(index: tuple[int, ...], value: float) -> Callable[[np.ndarray], None]:
    def change(array: np.ndarray) -> None:
        array[index] = value
    return change


def refused_export(tmp_path: Path, checkpoint: Path, tokenizer_path: Path, precision: str,
                   *words: str) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    out.mkdir()
    before = tree_digest(checkpoint)
    run = export_cli("--hf", str(checkpoint), "--tokenizer", str(tokenizer_path), "--precision",
                     precision, "--variant", "v", "--out", str(out), "--no-progress")
    assert_refused(run, *words)
    assert "Warning" not in run.stderr
    assert tree_digest(checkpoint) == before and list(out.iterdir()) == []
    return run


@pytest.mark.parametrize("precision", ["float16", "int4"])
def test_an_embedding_float16_cannot_hold_is_refused_naming_it(tmp_path, make_checkpoint,
                                                               tokenizer_path, precision):
    """7e4 in one embedding row became inf (verification never reads that row)."""
    checkpoint = edited_checkpoint(make_checkpoint("hf"), tmp_path / "ckpt", EMBED,
                                   set_at((300, 7), 7e4))
    refused_export(tmp_path, checkpoint, tokenizer_path, precision, "tok_embeddings.weight",
                   EMBED, "model-00001-of-00002.safetensors", "70000", "[300, 7]",
                   "float16 holds (65504)", "--precision float32")


def test_a_matrix_whose_int4_scale_overflows_is_refused(tmp_path, make_checkpoint,
                                                        tokenizer_path):
    checkpoint = edited_checkpoint(make_checkpoint("hf"), tmp_path / "ckpt", WQ,
                                   set_at((2, 5), -6e5))
    refused_export(tmp_path, checkpoint, tokenizer_path, "int4", "layers.1.attention.wq.weight",
                   WQ, "-600000", "[2, 5]", "block scales allow (524032")


def test_values_the_variant_holds_are_exported(tmp_path, make_checkpoint, tokenizer_path):
    """6e4 fits float16 and 4e5 an int4 block scale (4e5 / 8): both are written as they are."""
    base = make_checkpoint("hf")
    for precision, key, value in (("float16", EMBED, 6e4), ("int4", WQ, 4e5)):
        checkpoint = edited_checkpoint(base, tmp_path / f"ckpt_{precision}", key,
                                       set_at((3, 1), value))
        folder = export_variant(ExportRequest(variant=precision, precision=precision,
                                              hf=checkpoint, tokenizer=tokenizer_path,
                                              out=tmp_path, progress=False, skip_verify=True))
        model = onnx.load(str(next((folder / "ONNX").glob("*.onnx"))))
        for tensor in model.graph.initializer:
            assert np.isfinite(numpy_helper.to_array(tensor).astype(np.float32)).all()


@pytest.mark.parametrize("value,kind", [(np.nan, "NaN"), (-np.inf, "an infinite value")])
def test_a_checkpoint_with_nan_or_inf_is_refused_naming_the_tensor(tmp_path, make_checkpoint,
                                                                   tokenizer_path, value, kind):
    key = "model.layers.0.mlp.down_proj.weight"
    checkpoint = edited_checkpoint(make_checkpoint("hf"), tmp_path / "ckpt", key,
                                   set_at((4, 9), value))
    refused_export(tmp_path, checkpoint, tokenizer_path, "float32",
                   "layers.0.feed_forward.w2.weight", key, f"holds {kind} at [4, 9]",
                   "download it again")


def test_overflowing_activations_are_reported_as_such(tmp_path, make_checkpoint,
                                                      tokenizer_path):
    """Every weight fits float16, but the final norm's 3e4 makes float16 logits overflow:
    verification used to report 'logit error nan ... report a bug' after numpy warnings."""
    checkpoint = edited_checkpoint(make_checkpoint("hf"), tmp_path / "ckpt", "model.norm.weight",
                                   lambda w: w.fill(3e4))
    refused_export(tmp_path, checkpoint, tokenizer_path, "float16", "verify FAILED (float16)",
                   "inf or NaN logits at step 1", "export with --precision float32",
                   "not written")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from numpy on the way
        with pytest.raises(VerificationError, match="float16 activations overflow"):
            export_variant(ExportRequest(variant="w", precision="float16", hf=checkpoint,
                                         tokenizer=tokenizer_path, out=tmp_path / "out",
                                         progress=False))


def test_the_runtime_refuses_non_finite_logits(tmp_path, make_variant):
    """A variant whose embedding table went bad after export (the manifest rewritten too, so
    the file checks pass): the CLI says so in one sentence instead of sampling from NaN."""
    folder = tmp_path / "v"
    shutil.copytree(make_variant("hf", "float32", True), folder)
    table = folder / "embeddings.safetensors"
    (info,) = safetensors_io.read_header(table).values()
    bad = np.full(info.shape, np.nan, np.float32)
    safetensors_io.write_streaming(table, [("weight", bad.dtype, bad.shape)], lambda _: bad)
    write_manifest(folder, "v")
    before = tree_digest(folder)
    run = subprocess.run([sys.executable, str(ROOT / "MinimumExample" / "Example_ONNX_LlamaV2.py"),
                          "--provider", "cpu", "--variant", str(folder), "--prompt", "the cat"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "Warning" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [run.stderr.strip().splitlines()[-1]], run.stderr
    assert "v produced non-finite logits" in errors[0] and "re-export" in errors[0]
    assert tree_digest(folder) == before
