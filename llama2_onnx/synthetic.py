"""Seeded random Llama 2 checkpoints in Hugging Face and Meta formats, for tests and benchmarks.

Tensors are generated one at a time from a per-tensor seed, so a checkpoint with Llama-2-7B
shapes can be written with little memory, and the same seed gives the same weights in both
formats (Meta's wq/wk rows are permuted back to its interleaved rotary layout).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from . import safetensors_io
from .checkpoints import HF_CONFIG, HF_LAYER_NAMES, HF_NAMES, META_SHARD_AXIS, canonical_shapes
from .config import Config
from .errors import UserError

HF_FROM_CANONICAL = {v: k for k, v in HF_NAMES.items()}
HF_LAYER_FROM_CANONICAL = {v: k for k, v in HF_LAYER_NAMES.items()}


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype=np.float32) -> np.ndarray:
    """A canonical tensor with magnitudes like a trained model's (unit-scale activations)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    scale = 1.0 if name == "tok_embeddings.weight" else shape[-1] ** -0.5
    return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)


def hf_name(canonical: str) -> str:
    if canonical in HF_FROM_CANONICAL:
        return HF_FROM_CANONICAL[canonical]
    _, i, rest = canonical.split(".", 2)
    return f"model.layers.{i}.{HF_LAYER_FROM_CANONICAL[rest]}"


def hf_config_dict(config: Config, torch_dtype: str = "float16") -> dict:
    """config.json of a Hugging Face LlamaForCausalLM with these shapes."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.dim, "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_seq_len, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": torch_dtype,
    }


HF_INDEX = "model.safetensors.index.json"


def hf_weight_files(shards: int) -> list[str]:
    """The names of a Hugging Face checkpoint's weight files, as transformers saves them."""
    if shards == 1:
        return ["model.safetensors"]
    return [f"model-{s + 1:05d}-of-{shards:05d}.safetensors" for s in range(shards)]


def checkpoint_files(fmt: str, shards: int) -> list[str]:
    """Every file write_hf ("hf") or write_meta ("meta") writes for `shards` weight files."""
    if fmt == "hf":
        return [HF_CONFIG, *hf_weight_files(shards), *([HF_INDEX] if shards > 1 else [])]
    return ["params.json", *(f"consolidated.{s:02d}.pth" for s in range(shards))]


def check_shards(config: Config, fmt: str, shards: int) -> None:
    """Refuse a number of weight files that this model cannot be written in.

    Raises:
        UserError: fewer than 1; for "hf" more than the model's tensors (a file would be
            empty); for "meta" one that does not divide every tensor's model-parallel axis.
    """
    shapes = canonical_shapes(config)
    if not isinstance(shards, int) or shards < 1:
        raise UserError(f"--shards {shards} must be at least 1 (the number of weight files).")
    if fmt == "hf" and shards > len(shapes):
        raise UserError(f"--shards {shards} is more than the model's {len(shapes)} tensors, so "
                        f"a file would be empty; use at most {len(shapes)}.")
    axes = {name: META_SHARD_AXIS[name.split(".", 2)[-1] if name.startswith("layers.") else name]
            for name in shapes}
    uneven = [n for n, axis in axes.items() if axis is not None and shapes[n][axis] % shards]
    if fmt == "meta" and uneven:
        raise UserError(f"--shards {shards} does not divide {uneven[0]} {shapes[uneven[0]]} "
                        "along the axis Meta splits it on; use a number that divides the "
                        "model's sizes, such as 1 or 2.")


