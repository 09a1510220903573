"""The exporter's verification refuses a wrong variant: defects planted in an exported graph or
its weights (one layer perturbed, rotary sign flipped, KV cache position off by one) must each
make `compare_with_reference` report failure and `verify_variant_against` raise. The tests
state the behaviour, not the bounds, which may change."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from llama2_onnx.checkpoints import open_source
from llama2_onnx.errors import VerificationError
from llama2_onnx.export import verify_variant_against


def graph_path(folder: Path) -> Path:
    return next((folder / "ONNX").glob("*.onnx"))


def edit_initializer(folder: Path, name: str, change) -> None:
    """Rewrite one external-data initializer in place: array -> change(array)."""
    graph = graph_path(folder)
    model = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    where = {e.key: e.value for e in tensor.external_data}
    offset, length = int(where["offset"]), int(where["length"])
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    with open(graph.parent / where["location"], "r+b") as data:
        data.seek(offset)
        array = np.frombuffer(data.read(length), dtype=dtype).reshape(tuple(tensor.dims))
        new = np.ascontiguousarray(change(array.astype(np.float32)).astype(dtype))
        assert new.nbytes == length
        data.seek(offset)
        data.write(new.tobytes())


def perturb_one_layer(folder: Path) -> None:
    """Layer 1's down projection with noise of a tenth of its own spread added."""
    rng = np.random.default_rng(0)
    edit_initializer(folder, "layers.1.feed_forward.w2.weight_t",
                     lambda w: w + 0.1 * w.std() * rng.standard_normal(w.shape))


def flip_rotary_sign(folder: Path) -> None:
    edit_initializer(folder, "sin_cache", lambda sin: -sin)


def kv_one_position_late(folder: Path) -> None:
    """Every attention node told the cache is one longer: new keys and values land one slot
    after where they belong, leaving a hole that attention reads."""
    graph = graph_path(folder)
    model = onnx.load(str(graph), load_external_data=False)
    one = numpy_helper.from_array(np.array(1, np.int32), "/planted/one")
    model.graph.initializer.append(one)
    late = {"seqlens_k": "/planted/seqlens_k", "total_sequence_length": "/planted/total"}
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.input[:] = [late.get(name, name) for name in node.input]
    adds = [helper.make_node("Add", [src, "/planted/one"], [dst], name=dst)
            for src, dst in late.items()]
    nodes = adds + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(graph))


DEFECTS = {"perturbed_layer": perturb_one_layer, "rotary_sign_flipped": flip_rotary_sign,
           "kv_one_position_late": kv_one_position_late}


@pytest.fixture()
def planted(make_variant, make_checkpoint, tmp_path):
    """planted(precision, defect) -> (copy of an exported variant with the defect, source)."""

    def make(precision: str, defect=None):
        folder = tmp_path / f"planted_{precision}"
        shutil.copytree(make_variant("hf", precision, True), folder)
        if defect is not None:
            defect(folder)
        return folder, open_source(hf=make_checkpoint("hf", True))

    return make


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_an_untouched_copy_passes(planted, precision):
    assert verify_variant_against(*planted(precision)).ok


@pytest.mark.parametrize("precision", ["float32", "float16"])
@pytest.mark.parametrize("defect", DEFECTS)
def test_a_planted_defect_is_refused(planted, precision, defect):
    folder, source = planted(precision, DEFECTS[defect])
    with pytest.raises(VerificationError) as refused:
        verify_variant_against(folder, source)
    assert "not written" in str(refused.value)
