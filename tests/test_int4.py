"""int4 variants: the quantizer's layout against ONNX Runtime's MatMulNBits, exports checked
against a dequantize-then-matmul reference, bad flags, and a broken export refused."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT
from onnx import TensorProto, helper, numpy_helper

import llama2_onnx.export as export
import llama2_onnx.graph as graph
from llama2_onnx.checkpoints import open_source
from llama2_onnx.config import Config
from llama2_onnx.errors import VerificationError
from llama2_onnx.export import ExportRequest, compare_with_reference, export_variant
from llama2_onnx.quantize import quantize


def unpack(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MatMulNBits' documented layout, written here without the package's helpers: per output
    row, blocks of codes two to a byte (even index in the low nibble), zero point 8."""
    n, blocks, half = packed.shape
    codes = np.empty((n, blocks, 2 * half), np.float32)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return ((codes - 8) * scales.astype(np.float32).reshape(n, blocks, 1)).reshape(n, -1)


@pytest.mark.parametrize("block", [32, 64, 128])
def test_quantizer_rounds_each_value_to_its_block_grid(block):
    weight = np.random.default_rng(block).standard_normal((48, 256)).astype(np.float32)
    weight[3, :block] = 0.0  # an all-zero block
    packed, scales = quantize(weight, block)
    assert packed.shape == (48, 256 // block, block // 2) and scales.dtype == np.float16
    error = np.abs(unpack(packed, scales) - weight).reshape(48, -1, block)
    step = scales.astype(np.float32)[..., None]
    # Codes span -8..7 steps: values that fall past +7.5 steps (the extreme's opposite sign) are
    # clipped to 7, at most one step away; all others are rounded to the nearest step.
    clipped = weight.reshape(48, -1, block) / np.where(step == 0, 1, step) > 7.5
    assert np.all(error <= np.where(clipped, 1.0, 0.5) * np.abs(step) + 1e-6)
    extreme = np.abs(weight.reshape(48, -1, block)).max(axis=-1)  # maps to code -8 (or +8)
    np.testing.assert_allclose(np.abs(scales.astype(np.float32)), extreme / 8, rtol=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_matmulnbits_node_computes_dequantize_then_matmul(dtype):
    rng = np.random.default_rng(0)
    n, k, block = 96, 256, 32
    packed, scales = quantize(rng.standard_normal((n, k)).astype(np.float32), block)
    onnx_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block, accuracy_level=0)
    model = helper.make_model(
        helper.make_graph([node], "g", [helper.make_tensor_value_info("A", onnx_type, [None, k])],
                          [helper.make_tensor_value_info("Y", onnx_type, [None, n])],
                          [numpy_helper.from_array(packed, "B"),
                           numpy_helper.from_array(scales.astype(dtype), "scales")]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((5, k)).astype(dtype)
    got = session.run(None, {"A": a})[0].astype(np.float32)
    expected = a.astype(np.float32) @ unpack(packed, scales).T
    tolerance = 1e-4 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(got, expected, atol=tolerance * np.abs(expected).max())


class DequantizedSource:
    """A checkpoint whose linear weights are replaced by what an int4 graph stores: q, k, v
    fused as rows of `wqkv`, the gate and up projections (w1, w3) as rows of `w13`."""

    def __init__(self, source, stored: dict[str, np.ndarray]) -> None:
        self.source, self.config, self.stored = source, source.config, stored

    def read(self, name: str) -> np.ndarray:
        prefix, kind, _ = ("." + name).rsplit(".", 2)  # "layers.0.attention", "wq", "weight"
        fused = {"wq": "wqkv", "wk": "wqkv", "wv": "wqkv", "w1": "w13", "w3": "w13"}
        stored = f"{prefix}.{fused.get(kind, kind)}.weight".lstrip(".")
        if stored + "_q4" not in self.stored:
            return self.source.read(name)
        weight = unpack(self.stored[stored + "_q4"], self.stored[stored + "_scales"])
        c = self.config
        rows = {"wq": (0, c.dim), "wk": (c.dim, c.dim + c.kv_dim),
                "wv": (c.dim + c.kv_dim, c.dim + 2 * c.kv_dim), "w1": (0, c.hidden_dim),
                "w3": (c.hidden_dim, 2 * c.hidden_dim)}.get(kind, (0, len(weight)))
        return weight[rows[0]:rows[1]]


@pytest.mark.parametrize("fmt,gqa", [("hf", False), ("meta", True)])
def test_int4_export_equals_its_dequantized_model(tmp_path, monkeypatch, make_checkpoint,
                                                  tokenizer_path, fmt, gqa):
    """With exact (accuracy level 0) MatMulNBits, an int4 graph is the float32 reference run on
    the weights the graph stores, up to float16 activations: the float16 bounds apply."""
    monkeypatch.setattr(graph, "ACCURACY_LEVEL", 0)
    checkpoint = make_checkpoint(fmt, gqa)
    folder = export_variant(ExportRequest(variant="q", precision="int4", tokenizer=tokenizer_path,
                                          out=tmp_path, progress=False, skip_verify=True,
                                          **{fmt: checkpoint}))
    model = onnx.load(str(folder / "ONNX" / "LlamaV2_q.onnx"))
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert sum(name.endswith("_q4") for name in stored) == 4 * 2 + 1  # + output projection
    source = DequantizedSource(open_source(**{fmt: checkpoint}), stored)
    report = compare_with_reference(folder, source)
    bounds = export.BOUNDS["float16"]
    assert report.rel_rms <= bounds.rel_rms and report.kl <= bounds.kl and report.tokens_agree


@pytest.mark.parametrize("fmt,gqa", [("hf", False), ("hf", True), ("meta", False), ("meta", True)])
def test_int4_export_passes_its_verification(make_variant, fmt, gqa):
    folder = make_variant(fmt, "int4", gqa)
    config = Config.load(folder / "config.json")
    assert (config.dtype, config.block_size) == ("int4", 32)
    model = onnx.load(str(next((folder / "ONNX").glob("*.onnx"))), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops
    # DirectML's MatMulNBits lists no zero-point type and refuses g_idx and bias: A, B, scales.
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert all(len(n.input) == 3 and n.domain == "com.microsoft" for n in nbits)
    assert len(nbits) == 4 * 2 + 1  # qkv, o, w1|w3, w2 per layer, and the output projection
    scales = [t for t in model.graph.initializer if t.name.endswith("_scales")]
    assert scales and all(t.data_type == TensorProto.FLOAT16 for t in scales)
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert inputs["inputs_embeds"] == inputs["past_key.0"] == TensorProto.FLOAT16


def test_the_output_projection_can_stay_float16(tmp_path, make_checkpoint, tokenizer_path):
    """--int4-output float16: the blocks' layers 4-bit, the output projection a float16 MatMul
    (what a small model with a large vocabulary loses least by; docs/export.md), verified."""
    reports = []
    folder = export_variant(ExportRequest(variant="o16", precision="int4", int4_output="float16",
                                          tokenizer=tokenizer_path, out=tmp_path, progress=False,
                                          hf=make_checkpoint("hf"), on_verified=reports.append))
    assert reports[0].ok and Config.load(folder / "config.json").output_int4 is False
    model = onnx.load(str(next((folder / "ONNX").glob("*.onnx"))), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * 2 and not any(n.input[1].startswith("output") for n in nbits)
    assert [n.op_type for n in model.graph.node if "output.weight_t" in n.input] == ["MatMul"]


@pytest.mark.parametrize("precision", ["float32", "int4"])
def test_a_corrupted_layer_is_refused(tmp_path, monkeypatch, make_checkpoint, tokenizer_path,
                                      precision):
    """One matrix written with its rows reversed: the graph runs but computes something else."""
    build = export.build_model

    def corrupted(config, weights, writer, **kwargs):
        def read(name):
            array = weights(name)
            return array[::-1].copy() if name == "layers.1.attention.wo.weight" else array
        return build(config, read, writer, **kwargs)

    monkeypatch.setattr(export, "build_model", corrupted)
    with pytest.raises(VerificationError, match="not written"):
        export_variant(ExportRequest(variant="bad", precision=precision, out=tmp_path,
                                     tokenizer=tokenizer_path, progress=False,
                                     hf=make_checkpoint("hf")))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags,message", [
    (["--precision", "int4", "--block-size", "7"], "block size 7 is not one of 32, 64, 128"),
    (["--precision", "int4", "--block-size", "128"], "dim 64 is not a multiple of the int4"),
    (["--precision", "float16", "--block-size", "32"], "only applies to --precision int4"),
    (["--precision", "float32", "--int4-output", "float16"], "--int4-output only applies to "
     "--precision int4"),
])
def test_bad_int4_flags_get_one_sentence_and_exit_2(tmp_path, make_checkpoint, tokenizer_path,
                                                    flags, message):
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "export_and_publish.py"), "export", "--hf",
         str(make_checkpoint("hf")), "--tokenizer", str(tokenizer_path), "--variant", "x",
         "--out", str(tmp_path), "--no-progress", *flags], capture_output=True, text=True)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], run.stderr
