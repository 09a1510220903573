"""The form each provider runs (graph_forms): same numbers as the exported graph, nothing
written beside the variant, and the old optimized-graph cache named, never deleted."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from test_safe_export import tree_digest

from llama2_onnx import graph_forms
from llama2_onnx.config import Config
from llama2_onnx.errors import VariantError
from llama2_onnx.generation import Engine
from llama2_onnx.placement import RunOptions, place
from llama2_onnx.session import Runtime, create_session


def graph_of(folder):
    return next((folder / "ONNX").glob("*.onnx"))


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("precision", ["float32", "float16", "int4"])
def test_packed_form_drops_three_nodes_per_layer_and_keeps_the_weights(make_variant, precision):
    exported = onnx.load(str(graph_of(make_variant("hf", precision, True))),
                         load_external_data=False)
    packed = onnx.ModelProto()
    packed.CopyFrom(exported)
    layers = ops(exported).count("GroupQueryAttention")
    assert graph_forms.to_form(packed, graph_forms.PACKED) == layers
    assert len(packed.graph.node) == len(exported.graph.node) - 3 * layers
    assert "RotaryEmbedding" not in ops(packed)
    for node in packed.graph.node:
        if node.op_type == "GroupQueryAttention":
            assert node.input[1:3] == ["", ""] and node.input[7:] == ["cos_cache", "sin_cache"]
    # Every weight still points into the variant's data file, at the same place.
    kept = {t.name: list(t.external_data) for t in packed.graph.initializer}
    assert all(kept[t.name] == list(t.external_data) for t in exported.graph.initializer
               if t.name in kept)
    # The logits come from the position `logits_at` names (padded prefill runs), not the last.
    assert [i.name for i in packed.graph.input if i.name == graph_forms.LOGITS_AT] == [
        graph_forms.LOGITS_AT]
    last = next(n for n in packed.graph.node if n.output[0] == "/last")
    assert (last.op_type, list(last.input)[1:]) == ("Gather", [graph_forms.LOGITS_AT])
    assert graph_forms.to_form(exported, graph_forms.EXPORTED) == 0  # DirectML: untouched
    assert graph_forms.LOGITS_AT not in {i.name for i in exported.graph.input}


def engine_in_form(base: Engine, folder, form: str) -> Engine:
    wide = form == graph_forms.PACKED_FLOAT32 or base.config.dtype == "float32"
    placement = dataclasses.replace(base.runner.placement, form=form,
                                    activation="float32" if wide else "float16")
    session = create_session(graph_of(folder), placement)
    return Engine(Runtime(session, base.config, placement), base.tokenizer,
                  base.embeddings, base.config, form)


def form_logits(engine: Engine, ids: list[int]) -> list[np.ndarray]:
    """Prompt, a continued prefill of 5 tokens (chunks) and decode steps."""
    out = [engine.prefill(ids[:9]).copy(), engine.prefill(ids[:14]).copy()]  # continues at 9
    out += [engine.decode_step(token).copy() for token in ids[14:]]
    return out


@pytest.mark.parametrize("precision,atol", [("float32", 1e-5), ("float16", 2e-2),
                                            ("int4", 2e-2)])
def test_packed_form_gives_the_exported_graphs_logits(make_variant, precision, atol):
    folder = make_variant("hf", precision, True)
    base = Engine.from_variant(folder, provider="cpu")
    ids = [int(i) for i in np.random.default_rng(3).integers(3, base.config.vocab_size, 16)]
    packed, exported = (form_logits(engine_in_form(base, folder, form), ids)
                        for form in (graph_forms.PACKED, graph_forms.EXPORTED))
    for a, b in zip(packed, exported, strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def test_int4_on_the_cpu_runs_in_float32_and_stays_within_float16s_error(make_variant):
    """The widened form differs from the float16 one by float16 rounding only: per step the
    RMS of the logit difference is under 2 % of the logits' spread and the top token agrees."""
    folder = make_variant("hf", "int4", True)
    engine = Engine.from_variant(folder, provider="cpu")
    assert engine.runner.dtype == np.float32  # placement: CPU int4 runs PACKED_FLOAT32
    types = {i.name: i.type for i in engine.runner.session.get_inputs()}
    assert types["inputs_embeds"] == types["past_key.0"] == "tensor(float)"
    ids = [int(i) for i in np.random.default_rng(4).integers(3, engine.config.vocab_size, 16)]
    wide = form_logits(engine, ids)
    half = form_logits(engine_in_form(engine, folder, graph_forms.EXPORTED), ids)
    for a, b in zip(wide, half, strict=True):
        assert np.sqrt(np.mean((a - b) ** 2)) < 0.02 * np.std(b)
        assert a.argmax() == b.argmax()


