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


def to_form(model: onnx.ModelProto, form: str, folder: Path | None = None) -> int:
    """Rewrite `model` (loaded without its external data) in place into `form`.

    Args:
        folder: where the graph's external data file is (PACKED_FLOAT32 reads from it).
    Returns:
        How many attention layers changed (0 for the exported form).
    Raises:
        ValueError when a packed form is asked for but no layer has the exported pattern.
    """
    if form == EXPORTED:
        return 0
    changed = pack_attention(model.graph)
    if not changed:
        raise ValueError("no GroupQueryAttention fed by Split and RotaryEmbedding nodes")
    take_logits_at(model.graph)
    if form == PACKED_FLOAT32:
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