def write_hf(folder: Path, config: Config, seed: int = 0, dtype=np.float32,
             shards: int = 1) -> Path:
    """Write config.json and `shards` .safetensors files with random weights.

    Raises:
        UserError for a number of shards the model cannot be split into (check_shards).
    """
    check_shards(config, "hf", shards)
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = np.dtype(dtype).name
    (folder / HF_CONFIG).write_text(json.dumps(hf_config_dict(config, torch_dtype),
                                                   indent=2))
    shapes = list(canonical_shapes(config).items())
    weight_map, total = {}, 0
    for s, name in enumerate(hf_weight_files(shards)):
        part = shapes[s * len(shapes) // shards:(s + 1) * len(shapes) // shards]  # none empty
        specs = [(hf_name(n), np.dtype(dtype), shape) for n, shape in part]
        lookup = {hf_name(n): (n, shape) for n, shape in part}
        safetensors_io.write_streaming(
            folder / name, specs,
            lambda key, lookup=lookup: random_tensor(*lookup[key], seed=seed, dtype=dtype),
            metadata={"format": "pt"})
        weight_map.update({key: name for key, _, _ in specs})
        total += sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for _, _, shape in specs)
    if shards > 1:  # what transformers (and tools built on it) use to find sharded tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / HF_INDEX).write_text(json.dumps(index, indent=2))
    return folder


def half_split_to_meta(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of checkpoints.meta_to_half_split."""
    rows, cols = w.shape
    # (heads, 2, head_dim/2, cols) -> (heads, head_dim/2, 2, cols)
    split = w.reshape(n_heads, 2, rows // n_heads // 2, cols)
    return split.transpose(0, 2, 1, 3).reshape(rows, cols)


def write_meta(folder: Path, config: Config, seed: int = 0, shards: int = 1,
               bfloat16: bool = False) -> Path:
    """Write params.json and consolidated.NN.pth shards (bfloat16, as Meta ships, on request).

    Raises:
        UserError for a number of shards the model cannot be split into (check_shards).
    """
    import torch

    check_shards(config, "meta", shards)
    folder.mkdir(parents=True, exist_ok=True)
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "n_kv_heads": config.n_kv_heads, "multiple_of": config.multiple_of,
              "ffn_dim_multiplier": config.ffn_dim_multiplier, "norm_eps": config.norm_eps,
              "rope_theta": config.rope_theta, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    dtype = torch.bfloat16 if bfloat16 else torch.float32
    state: list[dict] = [{} for _ in range(shards)]
    for name, shape in canonical_shapes(config).items():
        w = random_tensor(name, shape, seed)
        if name.endswith("attention.wq.weight"):
            w = half_split_to_meta(w, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = half_split_to_meta(w, config.n_kv_heads)
        axis = META_SHARD_AXIS[name.split(".", 2)[-1] if name.startswith("layers.") else name]
        parts = [w] * shards if axis is None else np.split(w, shards, axis=axis)
        for s, part in enumerate(parts):
            state[s][name] = torch.from_numpy(np.ascontiguousarray(part)).to(dtype)
    for s in range(shards):
        torch.save(state[s], folder / f"consolidated.{s:02d}.pth")
    return folder


def write_tokenizer(path: Path, vocab_size: int = 32000) -> Path:
    """A SentencePiece unigram model of exactly `vocab_size` pieces (Llama 2's special ids and
    byte fallback, then letter strings), for random checkpoints that need a matching vocabulary.
    It tokenizes any text; the words it makes are not meant to be meaningful."""
    from itertools import product
    from string import ascii_lowercase

    from sentencepiece import sentencepiece_model_pb2 as pb

    piece_type = pb.ModelProto.SentencePiece
    model = pb.ModelProto()
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.UNIGRAM, vocab_size, True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    pieces = [("<unk>", piece_type.UNKNOWN), ("<s>", piece_type.CONTROL),
              ("</s>", piece_type.CONTROL)]
    pieces += [(f"<0x{b:02X}>", piece_type.BYTE) for b in range(256)]
    for length in range(1, 5):
        for letters in product(ascii_lowercase, repeat=length):
            word = "".join(letters)
            pieces += [("\u2581" + word, piece_type.NORMAL), (word, piece_type.NORMAL)]
            if len(pieces) >= vocab_size:
                break
        if len(pieces) >= vocab_size:
            break
    for text, kind in pieces[:vocab_size]:
        piece = model.pieces.add()
        piece.piece, piece.type = text, kind
        piece.score = -float(len(text)) if kind == piece_type.NORMAL else 0.0
    path.write_bytes(model.SerializeToString())
    return path
