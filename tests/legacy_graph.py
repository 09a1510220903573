"""Write a tiny variant in the original Microsoft Llama-2-Onnx release format, for legacy tests.

Layout written (as in that release's repository):

    <root>/tokenizer.model
    <root>/<VARIANT>/embeddings.pth                 torch.nn.Embedding(vocab, dim).state_dict()
    <root>/<VARIANT>/ONNX/LlamaV2_<VARIANT>.onnx    (+ .onnx.data external weights)

Graph interface of that release:

  inputs   x          (1, seq, dim)                                   embeddings of new tokens
           attn_mask  (max_seq_len, max_seq_len)  -10000 above the diagonal
           k_cache    (1, n_layers, past, kv_heads, head_dim)         keys after rotary
           v_cache    (1, n_layers, past, kv_heads, head_dim)
           pos        ()  int64 = past
  outputs  logits     (1, vocab)                                      last position only
           k_out      (1, n_layers, seq, kv_heads, head_dim)          new positions only
           v_out      (1, n_layers, seq, kv_heads, head_dim)

Only standard ONNX operators (opset 17), so it runs on any provider without contrib ops. Rotary
embeddings use the half-split layout of the canonical weights (reference.apply_rotary).
The original release has kv_heads == n_heads; kv_heads < n_heads (grouped-query) also works.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llama2_onnx.config import Config
from llama2_onnx.rope import rotary_cos_sin

OPSET = 17
LINEAR_SUFFIXES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class _LegacyGraph:
    """Accumulates nodes and initializers; every helper returns the name of its output."""

    def __init__(self, config: Config, weights: dict[str, np.ndarray], dtype) -> None:
        self.c, self.weights, self.dtype = config, weights, np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or f"/{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; asking again for the same name and value reuses it."""
        tensor = numpy_helper.from_array(np.asarray(array), name)
        assert self.initializers.setdefault(name, tensor) == tensor, f"two values for {name}"
        return name

    def ints(self, name: str, values: list[int]) -> str:
        return self.const(name, np.array(values, dtype=np.int64))

    def weight(self, name: str) -> str:
        """A canonical weight; Linear weights transposed to (in, out) for MatMul."""
        array = self.weights[name]
        if name.split(".")[-2] in LINEAR_SUFFIXES or name == "output.weight":
            array, name = array.T, name + "_t"
        return self.const(name, np.ascontiguousarray(array, dtype=self.dtype))

    def matmul(self, x: str, weight: str) -> str:
        return self.op("MatMul", [x, self.weight(weight)])

    def rms_norm(self, x: str, weight: str) -> str:
        # x / sqrt(mean(x^2) + eps) * weight, over the last axis
        mean_sq = self.op("ReduceMean", [self.op("Mul", [x, x])], axes=[-1], keepdims=1)
        eps = self.const(f"{weight}/eps", np.array(self.c.norm_eps, dtype=self.dtype))
        root = self.op("Sqrt", [self.op("Add", [mean_sq, eps])])
        return self.op("Mul", [self.op("Div", [x, root]), self.weight(weight)])

    def positions(self) -> None:
        """cos/sin rows and attention-mask block for positions pos .. pos+seq-1."""
        c = self.c
        pos = self.op("Unsqueeze", ["pos", self.ints("/axis0", [0])])          # (1,)
        end = self.op("Add", [pos, self.op("Shape", ["x"], start=1, end=2)])   # (1,) pos + seq
        cos, sin = rotary_cos_sin(c.head_dim, c.rope_theta, c.max_seq_len)
        # Full-width tables: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].
        tables = {"cos": np.concatenate([cos, cos], 1), "sin": np.concatenate([sin, sin], 1)}
        for kind, table in tables.items():
            rows = self.op("Slice", [self.const(f"/{kind}_table", table.astype(self.dtype)),
                                     pos, end, "/axis0"])                       # (seq, head_dim)
            setattr(self, kind, self.op("Unsqueeze", [rows, self.ints("/axis1", [1])]))
        # (seq, 1, head_dim) broadcasts over (1, seq, heads, head_dim)
        zero = self.ints("/zero", [0])
        starts, ends = self.op("Concat", [pos, zero], axis=0), self.op("Concat", [end, end], axis=0)
        self.mask = self.op("Slice", ["attn_mask", starts, ends, self.ints("/axes01", [0, 1])])
        # (seq, past + seq): rows pos.., columns 0..pos+seq-1

    def rotary(self, x: str) -> str:
        # x: (1, seq, heads, head_dim); x1, x2: its halves along head_dim
        c, last = self.c, self.ints("/last_axis", [-1])
        mid, end = self.ints("/mid", [c.head_dim // 2]), self.ints("/end", [c.head_dim])
        first = self.op("Slice", [x, self.ints("/zero", [0]), mid, last])
        second = self.op("Slice", [x, mid, end, last])
        rotated = self.op("Concat", [self.op("Neg", [second]), first], axis=-1)
        return self.op("Add", [self.op("Mul", [x, self.cos]), self.op("Mul", [rotated, self.sin])])

    def repeat_kv(self, x: str, shape: list[int]) -> str:
        """(1, kv_heads, a, b) -> (1, n_heads, a, b), each KV head serving n_heads/kv_heads."""
        repeat = self.c.n_heads // self.c.n_kv_heads
        if repeat == 1:
            return x
        x = self.op("Unsqueeze", [x, self.ints("/axis2", [2])])              # (1, kv, 1, a, b)
        x = self.op("Expand", [x, self.ints("/repeat", [1, 1, repeat, 1, 1])])  # (1, kv, r, a, b)
        return self.op("Reshape", [x, self.ints(f"/heads_{'_'.join(map(str, shape))}", shape)])

    def attention(self, h: str, i: int) -> tuple[str, str, str]:
        """One layer's attention; returns (output, new keys, new values).

            h ─► MatMul q ─► Reshape ─► rotary ─► Transpose ─────────► MatMul ─► *scale ─► +mask
            h ─► MatMul k ─► Reshape ─► rotary ─┬─► Concat(k_cache[i], k) ─► Transpose ─┘   │
                                                └─► k_out                          Softmax ◄─┘
            h ─► MatMul v ─► Reshape ──────────┬─► Concat(v_cache[i], v) ─► Transpose ─► MatMul
                                                └─► v_out                                   │
                                  MatMul o ◄─ Reshape ◄─ Transpose ◄────────────────────────┘
        """
        c, p = self.c, f"layers.{i}.attention"
        q_heads = self.ints("/q_heads", [1, -1, c.n_heads, c.head_dim])
        kv_heads = self.ints("/kv_heads", [1, -1, c.n_kv_heads, c.head_dim])
        q = self.rotary(self.op("Reshape", [self.matmul(h, f"{p}.wq.weight"), q_heads]))
        k = self.rotary(self.op("Reshape", [self.matmul(h, f"{p}.wk.weight"), kv_heads]))
        v = self.op("Reshape", [self.matmul(h, f"{p}.wv.weight"), kv_heads])
        # q, k, v: (1, seq, heads, head_dim)
        layer = self.const(f"/layer_{i}", np.array(i, dtype=np.int64))
        k_all = self.op("Concat", [self.op("Gather", ["k_cache", layer], axis=1), k], axis=1)
        v_all = self.op("Concat", [self.op("Gather", ["v_cache", layer], axis=1), v], axis=1)
        # k_all, v_all: (1, past + seq, kv_heads, head_dim)
        keys = self.repeat_kv(self.op("Transpose", [k_all], perm=[0, 2, 3, 1]),
                              [1, c.n_heads, c.head_dim, -1])   # (1, heads, head_dim, total)
        values = self.repeat_kv(self.op("Transpose", [v_all], perm=[0, 2, 1, 3]),
                                [1, c.n_heads, -1, c.head_dim])  # (1, heads, total, head_dim)
        queries = self.op("Transpose", [q], perm=[0, 2, 1, 3])  # (1, heads, seq, head_dim)
        scale = self.const("/scale", np.array(c.head_dim ** -0.5, dtype=self.dtype))
        scores = self.op("Mul", [self.op("MatMul", [queries, keys]), scale])
        probs = self.op("Softmax", [self.op("Add", [scores, self.mask])], axis=-1)
        out = self.op("Transpose", [self.op("MatMul", [probs, values])], perm=[0, 2, 1, 3])
        out = self.op("Reshape", [out, self.ints("/merge_heads", [1, -1, c.n_heads * c.head_dim])])
        return self.matmul(out, f"{p}.wo.weight"), k, v        # out: (1, seq, heads * head_dim)

    def feed_forward(self, x: str, i: int) -> str:
        p = f"layers.{i}.feed_forward"
        gate = self.matmul(x, f"{p}.w1.weight")
        silu = self.op("Mul", [gate, self.op("Sigmoid", [gate])])
        return self.matmul(self.op("Mul", [silu, self.matmul(x, f"{p}.w3.weight")]),
                           f"{p}.w2.weight")

    def build(self) -> onnx.ModelProto:
        c = self.c
        self.positions()
        h, new_k, new_v = "x", [], []
        axis1 = self.ints("/axis1", [1])
        for i in range(c.n_layers):
            attn, k, v = self.attention(self.rms_norm(h, f"layers.{i}.attention_norm.weight"), i)
            h = self.op("Add", [h, attn])
            h = self.op("Add", [h, self.feed_forward(
                self.rms_norm(h, f"layers.{i}.ffn_norm.weight"), i)])
            new_k.append(self.op("Unsqueeze", [k, axis1]))  # (1, 1, seq, kv_heads, head_dim)
            new_v.append(self.op("Unsqueeze", [v, axis1]))
        self.op("Concat", new_k, "k_out", axis=1)      # (1, n_layers, seq, kv_heads, head_dim)
        self.op("Concat", new_v, "v_out", axis=1)
        last = self.op("Slice", [h, self.ints("/last_start", [-1]),
                                 self.ints("/last_end", [2**62]), axis1])   # (1, 1, dim)
        logits = self.matmul(self.rms_norm(last, "norm.weight"), "output.weight")
        self.op("Reshape", [logits, self.ints("/logits_shape", [1, c.vocab_size])], "logits")
        return self._model()                                            # logits: (1, vocab)

    def _model(self) -> onnx.ModelProto:
        c, t = self.c, helper.np_dtype_to_tensor_dtype(self.dtype)
        cache = [1, c.n_layers, "past_len", c.n_kv_heads, c.head_dim]
        new = [1, c.n_layers, "seq", c.n_kv_heads, c.head_dim]
        info = helper.make_tensor_value_info
        inputs = [info("x", t, [1, "seq", c.dim]),
                  info("attn_mask", t, [c.max_seq_len, c.max_seq_len]),
                  info("k_cache", t, cache), info("v_cache", t, cache),
                  info("pos", TensorProto.INT64, [])]
        outputs = [info("logits", t, [1, c.vocab_size]), info("k_out", t, new),
                   info("v_out", t, new)]
        graph = helper.make_graph(self.nodes, "llama2_legacy", inputs, outputs,
                                  list(self.initializers.values()))
        model = helper.make_model(graph, producer_name="tests.legacy_graph",
                                  opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        return model


def build_legacy_variant(folder: Path, config: Config, weights: dict[str, np.ndarray],
                         tokenizer_path: Path, dtype=np.float32) -> Path:
    """Write an original-format variant folder (graph, embeddings.pth, ../tokenizer.model).

    Args:
        folder: the variant folder to create; its name is the variant name.
        config: the model's shape; max_seq_len sets the attention mask's size.
        weights: canonical tensors (checkpoints.canonical_shapes names, half-split rotary).
        tokenizer_path: tokenizer.model to copy to folder.parent, where the release kept it.
        dtype: np.float32 or np.float16 for the graph's weights, inputs and outputs.
    Returns:
        `folder`.
    """
    import torch

    folder = Path(folder)
    (folder / "ONNX").mkdir(parents=True, exist_ok=True)
    graph = folder / "ONNX" / f"LlamaV2_{folder.name}.onnx"
    model = _LegacyGraph(config, weights, dtype).build()
    onnx.checker.check_model(model)
    onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=graph.name + ".data", size_threshold=1024)
    embedding = torch.nn.Embedding(config.vocab_size, config.dim)
    with torch.no_grad():
        embedding.weight.copy_(torch.from_numpy(weights["tok_embeddings.weight"]))
    torch.save(embedding.to(torch.float16 if dtype == np.float16 else torch.float32).state_dict(),
               folder / "embeddings.pth")
    shutil.copy(tokenizer_path, folder.parent / "tokenizer.model")
    return folder
