"""Build the Llama 2 ONNX graph of our contract, streaming its weights into one external-data file.

Graph contract (version in config.CONTRACT_VERSION):

  inputs   inputs_embeds          (batch, seq, dim)                         model dtype
           position_ids           (batch, seq)                              int64
           seqlens_k              (batch,)  = past + seq - 1                int32
           total_sequence_length  ()        = past + seq                    int32
           past_key.N, past_value.N (batch, kv_heads, cache_len, head_dim)  model dtype
  outputs  logits                 (batch, 1, vocab)  last position only     float32
           present_key.N, present_value.N  same buffers as past_* when bound to the same OrtValue

The forms CUDA and the CPU run (graph_forms.py, derived when a session opens) also take
`logits_at` (1,) int64: the position within the run whose logits come out (a padded prefill's
last real token; 0 for a decode step).

One decoder layer (N = 0 .. n_layers-1); the residual stream `r` travels beside the normed one:

      r ──► SkipSimplifiedLayerNorm ──► x ──► MatMul qkv ──► Split ─ q ──► RotaryEmbedding ──┐
      ▲      (adds the previous                                   ├ k ──► RotaryEmbedding ──┤
      │       block's output to r)                                └ v ──────────────────────┤
      │                                                    GroupQueryAttention ◄────────────┘
      │                                                      │        (cache in place)
      │     SkipSimplifiedLayerNorm ◄── MatMul o ◄───────────┘
      │           │
      │           └──► MatMul w1|w3 ──► Split ─ gate ──► x*Sigmoid(x) ──► Mul
      │                                        └ up ───────────────────────┘
      │                                                                     │
      └──────────────────── MatMul w2 ◄─────────────────────────────────────┘

q, k and v come from one MatMul over the concatenated weights (one read of x, one kernel
launch instead of three) and are split apart again, because DirectML's GroupQueryAttention
takes them unpacked; the gate and up projections share one MatMul the same way.
CUDA and the CPU run a packed form of this graph, derived from its nodes when the session
opens (graph_forms.py): GroupQueryAttention takes qkv whole and applies rotary itself.

Operator support, from ONNX Runtime's OperatorKernels.md (checked for CPU, CUDA and DirectML):
- GroupQueryAttention: CPU float/float16, CUDA float16 only (float32 variants fall back to CPU
  for attention on CUDA), DirectML float/float16 but without packed QKV or built-in rotary,
  which is why Q, K, V enter it split and rotary is its own RotaryEmbedding node.
- RotaryEmbedding (com.microsoft), SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization,
  MatMul, Split, Sigmoid, Mul, Slice, Cast: all three providers, float and float16 (CPU computes
  float16 MatMul/Mul/Sigmoid by inserting casts, so float16 variants are for GPUs).
- float16 safety: both layer norms accumulate the mean of squares in float32, and attention's
  softmax runs in float32 inside GroupQueryAttention on every provider; logits leave as float32.

int4 variants (weight-only): every MatMul of the blocks and the output projection becomes
MatMulNBits (com.microsoft; bits 4, blocks of 32/64/128 along K, B = packed uint8 codes,
float16 scales, no zero-point input: quantize.py; a Q4_1 GGUF source's kept codes add a
per-block offset term of ordinary operators: matmul_blocks). Everything else is the float16
graph: the activations, norms, rotary tables, KV cache and the embedding table are float16.
- MatMulNBits in OperatorKernels.md: CPU T1 (A, scales, Y) float/float16, B uint8, zero points
  uint8/float/float16; CUDA T1 bfloat16/float/float16; DirectML T1 float/float16, B uint8, and
  no type listed for zero points (its kernel also refuses the g_idx and bias inputs), hence
  symmetric codes with the implicit zero point 8 and only the A, B, scales inputs.
- Scales share A's type on every provider, so one graph has one activation type. float16 it is:
  CUDA's GroupQueryAttention needs it; the CPU runs a float32 form derived in memory
  (graph_forms), so no second graph per variant is shipped.
- accuracy_level 4 lets the CPU kernel quantize activations to int8 per block and use integer
  dot products (faster on the CPU, perplexity unchanged: docs/export.md); GPU kernels ignore it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .config import NP_DTYPES, Config
from .quantize import THREADS, ZERO_POINT, Int4Blocks, pack, quantize
from .rope import rotary_cos_sin

OPSET = 17
ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
               "int4": TensorProto.FLOAT16}
# MatMulNBits' accuracy_level: 4 lets the CPU kernel multiply int8-quantized activations with
# the 4-bit weights; CUDA and DirectML ignore it.
ACCURACY_LEVEL = 4
# Codes kept from a 4-bit source use the CPU's exact kernel (float32 activations): on SmolLM2's
# Q4_1 file int8 activations alone moved the logits by 0.12 of their spread (KL 0.014) against
# 0.0013 (KL 3e-6) exact, and the exact kernel still decodes 1.6x as fast as float32
# (docs/export.md, "int4 from a GGUF file").
KEPT_ACCURACY_LEVEL = 0
TRANSPOSE_ROWS = 64  # rows per band of a transposed copy (see transposed)


class ExternalDataWriter:
    """Appends tensors to one .onnx.data file and returns initializers that point into it.

    Writing and hashing (the manifest's sha256, so nobody reads the file back to hash it) run
    on one background thread while the caller prepares the next tensor; at most one tensor
    waits, which bounds the memory held to two tensors.
    """

    def __init__(self, path: Path, on_write: Callable[[str, int], None] | None = None) -> None:
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.offset = 0
        self.on_write = on_write
        self.digest = hashlib.sha256()
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: Future | None = None

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        # Large tensors start on 64 KiB boundaries so ONNX Runtime can memory-map them
        # (Windows' allocation granularity); small ones only need 64-byte alignment.
        align = 65536 if array.nbytes >= (1 << 20) else 64
        pad = -self.offset % align
        self.offset += pad
        tensor = TensorProto(name=name, dims=array.shape,
                             data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)),
                           ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        self.offset += array.nbytes
        self._wait()
        self.pending = self.pool.submit(self._write, b"\0" * pad, array)
        if self.on_write:
            self.on_write(name, array.nbytes)
        return tensor

    def _write(self, pad: bytes, array: np.ndarray) -> None:
        data = memoryview(array).cast("B")
        for chunk in (pad, data):
            self.file.write(chunk)
            self.digest.update(chunk)  # hashlib releases the GIL for large buffers

    def _wait(self) -> None:
        if self.pending is not None:
            self.pending.result()  # re-raises a failed write (a full disk) here
            self.pending = None

    def sha256(self) -> dict[str, int | str]:
        """The manifest entry of the file written so far (after close)."""
        return {"size": self.offset, "sha256": self.digest.hexdigest()}

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self.pool.shutdown()
            self.file.close()


def transposed(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """array.T as a C-contiguous `dtype` array. NumPy's own transposed copy streams one of the
    two sides with a large stride (0.3 GB/s for a float16 4096 x 11008 matrix); copying 64 rows
    at a time keeps both sides in cache, and the row bands copy on threads (NumPy releases the
    GIL), which made the float16 export's transposes several times faster."""
    rows, cols = array.shape
    out = np.empty((cols, rows), dtype)

    def band(start: int) -> None:
        out[:, start:start + TRANSPOSE_ROWS] = array[start:start + TRANSPOSE_ROWS].T

    starts = range(0, rows, TRANSPOSE_ROWS)
    with ThreadPoolExecutor(max_workers=min(len(starts), THREADS)) as pool:
        list(pool.map(band, starts))
    return out


class _GraphBuilder:
    """Accumulates nodes and initializers; weights are fetched and written as they are needed."""

    def __init__(self, config: Config, weights: Callable[[str], np.ndarray],
                 writer: ExternalDataWriter,
                 blocks: Callable[[str], Int4Blocks | None] | None = None) -> None:
        self.config = config
        self.weights = weights
        self.blocks = blocks
        self.writer = writer
        self.dtype = NP_DTYPES[config.dtype]
        self.quantize_output = config.quantizes_output
        self.split_sizes: set[str] = set()
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def weight(self, name: str) -> str:
        """Write a norm weight in the activation dtype and return its name."""
        self.initializers.append(self.writer.add(name, self.weights(name).astype(self.dtype)))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str,
             domain: str = "", **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))

    def matmul(self, x: str, weights: list[str], out: str, fused: str | None = None) -> str:
        """x @ W.T for the Linear weights `weights` (out, in), concatenated along `out` under
        the name `fused` when there are several (the caller splits the result)."""
        name = fused or weights[0]
        if quantized(self.config, name, self.quantize_output):
            kept = self.kept_blocks(weights)
            if kept is not None:
                return self.matmul_blocks(x, name, kept, out)
        parts = [self.weights(w) for w in weights]
        array = parts[0] if len(parts) == 1 else np.concatenate(parts)  # (sum of outs, in)
        del parts
        if quantized(self.config, name, self.quantize_output):
            return self.matmul_nbits(x, name, array, out)
        self.initializers.append(self.writer.add(name + "_t", transposed(array, self.dtype)))
        self.node("MatMul", [x, name + "_t"], [out], out)
        return out

    def matmul_nbits(self, x: str, name: str, array: np.ndarray, out: str) -> str:
        """x @ W.T with W (N, K) stored as 4-bit blocks (quantize.py) and float16 scales."""
        n, k = array.shape
        block = self.config.block_size
        packed, scales = quantize(array, block)
        self.initializers += [self.writer.add(name + "_q4", packed),
                              self.writer.add(name + "_scales", scales.astype(self.dtype))]
        self.node("MatMulNBits", [x, name + "_q4", name + "_scales"], [out], out,
                  domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                  accuracy_level=ACCURACY_LEVEL)
        return out

    def kept_blocks(self, weights: list[str]) -> Int4Blocks | None:
        """The source's own 4-bit blocks of every part, stacked, when the source offers them
        for all parts in this variant's block size; else None (the weights are quantized)."""
        if self.blocks is None:
            return None
        parts = [self.blocks(w) for w in weights]
        if any(p is None or p.block != self.config.block_size for p in parts):
            return None
        return Int4Blocks.concatenate(parts)

    def matmul_blocks(self, x: str, name: str, blocks: Int4Blocks, out: str) -> str:
        """x @ W.T with the source's codes kept (quantize.Int4Blocks): MatMulNBits of the
        codes and scales, plus, for blocks with offsets (Q4_1), the offsets times each block's
        sum of x:

            x ──► MatMulNBits(codes, scales) ─────────────────────────────┐
            └───► Reshape (.., K / block, block) ─► ReduceSum ─► MatMul ─► Add ─► out
                                                      (.., K / block) @ offsets.T (K / block, N)
        """
        n, k, block = blocks.codes.shape[0], blocks.codes.shape[1] * blocks.block, blocks.block
        products = out if blocks.offsets is None else out + "/codes"
        self.initializers += [self.writer.add(name + "_q4", pack(blocks.codes)),
                              self.writer.add(name + "_scales", blocks.scales.astype(self.dtype))]
        self.node("MatMulNBits", [x, name + "_q4", name + "_scales"], [products], products,
                  domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                  accuracy_level=KEPT_ACCURACY_LEVEL)
        if blocks.offsets is None:
            return out
        shape = self.constant(f"/blocks/shape_{k // block}_{block}", [0, 0, k // block, block])
        self.node("Reshape", [x, shape], [out + "/blocks"], out + "/blocks")
        self.node("ReduceSum", [out + "/blocks", self.constant("/blocks/last_axis", [-1])],
                  [out + "/block_sums"], out + "/block_sums", keepdims=0)
        self.initializers.append(self.writer.add(name + "_offsets",
                                                 transposed(blocks.offsets, self.dtype)))
        self.node("MatMul", [out + "/block_sums", name + "_offsets"], [out + "/offsets"],
                  out + "/offsets")
        self.node("Add", [products, out + "/offsets"], [out], out)
        return out

    def constant(self, name: str, values: list[int]) -> str:
        """An int64 vector initializer, written once however often it is asked for."""
        if name not in self.split_sizes:
            self.split_sizes.add(name)
            self.initializers.append(helper.make_tensor(name, TensorProto.INT64, [len(values)],
                                                        values))
        return name

    def split(self, x: str, sizes: list[int], outs: list[str]) -> list[str]:
        """Split the last axis of x into `sizes` (one int64 initializer per distinct split)."""
        key = self.constant("/split/" + "_".join(map(str, sizes)), sizes)
        self.node("Split", [x, key], outs, outs[0] + "/split", axis=-1)
        return outs

    def skip_norm(self, x: str, residual: str, weight: str, prefix: str) -> tuple[str, str]:
        normed, summed = f"{prefix}/normed", f"{prefix}/residual"
        self.node("SkipSimplifiedLayerNormalization", [x, residual, self.weight(weight)],
                  [normed, "", "", summed], prefix, domain="com.microsoft",
                  epsilon=self.config.norm_eps)
        return normed, summed

    def rotary(self, x: str, heads: int, out: str) -> str:
        self.node("RotaryEmbedding", [x, "position_ids", "cos_cache", "sin_cache"], [out], out,
                  domain="com.microsoft", interleaved=0, num_heads=heads)
        return out

    def attention(self, x: str, i: int) -> str:
        c, p, w = self.config, f"/layers.{i}/attention", f"layers.{i}.attention"
        # One MatMul for q, k and v: (batch, seq, dim) -> (batch, seq, dim + 2 * kv_dim).
        qkv = self.matmul(x, [f"{w}.wq.weight", f"{w}.wk.weight", f"{w}.wv.weight"], f"{p}/qkv",
                          fused=f"{w}.wqkv.weight")
        q, k, v = self.split(qkv, [c.n_heads * c.head_dim, c.kv_dim, c.kv_dim],
                             [f"{p}/q", f"{p}/k", f"{p}/v"])
        q = self.rotary(q, c.n_heads, f"{p}/q_rot")
        k = self.rotary(k, c.n_kv_heads, f"{p}/k_rot")
        self.node("GroupQueryAttention",
                  [q, k, v, f"past_key.{i}", f"past_value.{i}", "seqlens_k",
                   "total_sequence_length"],
                  [f"{p}/out", f"present_key.{i}", f"present_value.{i}"], f"{p}/gqa",
                  domain="com.microsoft", num_heads=c.n_heads, kv_num_heads=c.n_kv_heads)
        return self.matmul(f"{p}/out", [f"{w}.wo.weight"], f"{p}/o")

    def feed_forward(self, x: str, i: int) -> str:
        p, w = f"/layers.{i}/feed_forward", f"layers.{i}.feed_forward"
        # One MatMul for the gate (w1) and up (w3) projections: (batch, seq, 2 * hidden).
        gate_up = self.matmul(x, [f"{w}.w1.weight", f"{w}.w3.weight"], f"{p}/gate_up",
                              fused=f"{w}.w13.weight")
        gate, up = self.split(gate_up, [self.config.hidden_dim] * 2, [f"{p}/gate", f"{p}/up"])
        self.node("Sigmoid", [gate], [f"{p}/sigmoid"], f"{p}/sigmoid")
        self.node("Mul", [gate, f"{p}/sigmoid"], [f"{p}/silu"], f"{p}/silu")
        self.node("Mul", [f"{p}/silu", up], [f"{p}/act"], f"{p}/act")
        return self.matmul(f"{p}/act", [f"{w}.w2.weight"], f"{p}/down")

    def build(self) -> onnx.ModelProto:
        c = self.config
        cos, sin = rotary_cos_sin(c.head_dim, c.rope_theta, c.max_seq_len, c.rope_scaling)
        self.initializers += [self.writer.add("cos_cache", cos.astype(self.dtype)),
                              self.writer.add("sin_cache", sin.astype(self.dtype))]
        x = "/layers.0/attention_norm/normed"
        self.node("SimplifiedLayerNormalization",
                  ["inputs_embeds", self.weight("layers.0.attention_norm.weight")], [x],
                  "/layers.0/attention_norm", axis=-1, epsilon=c.norm_eps)
        residual, block_out = "inputs_embeds", None
        for i in range(c.n_layers):
            if i > 0:
                x, residual = self.skip_norm(block_out, residual,
                                             f"layers.{i}.attention_norm.weight",
                                             f"/layers.{i}/attention_norm")
            attn = self.attention(x, i)
            x, residual = self.skip_norm(attn, residual, f"layers.{i}.ffn_norm.weight",
                                         f"/layers.{i}/ffn_norm")
            block_out = self.feed_forward(x, i)
        x, _ = self.skip_norm(block_out, residual, "norm.weight", "/norm")
        # Only the last position's logits are computed: (batch, 1, dim) -> (batch, 1, vocab).
        self.initializers += [
            helper.make_tensor(n, TensorProto.INT64, [1], [v])
            for n, v in (("/last/start", -1), ("/last/end", 2**62), ("/last/axis", 1))]
        self.node("Slice", [x, "/last/start", "/last/end", "/last/axis"], ["/last"], "/last")
        logits = self.matmul("/last", ["output.weight"], "/lm_head")
        self.node("Cast", [logits], ["logits"], "/logits", to=TensorProto.FLOAT)
        return self._model()

    def _model(self) -> onnx.ModelProto:
        c, t = self.config, ONNX_DTYPES[self.config.dtype]
        cache = ["batch", c.n_kv_heads, "cache_len", c.head_dim]
        info = helper.make_tensor_value_info
        inputs = [info("inputs_embeds", t, ["batch", "seq", c.dim]),
                  info("position_ids", TensorProto.INT64, ["batch", "seq"]),
                  info("seqlens_k", TensorProto.INT32, ["batch"]),
                  info("total_sequence_length", TensorProto.INT32, [])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                 ["batch", 1, c.vocab_size])]
        for i in range(c.n_layers):
            inputs += [helper.make_tensor_value_info(f"past_{kv}.{i}", t, cache)
                       for kv in ("key", "value")]
            outputs += [helper.make_tensor_value_info(f"present_{kv}.{i}", t, cache)
                        for kv in ("key", "value")]
        graph = helper.make_graph(self.nodes, "llama2", inputs, outputs, self.initializers)
        model = helper.make_model(
            graph, producer_name="llama2_onnx",
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 8
        # Read back at load time to refuse a config.json that does not describe this graph.
        helper.set_model_props(model, {"max_seq_len": str(c.max_seq_len),
                                       "n_layers": str(c.n_layers)})
        return model


def quantized(config: Config, name: str, quantize_output: bool | None = None) -> bool:
    """Whether the graph stores matrix `name` (canonical, or fused like `...wqkv.weight`) as
    4-bit codes with float16 block scales: every Linear weight of an int4 variant, the output
    projection when `quantize_output` (default Config.quantizes_output); never the norms or the
    embedding table."""
    if config.dtype != "int4" or name.endswith("norm.weight") or name == "tok_embeddings.weight":
        return False
    return name != "output.weight" or (config.quantizes_output if quantize_output is None
                                       else quantize_output)


def largest_storable(config: Config, name: str) -> float:
    """The largest magnitude canonical tensor `name` may hold to be stored without becoming
    inf: its storage type's largest value (float16: 65504), or for a 4-bit matrix 8 times
    that, since a block stores its largest magnitude over 8 as a float16 scale (quantize.py)."""
    top = float(np.finfo(NP_DTYPES[config.dtype]).max)
    return top * ZERO_POINT if quantized(config, name) else top


def build_model(config: Config, weights: Callable[[str], np.ndarray],
                writer: ExternalDataWriter,
                blocks: Callable[[str], Int4Blocks | None] | None = None) -> onnx.ModelProto:
    """Build the graph for `config`, pulling canonical weights from `weights` one at a time.

    Args:
        config: the variant's configuration (its dtype selects float32 or float16).
        weights: returns a canonical tensor by name (see checkpoints.py).
        writer: where the weights go; the returned model refers to it as external data.
        blocks: int4 only: a 4-bit source's own blocks of a canonical matrix, or None where it
            has none (Source.int4_blocks); a matrix whose parts all have blocks in the
            variant's block size keeps them instead of being quantized again.
    """
    return _GraphBuilder(config, weights, writer, blocks).build()


def n_graph_tensors(config: Config) -> int:
    """How many weight tensors build_model writes (for progress bars)."""
    # Per layer: 2 norms and 4 matrices (qkv, o, w1+w3, w2), int4 ones as codes and scales.
    if config.dtype == "int4":
        return 10 * config.n_layers + 2 + (3 if config.quantizes_output else 2)
    return 6 * config.n_layers + 2 + 2
