"""The original Llama-2-Onnx variant format, run through the same engine.

That release's graph takes `x` (1, seq, dim) embeddings, `attn_mask` (max_seq, max_seq) with
-10000 above the diagonal, `k_cache`/`v_cache` (1, n_layers, past, n_heads, head_dim) and `pos`
(int64 scalar), and returns last-position `logits` (1, vocab) plus the new positions' keys and
values (1, n_layers, seq, n_heads, head_dim). Its cache lives on the host and is sliced and
copied every step, as the original example did; our contract exists to avoid exactly that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import TensorProto

from .config import Config
from .errors import UserError, VariantError
from .files import check_not_lfs_pointer
from .placement import ORIGINAL, Placement, RunOptions, place
from .session import EngineParts, create_session
from .tokenizer import Tokenizer
from .variant_folder import ORIGINAL_EMBEDDINGS, TOKENIZER, data_path

LEGACY_INPUTS = {"x", "attn_mask", "k_cache", "v_cache", "pos"}
LEGACY_CONTEXT = 2048  # the original release's graphs had a 2048-token attention mask

def load_pth_embeddings(path: Path) -> np.ndarray:
    """The `weight` of the torch.nn.Embedding state dict saved as embeddings.pth."""
    if not path.is_file():
        raise VariantError(f"embeddings file {path} does not exist; pass --embedding_file.")
    check_not_lfs_pointer(path)
    try:
        import torch
    except ImportError:
        raise UserError(f"reading {ORIGINAL_EMBEDDINGS} of the original format needs PyTorch: "
                        "pip install torch==2.13.0") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad archive
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise VariantError(f"{path} cannot be read as a PyTorch file ({first}); fetch the "
                           f"variant's {ORIGINAL_EMBEDDINGS} again.") from None
    weight = state.get("weight") if isinstance(state, dict) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise VariantError(f"{path} has no 2-D float 'weight' tensor; it is not an "
                           f"{ORIGINAL_EMBEDDINGS} of the original Llama-2-Onnx release.")
    return weight.float().numpy()


def legacy_config(graph: Path, vocab_size: int) -> Config:
    """A Config describing what the original graph's input shapes tell (read without its
    weights).

    Raises:
        VariantError when the graph has not the original inputs or its shapes are not fixed.
    """
    try:
        model = onnx.load(str(graph), load_external_data=False)
    except (OSError, ValueError, DecodeError) as exc:
        raise VariantError(f"ONNX cannot read {graph} ({exc}); fetch the variant again.") from None
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    if set(inputs) != LEGACY_INPUTS:
        raise VariantError(f"{graph} has neither our graph contract nor the original "
                           "Llama-2-Onnx inputs (x, attn_mask, k_cache, v_cache, pos).")
    dims = {name: [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            for name, t in inputs.items()}
    cache, dim = dims["k_cache"], dims["x"][-1:]
    if len(cache) != 5 or None in (*cache[1:2], *cache[3:], *dim):
        raise VariantError(f"{graph} has k_cache dims {cache} and x dims {dims['x']}; the "
                           "original format fixes the layer count, heads, head size and width: "
                           "this graph is not one of its variants.")
    _, n_layers, _, kv_heads, head_dim = cache
    if dim[0] % head_dim or (dim[0] // head_dim) % kv_heads:
        raise VariantError(f"{graph} has {kv_heads} cached heads of {head_dim} but a width of "
                           f"{dim[0]}; this graph is not one of the original format's variants.")
    logits = next((o.type.tensor_type.shape.dim for o in model.graph.output
                   if o.name == "logits"), [])
    vocab = logits[-1].dim_value if logits and logits[-1].HasField("dim_value") else None
    if vocab is not None and vocab != vocab_size:
        raise VariantError(f"the tokenizer has {vocab_size} tokens but {graph} writes logits for "
                           f"{vocab}; use the {TOKENIZER} of the same release.")
    mask = dims["attn_mask"][-1] if dims["attn_mask"] else None
    kind = inputs["x"].elem_type
    return Config(dim=dim[0], n_layers=n_layers, n_heads=dim[0] // head_dim, n_kv_heads=kv_heads,
                  vocab_size=vocab_size,
                  max_seq_len=mask or LEGACY_CONTEXT,
                  dtype="float16" if kind == TensorProto.FLOAT16 else "float32",
                  provenance={"format": "original Llama-2-Onnx"})


class LegacyRuntime:
    """Runs an original-format graph; same `run(embeds, start)` interface as session.Runtime."""

    supports_continued_prefill = True
    pads = False
    max_chunk = None
    slots = 1  # one sequence (placement refuses --parallel for this format)

    def __init__(self, session: ort.InferenceSession, config: Config,
                 placement: Placement) -> None:
        self.session, self.provider = session, placement.provider
        self.dtype = placement.dtype
        self.max_len, self.cache_len = config.max_seq_len, placement.cache_len
        self.n_layers, self.dim = config.n_layers, config.dim
        shape = (1, config.n_layers, self.cache_len, config.n_kv_heads, config.head_dim)
        self.k_cache, self.v_cache = np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)
        self.mask = (-10000.0 * np.triu(np.ones((self.max_len, self.max_len)), k=1)
                     ).astype(self.dtype)

    def run(self, embeds: np.ndarray, start: int) -> np.ndarray:
        seq = embeds.shape[0]
        logits, k_out, v_out = self.session.run(None, {
            "x": embeds[None].astype(self.dtype), "attn_mask": self.mask,
            "k_cache": self.k_cache[:, :, :start], "v_cache": self.v_cache[:, :, :start],
            "pos": np.array(start, dtype=np.int64)})[:3]
        self.k_cache[:, :, start:start + seq] = k_out
        self.v_cache[:, :, start:start + seq] = v_out
        return logits.reshape(-1).astype(np.float32)


def load_legacy(graph: Path, embeddings: Path, tokenizer_path: Path,
                options: RunOptions) -> EngineParts:
    """Open an original-format graph with its embeddings.pth and tokenizer.model.

    Raises:
        VariantError for files that do not fit together; UserError for options this format
        cannot take (a longer context than its graph's, graph capture).
    """
    for p in (graph, data_path(graph), embeddings, tokenizer_path):
        check_not_lfs_pointer(p)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    table = load_pth_embeddings(embeddings)
    config = legacy_config(graph, tokenizer.n_words)
    if table.shape != (tokenizer.n_words, config.dim):
        raise VariantError(f"{embeddings} has shape {table.shape} but the tokenizer and graph "
                           f"need ({tokenizer.n_words}, {config.dim}); use the matching files.")
    placement = place(config, options, contract=ORIGINAL)
    session = create_session(graph, placement)
    runtime = LegacyRuntime(session, config, placement)
    return EngineParts(runtime, tokenizer, table.astype(runtime.dtype), config, graph.stem)
