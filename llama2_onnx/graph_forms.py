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
"""

from __future__ import annotations

import onnx
from onnx import helper

EXPORTED, PACKED = "exported", "packed"


def form_for(provider: str) -> str:
    """Which form `provider` runs: DirectML the exported one, the others the packed one."""
    return EXPORTED if provider == "dml" else PACKED


def to_form(model: onnx.ModelProto, form: str) -> int:
    """Rewrite `model` (loaded without its external data) in place into `form`.

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
    return changed


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
