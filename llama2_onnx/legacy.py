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
import onnxruntime as ort

from .config import Config
from .errors import UserError, VariantError
from .files import check_not_lfs_pointer
from .layout import data_path
from .session import EngineParts, create_session, resolve_provider
from .tokenizer import Tokenizer

LEGACY_INPUTS = {"x", "attn_mask", "k_cache", "v_cache", "pos"}
LEGACY_CONTEXT = 2048  # the original release's graphs had a 2048-token attention mask
NP_FROM_ORT = {"tensor(float16)": np.float16, "tensor(float)": np.float32}


def is_legacy_session(session: ort.InferenceSession) -> bool:
    return {i.name for i in session.get_inputs()} == LEGACY_INPUTS


def load_pth_embeddings(path: Path) -> np.ndarray:
    """The `weight` of the torch.nn.Embedding state dict saved as embeddings.pth."""
    if not path.is_file():
        raise VariantError(f"embeddings file {path} does not exist; pass --embedding_file.")
    check_not_lfs_pointer(path)
    try:
        import torch
    except ImportError:
        raise UserError("reading embeddings.pth of the original format needs PyTorch: "
                        "pip install torch==2.13.0") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad archive
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise VariantError(f"{path} cannot be read as a PyTorch file ({first}); fetch the "
                           "variant's embeddings.pth again.") from None
    weight = state.get("weight") if isinstance(state, dict) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise VariantError(f"{path} has no 2-D float 'weight' tensor; it is not an "
                           "embeddings.pth of the original Llama-2-Onnx release.")
    return weight.float().numpy()


class LegacyRuntime:
    """Runs an original-format graph; same `run(embeds, start)` interface as session.Runtime."""

    supports_continued_prefill = True

    def __init__(self, session: ort.InferenceSession, cache_len: int | None = None,
                 provider: str = "cpu") -> None:
        self.session, self.provider = session, provider
        meta = {i.name: i for i in session.get_inputs()}
        self.dtype = NP_FROM_ORT[meta["x"].type]
        mask_len = meta["attn_mask"].shape[-1]
        self.max_len = mask_len if isinstance(mask_len, int) else LEGACY_CONTEXT
        _, self.n_layers, _, self.n_heads, self.head_dim = meta["k_cache"].shape
        self.dim = meta["x"].shape[-1]
        self.cache_len = min(cache_len or self.max_len, self.max_len)
        shape = (1, self.n_layers, self.cache_len, self.n_heads, self.head_dim)
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


def legacy_config(runtime: LegacyRuntime, vocab_size: int) -> Config:
    """A Config describing what the original graph's input shapes tell."""
    return Config(dim=runtime.dim, n_layers=runtime.n_layers, n_heads=runtime.n_heads,
                  vocab_size=vocab_size, max_seq_len=runtime.max_len,
                  dtype="float16" if runtime.dtype == np.float16 else "float32",
                  provenance={"format": "original Llama-2-Onnx"})


def load_legacy(graph: Path, embeddings: Path, tokenizer_path: Path, provider: str = "auto",
                max_seq_len: int | None = None) -> EngineParts:
    """Open an original-format graph with its embeddings.pth and tokenizer.model."""
    for p in (graph, data_path(graph), embeddings, tokenizer_path):
        check_not_lfs_pointer(p)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    table = load_pth_embeddings(embeddings)
    provider = resolve_provider(provider)
    session = create_session(graph, provider, cache_len=max_seq_len or LEGACY_CONTEXT)
    if not is_legacy_session(session):
        raise VariantError(f"{graph} has neither our graph contract nor the original "
                           "Llama-2-Onnx inputs (x, attn_mask, k_cache, v_cache, pos).")
    runtime = LegacyRuntime(session, max_seq_len, provider)
    if table.shape != (tokenizer.n_words, runtime.dim):
        raise VariantError(f"{embeddings} has shape {table.shape} but the tokenizer and graph "
                           f"need ({tokenizer.n_words}, {runtime.dim}); use the matching files.")
    config = legacy_config(runtime, tokenizer.n_words)
    return EngineParts(runtime, tokenizer, table.astype(runtime.dtype), config, graph.stem)
