"""Oracles that share no code with llama2_onnx: Llama 2 from its formulas and from transformers.

Two independent definitions of the model the exporter must reproduce:

- `meta_logits`: Meta's formulation, written here from the math of the Llama 2 paper and
  Meta's release: raw `consolidated.*.pth` tensors, RMSNorm, rotary embeddings on complex
  numbers (each head's features taken as interleaved pairs (x[2i], x[2i+1]) and multiplied by
  e^{i p theta^(-2i/d)}), grouped-query attention, SiLU-gated MLP. Computed in float64.
- `transformers_model`: Hugging Face's LlamaForCausalLM, the reference implementation of the
  half-split layout, loaded from a Hugging Face folder or from raw Meta tensors permuted here.

Nothing here imports llama2_onnx: a bug in its rotary tables, name tables or permutations
cannot leak into the answer these give.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

# How Meta's model-parallel code splits each tensor across consolidated.NN.pth shards:
# column-parallel linears along their output rows, row-parallel linears and the embedding
# table along their input columns; norms are copied whole into every shard.
_SPLIT_ROWS = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
_SPLIT_COLS = ("wo.weight", "w2.weight", "tok_embeddings.weight")


def load_meta(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """params.json and the merged float64 tensors of a Meta checkpoint, read with torch.load."""
    params = json.loads((Path(folder) / "params.json").read_text())
    shards = [torch.load(p, map_location="cpu", weights_only=True)
              for p in sorted(Path(folder).glob("consolidated.*.pth"))]
    state = {}
    for name in shards[0]:
        parts = [s[name].to(torch.float64) for s in shards]
        if name.endswith(_SPLIT_ROWS):
            state[name] = torch.cat(parts, dim=0)
        elif name.endswith(_SPLIT_COLS):
            state[name] = torch.cat(parts, dim=1)
        else:
            state[name] = parts[0]
    return params, state


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_complex(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: (seq, heads, head_dim) real; pairs (x[2i], x[2i+1]) are one complex number each,
    multiplied by e^{i p w_i} with w_i = theta^(-2i/head_dim) at position p."""
    seq, _, head_dim = x.shape
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), freqs)  # (seq, head_dim/2)
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None, :]
    pairs = torch.view_as_complex(x.reshape(seq, x.shape[1], head_dim // 2, 2).contiguous())
    return torch.view_as_real(pairs * rotation).reshape(x.shape)


def meta_logits(params: dict, state: dict[str, torch.Tensor], tokens: list[int]) -> np.ndarray:
    """Logits (seq, vocab) in float64 of Meta's Llama 2 on raw Meta tensors, no cache."""
    n_heads = params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    eps, theta = params["norm_eps"], params.get("rope_theta", 10000.0)
    head_dim = params["dim"] // n_heads
    seq = len(tokens)
    h = state["tok_embeddings.weight"][torch.tensor(tokens)]
    causal = torch.full((seq, seq), float("-inf"), dtype=torch.float64).triu(1)
    layer = 0
    while f"layers.{layer}.attention.wq.weight" in state:
        w = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"layers.{layer}.")}
        x = _rms_norm(h, w["attention_norm.weight"], eps)
        q = _rotate_complex((x @ w["attention.wq.weight"].T).view(seq, n_heads, head_dim), theta)
        k = _rotate_complex((x @ w["attention.wk.weight"].T).view(seq, n_kv_heads, head_dim),
                            theta)
        v = (x @ w["attention.wv.weight"].T).view(seq, n_kv_heads, head_dim)
        # each key/value head serves n_heads / n_kv_heads consecutive query heads
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=1).transpose(0, 1)
        v = v.repeat_interleave(n_heads // n_kv_heads, dim=1).transpose(0, 1)
        scores = q.transpose(0, 1) @ k.transpose(1, 2) / math.sqrt(head_dim) + causal
        out = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(seq, -1)
        h = h + out @ w["attention.wo.weight"].T
        x = _rms_norm(h, w["ffn_norm.weight"], eps)
        gate = x @ w["feed_forward.w1.weight"].T
        h = h + (gate * torch.sigmoid(gate) * (x @ w["feed_forward.w3.weight"].T)) \
            @ w["feed_forward.w2.weight"].T
        layer += 1
    return (_rms_norm(h, state["norm.weight"], eps) @ state["output.weight"].T).numpy()


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Meta wq/wk for the half-split (rotate_half) convention: within a
    head, half-split feature j < d/2 is Meta's feature 2j, and j >= d/2 is 2(j - d/2) + 1."""
    head_dim = w.shape[0] // n_heads
    half = head_dim // 2
    order = [head * head_dim + 2 * (j % half) + j // half
             for head in range(n_heads) for j in range(head_dim)]
    return w[order]


_HF_FROM_META = {
    "tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight", "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def hf_name(canonical: str) -> str:
    """Hugging Face's name of a canonical (Meta-named) tensor."""
    if canonical.startswith("layers."):
        _, i, rest = canonical.split(".", 2)
        return f"model.layers.{i}.{_HF_FROM_META[rest]}"
    return _HF_FROM_META[canonical]


def _llama(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int,
           eps: float, theta: float, state: dict[str, torch.Tensor]):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         vocab_size=vocab, rms_norm_eps=eps, rope_theta=theta,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         attn_implementation="eager")
    model = LlamaForCausalLM(config).to(torch.float64)
    model.load_state_dict({k: v.to(torch.float64) for k, v in state.items()}, strict=True)
    return model.eval()


def transformers_from_hf(folder: Path):
    """LlamaForCausalLM (float64) from a Hugging Face folder's config.json and safetensors."""
    from safetensors.torch import load_file

    raw = json.loads((Path(folder) / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    heads = raw["num_attention_heads"]
    return _llama(raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"], heads,
                  raw.get("num_key_value_heads", heads), raw["vocab_size"], raw["rms_norm_eps"],
                  raw.get("rope_theta", 10000.0), state)


def transformers_from_meta(folder: Path):
    """LlamaForCausalLM (float64) from raw Meta tensors, wq/wk rows reordered here."""
    params, raw = load_meta(folder)
    heads = params["n_heads"]
    kv_heads = params.get("n_kv_heads") or heads
    state = {}
    for name, tensor in raw.items():
        if name.endswith("attention.wq.weight"):
            tensor = interleaved_to_half_split(tensor, heads)
        elif name.endswith("attention.wk.weight"):
            tensor = interleaved_to_half_split(tensor, kv_heads)
        state[hf_name(name)] = tensor
    vocab, dim = raw["tok_embeddings.weight"].shape
    return _llama(dim, raw["layers.0.feed_forward.w1.weight"].shape[0],
                  sum(k.endswith("attention.wq.weight") for k in raw), heads, kv_heads, vocab,
                  params["norm_eps"], params.get("rope_theta", 10000.0), state)


@torch.no_grad()
def transformers_logits(model, tokens: list[int]) -> np.ndarray:
    """Logits (seq, vocab) of a transformers model on one sequence."""
    return model(torch.tensor([tokens])).logits[0].double().numpy()
