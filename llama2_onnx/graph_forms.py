"""The form of the exported graph each provider runs, derived in memory when a session opens.

A variant ships one graph (graph.py), written so that every provider can run it: q, k and v
leave the fused projection split, and rotary embedding is its own node, because DirectML's
GroupQueryAttention takes neither packed QKV nor built-in rotary (ONNX Runtime's
DmlOperatorGroupQueryAttention). CUDA's and the CPU's GroupQueryAttention take both, which
saves three kernels per layer and, on CUDA, a round trip of q and k through memory:

    exported (DirectML runs this)              packed (CUDA and CPU run this)

    qkv ──► Split ─ q ──► RotaryEmbedding ─┐
                  ├ k ──► RotaryEmbedding ─┤
                  └ v ─────────────────────┤    qkv ──────────────────────────┐
                        GroupQueryAttention ◄┘    GroupQueryAttention(do_rotary=1,
                                                      cos_cache, sin_cache) ◄─┘

Only nodes change: the weights stay in the variant's data file, untouched, and the rotary
tables the RotaryEmbedding nodes used are the ones GroupQueryAttention reads. The position of
each new token is what GroupQueryAttention derives from `seqlens_k` (past + seq - 1 minus the
offset within the chunk), the same number the exported graph reads from `position_ids`.

The packed forms also take the logits at a position the caller names (input `logits_at`)
rather than always the last, so a prefill padded to a length seen at load gives the logits of
its last real token.

int4 variants on the CPU also compute in float32 (PACKED_FLOAT32): ONNX Runtime's CPU kernels
for GroupQueryAttention, the layer norms and MatMulNBits' activations are float32 kernels that
convert float16 on the way in and out. The 4-bit codes stay in the data file; only the small
float16 tensors (block scales, norm weights, rotary tables) are read and widened into the
in-memory graph, and the KV cache becomes float32 (twice the host memory of a float16 one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EXPORTED, PACKED, PACKED_FLOAT32 = "exported", "packed", "packed_float32"
# Measured on WebGPU (NVIDIA H200 through Vulkan, random 7B, 128 -> 256 greedy, median of 3;
# tools/gpu_bench.sh webgpu_tune); placement runs SPLIT_K for float16 variants on WebGPU:
# WEBGPU_FUSED: the packed form with each layer's norm and 4-bit projections in the WebGPU
# plugin's fused MatMulNBitsQkv / MatMulNBitsMlp (int4, blocks of 32; WebGPU only). Not
# faster: 123.7 tokens/s against 125.3 (the plugin's fused kernels took 48 and 104 us against
# 33 and 61 for the unfused nodes they replace, tools/webgpu_ops.py), and its tokens leave
# the packed form's at 41 of 256 (a near-tie: top-2 margin 0.008).
# SPLIT_K: the packed form with each float16 MatMul split along K into SPLIT_K_PARTS products
# run as one batched MatMul and summed (more workgroups for a one-row product): float16
# 75.9 tokens/s (16 parts: 78.6) against 34.9. Its tokens part from the packed form's at 26 of
# 256, a near-tie (a float32 reference's top-2 margin there is 0.008), and against that
# reference (each form's own 256 tokens teacher-forced through a float32 forward of the same
# weights) split-K picks the float32 argmax at 245 of 256 positions, the packed form at 228:
# a different order of float16 sums, closer to float32, not a wrong path.
WEBGPU_FUSED, WEBGPU_FUSED_FLOAT32 = "webgpu_fused", "webgpu_fused_float32"
SPLIT_K = "split_k"
FLOAT32_FORMS = (PACKED_FLOAT32, WEBGPU_FUSED_FLOAT32)


def to_form(model: onnx.ModelProto, form: str, folder: Path | None = None) -> int:
    """Rewrite `model` (loaded without its external data) in place into `form`.

    Args:
        folder: where the graph's external data file is (the float32 forms read from it).
    Returns:
        How many attention layers changed (0 for the exported form).
    Raises:
        ValueError when a packed form is asked for but no layer has the exported pattern, or
        a fused form for a graph without 4-bit projections in blocks of 32.
    """
    if form == EXPORTED:
        return 0
    changed = pack_attention(model.graph)
    if not changed:
        raise ValueError("no GroupQueryAttention fed by Split and RotaryEmbedding nodes")
    take_logits_at(model.graph)
    if form in (WEBGPU_FUSED, WEBGPU_FUSED_FLOAT32) and not fuse_projections(model.graph):
        raise ValueError("no norm feeding a 4-bit projection in blocks of 32 to fuse")
    if form == SPLIT_K:
        split_k(model.graph)
    if form in FLOAT32_FORMS:
        widen_to_float32(model.graph, Path(folder or "."))
    return changed


LOGITS_AT = "logits_at"


def take_logits_at(graph: onnx.GraphProto) -> bool:
    """Compute logits at the position a new input `logits_at` (int64, shape (1,)) names
    instead of the last one, so a prefill run can be padded to a length seen at load and still
    give the logits of its last real token (session.Runtime pads)."""
    for node in graph.node:
        if node.op_type == "Slice" and node.output[0] == "/last":
            gather = helper.make_node("Gather", [node.input[0], LOGITS_AT], ["/last"],
                                      "/last", axis=1)
            node.CopyFrom(gather)
            graph.input.append(helper.make_tensor_value_info(LOGITS_AT, TensorProto.INT64,
                                                             [1]))
            _drop_unused_initializers(graph)
            return True
    return False


# float16 initializers up to this size are widened into the in-memory graph; larger ones (a
# float16 variant's weights, which would pass protobuf's 2 GiB limit) stay in the data file and
# a Cast node widens each, which ONNX Runtime's constant folding runs once, on the CPU, at load.
WIDEN_IN_GRAPH_BYTES = 1 << 20


def widen_to_float32(graph: onnx.GraphProto, folder: Path) -> None:
    """Make every float16 input, output and initializer of `graph` float32: small float16
    initializers are read from the external data file and stored in the graph itself, larger
    ones are widened by a Cast node at load (WIDEN_IN_GRAPH_BYTES)."""
    for value in (*graph.input, *graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    casts = []
    for tensor in graph.initializer:
        if tensor.data_type != TensorProto.FLOAT16:
            continue
        if 2 * int(np.prod(tensor.dims)) > WIDEN_IN_GRAPH_BYTES:
            casts.append(helper.make_node("Cast", [tensor.name + "/f16"], [tensor.name],
                                          tensor.name + "/widen", to=TensorProto.FLOAT))
            tensor.name += "/f16"
            continue
        wide = numpy_helper.to_array(tensor, base_dir=str(folder)).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(wide, tensor.name))
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.FLOAT
    nodes = [*casts, *graph.node]  # the widened weights first, in topological order
    del graph.node[:]
    graph.node.extend(nodes)


def pack_attention(graph: onnx.GraphProto) -> int:
    """Feed each GroupQueryAttention the packed qkv and let it apply rotary embedding."""
    producer = {out: node for node in graph.node for out in node.output}
    drop: set[int] = set()
    changed = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or len(node.input) != 7:
            continue
        q_rot, k_rot = (producer.get(name) for name in node.input[:2])
        if not (_is_rotary(q_rot) and _is_rotary(k_rot)):
            continue
        split = producer.get(q_rot.input[0])
        if (split is None or split.op_type != "Split" or list(split.output) !=
                [q_rot.input[0], k_rot.input[0], node.input[2]]):
            continue
        cos, sin = q_rot.input[2:4]
        if list(k_rot.input[2:4]) != [cos, sin]:
            continue
        node.input[:] = [split.input[0], "", "", *node.input[3:7], cos, sin]
        node.attribute.extend([helper.make_attribute("do_rotary", 1),
                               helper.make_attribute("rotary_interleaved", 0)])
        drop.update(id(n) for n in (split, q_rot, k_rot))
        changed += 1
    kept = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_initializers(graph)
    return changed


def _is_rotary(node: onnx.NodeProto | None) -> bool:
    return (node is not None and node.op_type == "RotaryEmbedding"
            and all(a.i == 0 for a in node.attribute if a.name == "interleaved"))


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


# --- WebGPU's fused 4-bit projections (WEBGPU_FUSED) ---------------------------------------
#
#     (Skip)SimplifiedLayerNormalization ─► MatMulNBits qkv ─► GroupQueryAttention (packed)
#  -> MatMulNBitsQkv(norm input, skip, norm weight, q/k/v codes and scales) ─► Q, K, V
#       ─► Concat ─► GroupQueryAttention (packed, unchanged)
#
#     SkipSimplifiedLayerNormalization ─► MatMulNBits gate_up ─► Split ─► Sigmoid, Mul, Mul
#  -> MatMulNBitsMlp(norm input, skip, norm weight, gate/up codes and scales, activation=silu)
#
# Each fused node also returns the residual sum the norm returned (its output 3). The codes and
# scales of q, k, v (gate, up) are consecutive rows of the fused matrix, so each is a range of
# the same data file: new initializers point into it, nothing is copied. The plugin's kernels
# take 4-bit codes in blocks of 32 only (their schemas' block_size).
FUSED_BLOCK_SIZE = 32


def fuse_projections(graph: onnx.GraphProto) -> int:
    """Rewrite each layer's norm + qkv and norm + gate/up projections into the WebGPU plugin's
    MatMulNBitsQkv and MatMulNBitsMlp nodes (see above). Returns how many nodes were fused."""
    producer = {out: node for node in graph.node for out in node.output if out}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {t.name: t for t in graph.initializer}
    replace: dict[int, list[onnx.NodeProto]] = {}  # id(norm) -> the nodes taking its place
    drop: set[int] = set()
    for node in graph.node:
        if not _fusable_matmul(node, initializers):
            continue
        norm = producer.get(node.input[0])
        if (norm is None or norm.op_type not in ("SimplifiedLayerNormalization",
                                                 "SkipSimplifiedLayerNormalization")
                or consumers.get(norm.output[0]) != [node] or id(norm) in replace):
            continue
        after = consumers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "GroupQueryAttention" \
                and after[0].input[0] == node.output[0] and not any(after[0].input[1:3]):
            nodes = _qkv_nodes(node, norm, after[0], initializers, graph)
            replace[id(norm)], drop = nodes, drop | {id(node)}
        elif len(after) == 1 and after[0].op_type == "Split":
            gated = _gated_silu(after[0], consumers)
            if gated is None:
                continue
            nodes = _mlp_nodes(node, norm, gated[-1], initializers, graph)
            replace[id(norm)] = nodes
            drop |= {id(node), *(id(n) for n in gated)}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in replace:
            kept += replace[id(node)]
        elif id(node) not in drop:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_initializers(graph)
    return len(replace)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _fusable_matmul(node: onnx.NodeProto, initializers: dict) -> bool:
    return (node.op_type == "MatMulNBits" and len(node.input) == 3
            and _attr(node, "bits", 4) == 4 and _attr(node, "block_size") == FUSED_BLOCK_SIZE
            and all(name in initializers for name in node.input[1:3]))


def _gated_silu(split: onnx.NodeProto, consumers: dict) -> list[onnx.NodeProto] | None:
    """[split, sigmoid, silu mul, gated mul] when `split` feeds SiLU(gate) * up, else None."""
    if len(split.output) != 2:
        return None
    gate, up = split.output
    sigmoid = [n for n in consumers.get(gate, []) if n.op_type == "Sigmoid"]
    silu = [n for n in consumers.get(gate, []) if n.op_type == "Mul"]
    if len(sigmoid) != 1 or len(silu) != 1 or len(consumers.get(gate, [])) != 2:
        return None
    if sorted(silu[0].input) != sorted([gate, sigmoid[0].output[0]]):
        return None
    final = consumers.get(silu[0].output[0], [])
    if (len(final) != 1 or final[0].op_type != "Mul" or consumers.get(up) != final
            or sorted(final[0].input) != sorted([silu[0].output[0], up])):
        return None
    return [split, sigmoid[0], silu[0], final[0]]


def _norm_inputs(norm: onnx.NodeProto) -> tuple[list[str], list[str], float]:
    """(A, skip, norm weight) inputs, the residual-sum output (if any) and epsilon."""
    skip = norm.op_type == "SkipSimplifiedLayerNormalization"
    inputs = [norm.input[0], norm.input[1] if skip else "", norm.input[2 if skip else 1]]
    residual = [norm.output[3]] if skip and len(norm.output) > 3 and norm.output[3] else []
    return inputs, residual, float(_attr(norm, "epsilon", 1e-5))


def _fused_attributes(matmul: onnx.NodeProto, epsilon: float) -> dict:
    return {"K": _attr(matmul, "K"), "bits": 4, "block_size": FUSED_BLOCK_SIZE,
            "accuracy_level": _attr(matmul, "accuracy_level", 0), "epsilon": epsilon}


def _qkv_nodes(matmul, norm, gqa, initializers, graph) -> list[onnx.NodeProto]:
    n = _attr(matmul, "N")
    heads, kv_heads = _attr(gqa, "num_heads"), _attr(gqa, "kv_num_heads")
    head_dim = n // (heads + 2 * kv_heads)
    rows = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    codes = _row_slices(initializers[matmul.input[1]], rows, graph)
    scales = _row_slices(initializers[matmul.input[2]], rows, graph)
    inputs, residual, epsilon = _norm_inputs(norm)
    for c, s in zip(codes, scales, strict=True):
        inputs += [c, s, ""]  # no bias
    outs = [f"{matmul.output[0]}/{part}" for part in "qkv"]
    fused = helper.make_node("MatMulNBitsQkv", inputs[:-1], outs + residual,
                             matmul.name + "/fused", domain="com.microsoft",
                             Nq=rows[0], Nkv=rows[1], **_fused_attributes(matmul, epsilon))
    concat = helper.make_node("Concat", outs, [matmul.output[0]], matmul.name + "/concat",
                              axis=-1)
    return [fused, concat]


def _mlp_nodes(matmul, norm, final, initializers, graph) -> list[onnx.NodeProto]:
    n = _attr(matmul, "N") // 2
    codes = _row_slices(initializers[matmul.input[1]], [n, n], graph)
    scales = _row_slices(initializers[matmul.input[2]], [n, n], graph)
    inputs, residual, epsilon = _norm_inputs(norm)
    inputs += [codes[0], scales[0], "", codes[1], scales[1]]
    return [helper.make_node("MatMulNBitsMlp", inputs, [final.output[0]] + residual,
                             matmul.name + "/fused", domain="com.microsoft", N=n,
                             activation="silu", **_fused_attributes(matmul, epsilon))]


def _row_slices(tensor: onnx.TensorProto, rows: list[int], graph: onnx.GraphProto) -> list[str]:
    """Initializers for consecutive row ranges of `tensor` (an external tensor: each points
    into the same data file, at its rows' bytes); returns their names."""
    if tensor.data_location != TensorProto.EXTERNAL or sum(rows) != tensor.dims[0]:
        raise ValueError(f"{tensor.name} is not an external tensor of {sum(rows)} rows")
    info = {e.key: e.value for e in tensor.external_data}
    row_bytes = (int(np.prod(tensor.dims[1:]))
                 * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    offset, names = int(info.get("offset", 0)), []
    for index, count in enumerate(rows):
        part = TensorProto(name=f"{tensor.name}/rows{index}", data_type=tensor.data_type,
                           dims=[count, *tensor.dims[1:]], data_location=TensorProto.EXTERNAL)
        for key, value in (("location", info["location"]), ("offset", str(offset)),
                           ("length", str(count * row_bytes))):
            part.external_data.add(key=key, value=value)
        graph.initializer.append(part)
        names.append(part.name)
        offset += count * row_bytes
    return names


# --- Split-K float16 products (SPLIT_K) ------------------------------------------------------
#
# WebGPU's MatMul gives a one-row product (a decode step) one workgroup per 32 output columns,
# each walking all of K: a 4096-wide projection is 128 workgroups, too few to fill a large GPU.
# Split K into P parts run as one batched product and sum them:
#
#     x (1, M, K) ─► Reshape (M, P, K/P) ─► Transpose (P, M, K/P) ─► MatMul with W viewed as
#     (P, K/P, N) ─► (P, M, N) ─► ReduceSum over P ─► Reshape (1, M, N)
#
# W's bytes stay as they are in the data file (only its shape changes). The output projection
# (the logits, N = vocab) is left whole: it has workgroups enough.
SPLIT_K_PARTS = 8


def split_k(graph: onnx.GraphProto, parts: int | None = None) -> int:
    """Rewrite float MatMuls with a (K, N) weight into SPLIT_K_PARTS-way split-K products (see
    above); returns how many changed."""
    parts = SPLIT_K_PARTS if parts is None else parts
    initializers = {t.name: t for t in graph.initializer}
    kept, changed, shapes = [], 0, {}
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if (weight is None or len(weight.dims) != 2 or weight.dims[0] % (4 * parts)
                or node.name == "/lm_head"):
            kept.append(node)
            continue
        k, n = weight.dims
        weight.dims[:] = [parts, k // parts, n]
        x, out, p = node.input[0], node.output[0], node.name + "/split_k"
        for key, value in ((f"/split_k/in_{parts}_{k}", [-1, parts, k // parts]),
                           (f"/split_k/out_{n}", [1, -1, n]), ("/split_k/axis0", [0])):
            if key not in shapes:
                shapes[key] = helper.make_tensor(key, TensorProto.INT64, [len(value)], value)
                graph.initializer.append(shapes[key])
        kept += [
            helper.make_node("Reshape", [x, f"/split_k/in_{parts}_{k}"], [p + "/rows"],
                             p + "/rows"),
            helper.make_node("Transpose", [p + "/rows"], [p + "/parts"], p + "/parts",
                             perm=[1, 0, 2]),
            helper.make_node("MatMul", [p + "/parts", node.input[1]], [p + "/partial"],
                             p + "/partial"),
            helper.make_node("ReduceSum", [p + "/partial", "/split_k/axis0"], [p + "/sum"],
                             p + "/sum", keepdims=0),
            helper.make_node("Reshape", [p + "/sum", f"/split_k/out_{n}"], [out], p)]
        changed += 1
    del graph.node[:]
    graph.node.extend(kept)
    return changed