@pytest.mark.parametrize("precision", ["float16", "int4"])
def test_large_float16_weights_are_widened_at_load_with_the_same_logits(make_variant, precision,
                                                                          monkeypatch):
    """Weights over WIDEN_IN_GRAPH_BYTES stay float16 in the data file (a float16 7B widened
    into the graph would pass protobuf's 2 GiB); a Cast that constant folding runs at load
    widens each, to the same numbers as widening them into the graph."""
    folder = make_variant("hf", precision, True)
    base = Engine.from_variant(folder, provider="cpu")
    ids = [int(i) for i in np.random.default_rng(5).integers(3, base.config.vocab_size, 16)]
    in_graph = form_logits(engine_in_form(base, folder, graph_forms.PACKED_FLOAT32), ids)
    monkeypatch.setattr(graph_forms, "WIDEN_IN_GRAPH_BYTES", 0)
    model = onnx.load(str(graph_of(folder)), load_external_data=False)
    graph_forms.to_form(model, graph_forms.PACKED_FLOAT32, graph_of(folder).parent)
    assert not any(t.raw_data for t in model.graph.initializer)  # nothing read into the graph
    assert {t.data_type for t in model.graph.initializer} & {onnx.TensorProto.FLOAT16}
    at_load = form_logits(engine_in_form(base, folder, graph_forms.PACKED_FLOAT32), ids)
    for a, b in zip(at_load, in_graph, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_graph_without_the_pattern_is_refused_in_one_sentence(variant):
    graph = graph_of(variant)
    model = onnx.load(str(graph), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "RotaryEmbedding":
            node.op_type = "Identity"  # no longer the exported pattern
            del node.input[1:]
            node.domain = ""
            del node.attribute[:]
    onnx.save(model, str(graph))
    with pytest.raises(VariantError, match="is not a graph of this exporter.*re-export"):
        create_session(graph, place(Config(dim=64, n_heads=4), RunOptions(provider="cpu",
                                                                         max_seq_len=32)))


def test_loading_writes_nothing_and_names_an_old_cache_without_deleting_it(variant):
    before = tree_digest(variant)
    Engine.from_variant(variant, provider="cpu", max_seq_len=32)
    assert tree_digest(variant) == before
    old = variant / "ONNX" / ".cache"
    old.mkdir()
    (old / "LlamaV2.cpu.onnx.data").write_bytes(b"\1" * (3 << 20))
    engine = Engine.from_variant(variant, provider="cpu", max_seq_len=32)
    assert len(engine.notes) == 1 and str(old) in engine.notes[0]
    assert "delete that folder" in engine.notes[0]
    assert (old / "LlamaV2.cpu.onnx.data").read_bytes() == b"\1" * (3 << 20)


def test_fused_form_puts_each_norm_and_its_projections_in_one_node(make_variant):
    """WebGPU's fused form: per layer one MatMulNBitsQkv (attention norm, q, k, v) and one
    MatMulNBitsMlp (ffn norm, gate, up, SiLU), the residual sums passed on, and q, k, v (gate,
    up) as row ranges of the fused matrices in the same data file. Only WebGPU runs these
    nodes; its tokens are compared with the packed form's on SwiftShader (test_webgpu.py)."""
    folder = make_variant("hf", "int4", True)
    exported = onnx.load(str(graph_of(folder)), load_external_data=False)
    fused = onnx.ModelProto()
    fused.CopyFrom(exported)
    layers = ops(exported).count("GroupQueryAttention")
    graph_forms.to_form(fused, graph_forms.WEBGPU_FUSED)
    names = ops(fused)
    assert names.count("MatMulNBitsQkv") == names.count("MatMulNBitsMlp") == layers
    assert names.count("MatMulNBits") == 2 * layers + 1  # o and down per layer, the logits
    assert {"Split", "Sigmoid", "Mul", "SimplifiedLayerNormalization"}.isdisjoint(names)
    assert names.count("SkipSimplifiedLayerNormalization") == 1  # the final norm
    before = {n.output[0]: n for n in exported.graph.node}
    tensors = {t.name: t for t in exported.graph.initializer}

    def rows(model, name):
        tensor = next(t for t in model.graph.initializer if t.name == name)
        return onnx.numpy_helper.to_array(tensor, base_dir=str(graph_of(folder).parent))

    for node in fused.graph.node:
        if node.op_type not in ("MatMulNBitsQkv", "MatMulNBitsMlp"):
            continue
        qkv = node.op_type == "MatMulNBitsQkv"
        matmul = before[node.name.removesuffix("/fused")]
        norm = before[matmul.input[0]]
        assert list(node.input[:3]) == ([norm.input[0], "", norm.input[1]]
                                        if norm.op_type == "SimplifiedLayerNormalization"
                                        else list(norm.input[:3]))
        assert (list(node.output[-1:]) == list(norm.output[3:4])) or not norm.output[3:4]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["epsilon"] == pytest.approx(
            next(a.f for a in norm.attribute if a.name == "epsilon"))
        assert attrs["accuracy_level"] == next(a.i for a in matmul.attribute
                                               if a.name == "accuracy_level")
        parts = [3, 6, 9] if qkv else [3, 6]
        whole = [onnx.numpy_helper.to_array(tensors[matmul.input[i]],
                                            base_dir=str(graph_of(folder).parent))
                 for i in (1, 2)]
        for offset, original in enumerate(whole):
            sliced = np.concatenate([rows(fused, node.input[i + offset]) for i in parts])
            np.testing.assert_array_equal(sliced, original)  # the same bytes, in order
        if qkv:
            assert attrs["Nq"] + 2 * attrs["Nkv"] == whole[0].shape[0]
        else:
            assert attrs["N"] * 2 == whole[0].shape[0] and attrs["activation"] == b"silu"
    assert not any(t.raw_data for t in fused.graph.initializer if t.data_type ==
                   onnx.TensorProto.UINT8)  # nothing read into the graph
    float16 = onnx.load(str(graph_of(make_variant("hf", "float16", True))),
                        load_external_data=False)
    with pytest.raises(ValueError, match="4-bit"):
        graph_forms.to_form(float16, graph_forms.WEBGPU_FUSED)


@pytest.mark.parametrize("precision,atol", [("float32", 1e-5), ("float16", 2e-2)])
def test_split_k_form_gives_the_packed_forms_logits(make_variant, precision, atol):
    folder = make_variant("hf", precision, True)
    base = Engine.from_variant(folder, provider="cpu")
    model = onnx.load(str(graph_of(folder)), load_external_data=False)
    graph_forms.to_form(model, graph_forms.SPLIT_K)
    assert ops(model).count("ReduceSum") == 4 * base.config.n_layers  # all but the logits
    ids = [int(i) for i in np.random.default_rng(6).integers(3, base.config.vocab_size, 16)]
    split, packed = (form_logits(engine_in_form(base, folder, form), ids)
                     for form in (graph_forms.SPLIT_K, graph_forms.PACKED))
    for a, b in zip(split, packed, strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)
