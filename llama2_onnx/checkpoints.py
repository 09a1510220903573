"""Read Llama 2 checkpoints (Hugging Face or Meta format) as canonical tensors, one at a time.

Canonical tensors carry the reference model's names (Meta's: `layers.0.attention.wq.weight`),
PyTorch Linear layout `(out_features, in_features)`, and the half-split rotary layout of Hugging
Face checkpoints. Each source format has one name table; opening a source checks that every
checkpoint tensor maps to exactly one canonical name, and `read` checks every shape.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from . import safetensors_io
from .config import Config
from .errors import CheckpointError, ConfigError, is_whole_number
from .quantize import Int4Blocks
from .rope import ROPE_TYPES

# The files that name a checkpoint's shapes: Hugging Face's and Meta's.
HF_CONFIG, META_PARAMS = "config.json", "params.json"
HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
# Tensors present in some checkpoints that carry nothing the model needs.
IGNORED = re.compile(r"(rope\.freqs|.*rotary_emb\.inv_freq)$")

# Meta's model-parallel shards: the axis each tensor was split along (None: replicated).
META_SHARD_AXIS = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
}

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")


def canonical_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name with its expected shape."""
    d, h, kv = config.dim, config.hidden_dim, config.kv_dim
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (config.vocab_size, d),
        "norm.weight": (d,),
        "output.weight": (config.vocab_size, d),
    }
    per_layer = {
        "attention_norm.weight": (d,),
        "attention.wq.weight": (config.n_heads * config.head_dim, d),
        "attention.wk.weight": (kv, d),
        "attention.wv.weight": (kv, d),
        "attention.wo.weight": (d, config.n_heads * config.head_dim),
        "ffn_norm.weight": (d,),
        "feed_forward.w1.weight": (h, d),
        "feed_forward.w2.weight": (d, h),
        "feed_forward.w3.weight": (h, d),
    }
    for i in range(config.n_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def meta_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute wq/wk rows from Meta's interleaved rotary pairs to the half-split layout."""
    rows, cols = w.shape
    # (heads, head_dim/2, 2, cols) -> (heads, 2, head_dim/2, cols)
    split = w.reshape(n_heads, rows // n_heads // 2, 2, cols)
    return split.transpose(0, 2, 1, 3).reshape(rows, cols)


class Source(Protocol):
    """A checkpoint that yields canonical float tensors by name."""

    config: Config
    # The weights were quantized already (a GGUF file): int4 keeps what is 4-bit and leaves the
    # output projection float16 where the file kept it above 4 bits (export._variant_config).
    prequantized: bool

    def read(self, name: str) -> np.ndarray: ...

    def where(self, name: str) -> str: ...  # the tensor's own name and file, for messages

    def describe(self) -> dict[str, str]: ...

    # A 4-bit source's own blocks of a matrix (gguf_source: Q4_0, Q4_1), or None.
    def int4_blocks(self, name: str) -> Int4Blocks | None: ...


class _Checked:
    """Shape checks and a record of which canonical tensors were read."""

    config: Config
    available: set[str]
    prequantized = False

    def _check(self, name: str, arr: np.ndarray) -> np.ndarray:
        expected = canonical_shapes(self.config)[name]
        if tuple(arr.shape) != expected:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(arr.shape)} but the config implies {expected}; "
                "the checkpoint and its config do not belong together."
            )
        return arr

    def int4_blocks(self, name: str) -> Int4Blocks | None:
        """Float checkpoints have no 4-bit blocks of their own: int4 quantizes them."""
        return None

    def _check_complete(self) -> None:
        missing = sorted(set(canonical_shapes(self.config)) - self.available)
        extra = sorted(self.available - set(canonical_shapes(self.config)))
        if missing:
            raise CheckpointError(
                f"the checkpoint lacks {len(missing)} tensors (first: {missing[0]}); "
                "is a shard missing or not downloaded?"
            )
        if extra:
            raise CheckpointError(
                f"the checkpoint has tensors the config does not describe (first: {extra[0]}); "
                "check n_layers in its config."
            )


def _require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{what} folder {path} does not exist; pass the folder that "
                              "holds it.")
    return path


class HFSource(_Checked):
    """A Hugging Face folder of the Llama family (LlamaForCausalLM, MistralForCausalLM):
    config.json plus one or more .safetensors files. With tie_word_embeddings and no lm_head,
    the output projection is the embedding table (as transformers ties them).

    `max_seq_len` is the context the variant will have, when it is not max_position_embeddings
    (a sliding window is accepted only where it never slides: hf_config)."""

    def __init__(self, folder: Path, max_seq_len: int | None = None) -> None:
        self.folder = _require_dir(folder, "Hugging Face checkpoint")
        self.config = hf_config(self.folder / HF_CONFIG, max_seq_len)
        self.tied = False
        self.infos: dict[str, safetensors_io.TensorInfo] = {}
        self.keys: dict[str, str] = {}  # canonical name -> the checkpoint's own
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            hint = " (it has PyTorch .bin files: save it with safe_serialization=True)" if list(
                self.folder.glob("*.bin")) else ""
            raise CheckpointError(f"{self.folder} has no .safetensors files{hint}.")
        for file in files:
            for key, info in safetensors_io.read_header(file).items():
                self._add(key, info)
        if "output.weight" not in self.infos and self._tie_word_embeddings:
            self.tied = True
            self.infos["output.weight"] = self.infos["tok_embeddings.weight"]
            self.keys["output.weight"] = self.keys["tok_embeddings.weight"]
        self.available = set(self.infos)
        self._check_complete()

    @property
    def _tie_word_embeddings(self) -> bool:
        raw = read_json_object(self.folder / HF_CONFIG)
        return bool(raw.get("tie_word_embeddings", False)) and (
            "tok_embeddings.weight" in self.infos)

    def _add(self, key: str, info: safetensors_io.TensorInfo) -> None:
        if IGNORED.match(key):
            return
        match = _LAYER.match(key)
        if key in HF_NAMES:
            name = HF_NAMES[key]
        elif match and match.group(2) in HF_LAYER_NAMES:
            name = f"layers.{match.group(1)}.{HF_LAYER_NAMES[match.group(2)]}"
        else:
            raise CheckpointError(
                f"{info.path.name} holds tensor {key!r} that a Llama checkpoint does not have; "
                "only LlamaForCausalLM and MistralForCausalLM checkpoints without biases are "
                "supported."
            )
        if name in self.infos:
            raise CheckpointError(f"tensor {key!r} appears in two files of {self.folder}.")
        self.infos[name], self.keys[name] = info, key

    def read(self, name: str) -> np.ndarray:
        return self._check(name, safetensors_io.read_tensor(self.infos[name]))

    def where(self, name: str) -> str:
        return f"{self.keys[name]} in {self.infos[name].path}"

    def describe(self) -> dict[str, str]:
        tied = {"tie_word_embeddings": "true"} if self.tied else {}
        return {"format": "huggingface", "source": self.folder.name, **tied}


# The Hugging Face model types this exporter reads, with their class: the same decoder (RMSNorm,
# rotary, grouped-query attention, SiLU-gated MLP, no biases). Mistral's one difference, a
# sliding attention window, is accepted only where it never slides (hf_config).
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def hf_config(path: Path, max_seq_len: int | None = None) -> Config:
    """Translate a Hugging Face config.json of the Llama family into a Config.

    Args:
        path: the checkpoint's config.json.
        max_seq_len: the context the variant will have (default: max_position_embeddings).
    Raises:
        ConfigError, one sentence naming what and the fix, for another architecture or an
        option the graph does not have (biases, another activation, a head_dim that is not
        hidden_size / num_attention_heads, rope scaling other than linear and llama3, a
        sliding window shorter than the context).
    """
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a Hugging Face checkpoint folder needs "
                              "config.json.")
    raw = read_json_object(path)
    _check_architecture(path, raw)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size", "intermediate_size") if k not in raw]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}; it is not a complete Llama "
                          "config.json: download it again.")
    _check_options(path, raw)
    theta, scaling = hf_rope(path, raw)
    positions = raw.get("max_position_embeddings", 4096)
    _check_sliding_window(path, raw, positions if max_seq_len is None else max_seq_len)
    heads = raw["num_attention_heads"]
    try:
        return Config(dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"], n_heads=heads,
                      n_kv_heads=raw.get("num_key_value_heads", heads),
                      vocab_size=raw["vocab_size"], norm_eps=raw.get("rms_norm_eps", 1e-5),
                      rope_theta=theta, rope_scaling=scaling, max_seq_len=positions,
                      intermediate_size=raw["intermediate_size"])
    except ConfigError as exc:  # a value Config refuses: say which file holds it
        raise ConfigError(f"{path}: {exc}") from None


def _check_architecture(path: Path, raw: dict) -> None:
    kind, arch = raw.get("model_type"), raw.get("architectures") or []
    if kind not in HF_ARCHITECTURES or (arch and arch[0] != HF_ARCHITECTURES[kind]):
        known = ", ".join(f"{k!r} ({v})" for k, v in HF_ARCHITECTURES.items())
        raise ConfigError(f"{path} describes model_type={kind!r} {arch}, which this exporter "
                          f"cannot export; pass a checkpoint of model_type {known}.")


def _check_options(path: Path, raw: dict) -> None:
    """Refuse what the Llama graph does not compute: biases, another activation or head size."""
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise ConfigError(f"{path} sets {key} true, but the Llama family this exporter "
                              "supports has no biases; pass a checkpoint without them.")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{path} uses hidden_act {act!r}, but the Llama family's MLP is "
                          "SiLU-gated and no other is supported; pass a checkpoint with "
                          "hidden_act 'silu'.")
    head_dim, heads, hidden = raw.get("head_dim"), raw["num_attention_heads"], raw["hidden_size"]
    if not (is_whole_number(heads) and is_whole_number(hidden)):
        return  # Config names the bad value
    implied = hidden / heads
    if head_dim is not None and head_dim != implied:
        raise ConfigError(f"{path} sets head_dim={head_dim!r} but hidden_size / "
                          f"num_attention_heads is {implied:g}; this exporter needs them equal, "
                          "so pass a checkpoint whose head_dim is hidden_size / "
                          "num_attention_heads.")


def hf_rope(path: Path, raw: dict) -> tuple[float, dict | None]:
    """rope_theta and Config.rope_scaling from a Hugging Face config: the older layout
    (`rope_theta` beside a `rope_scaling` dict) or transformers 5's (`rope_parameters` holding
    both), read with transformers' priorities (rope_scaling, then rope_parameters; a theta
    inside the dict before the top-level one).

    Raises:
        ConfigError for a rope scaling type other than linear and llama3, or partial rotary.
    """
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path} has rope_scaling {params!r}, which is not an object; fix "
                          "its config.json.")
    params = dict(params)
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    partial = params.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"{path} rotates only part of each head (partial_rotary_factor "
                          f"{partial!r}), which the Llama family does not do; pass a "
                          "checkpoint without it.")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{path} uses rope scaling of type {kind!r}, which this exporter does "
                          f"not support (only {' and '.join(ROPE_TYPES)}); pass a checkpoint "
                          "without it.")
    if kind == "llama3":  # transformers' defaults for the length it was trained at
        params.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
        if "original_max_position_embeddings" in raw:
            params["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
    return theta, params


def _check_sliding_window(path: Path, raw: dict, context: int) -> None:
    """A sliding window at least as long as the context never slides: that model is the
    Llama graph. A shorter one would need a mask this graph does not have."""
    window = raw.get("sliding_window")
    if window is not None and not is_whole_number(window):
        raise ConfigError(f"{path} has sliding_window={window!r}, which must be a positive "
                          "integer or null; fix its config.json.")
    if window is not None and window < context:
        raise ConfigError(f"{path} uses a sliding attention window of {window!r} tokens, "
                          f"shorter than the context of {context}; pass --max-seq-len "
                          f"{window} or less, within which the window never slides.")


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, params.json).

    Raises:
        ConfigError naming the file when it is not valid JSON or not an object.
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); download it again.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(raw).__name__}; download "
                          "it again.")
    return raw


class MetaSource(_Checked):
    """Meta's original format: params.json plus consolidated.NN.pth model-parallel shards.

    Shards are memory-mapped; every page read stays mapped (and counted as resident) until
    the mapping is closed, so the shards are re-opened after every `REMAP_BYTES` read. That
    keeps the exporter's resident memory near one tensor instead of the whole checkpoint.
    """

    REMAP_BYTES = 1 << 28

    def __init__(self, folder: Path, vocab_size: int | None = None) -> None:
        import torch  # only needed to unpickle .pth shards

        self.folder = _require_dir(folder, "Meta checkpoint")
        params_path = self.folder / META_PARAMS
        if not params_path.is_file():
            raise CheckpointError(f"{params_path} is missing; a Meta checkpoint folder needs it.")
        self.paths = sorted(self.folder.glob("consolidated.*.pth"))
        if not self.paths:
            raise CheckpointError(f"{self.folder} has no consolidated.NN.pth files.")
        self._torch, self._shards, self._read_since_map = torch, None, 0
        params = read_json_object(params_path)
        if "tok_embeddings.weight" not in self.shards[0]:
            raise CheckpointError(f"{self.paths[0]} has no tok_embeddings.weight; it is not a "
                                  "complete Llama 2 shard: download it again.")
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
        if missing:
            raise ConfigError(f"{params_path} lacks {', '.join(missing)}; download it again.")
        if "use_scaled_rope" in params:  # Llama 3.1 as Meta ships it: a tiktoken tokenizer
            raise ConfigError(f"{params_path} is Llama 3 in Meta's own format (use_scaled_rope), "
                              "which this exporter does not read; export the Hugging Face "
                              "download of the same model with --hf instead.")
        embed_rows = self.shards[0]["tok_embeddings.weight"].shape[0]
        if params.get("vocab_size", -1) in (-1, None):
            params["vocab_size"] = vocab_size or embed_rows
        params.setdefault("max_seq_len", 4096)
        try:
            self.config = Config.from_dict(params, source=str(params_path))
        except TypeError as exc:
            raise ConfigError(f"{params_path} is not a Llama 2 params.json ({exc}).") from None
        self.available = {k for k in self.shards[0] if not IGNORED.match(k)}
        self._check_complete()

    @property
    def shards(self) -> list[dict]:
        if self._shards is None:
            self._shards = [_load_pth(self._torch, p) for p in self.paths]
        return self._shards

    def read(self, name: str) -> np.ndarray:
        torch = self._torch
        axis = META_SHARD_AXIS[_LAYER.sub(r"\2", name)]
        parts = [shard[name] for shard in self.shards]
        tensor = parts[0] if axis is None or len(parts) == 1 else torch.cat(parts, dim=axis)
        arr = tensor.to(torch.float32, copy=True).numpy()  # a copy: detached from the map
        self._read_since_map += sum(p.nbytes for p in parts)
        if self._read_since_map > self.REMAP_BYTES:
            self._shards, self._read_since_map = None, 0
        if name.endswith("attention.wq.weight"):
            arr = meta_to_half_split(arr, self.config.n_heads)
        elif name.endswith("attention.wk.weight"):
            arr = meta_to_half_split(arr, self.config.n_kv_heads)
        return self._check(name, arr)

    def where(self, name: str) -> str:
        files = self.paths[0] if len(self.paths) == 1 else \
            f"the {len(self.paths)} shards consolidated.*.pth of {self.folder}"
        return f"{name} in {files}"

    def describe(self) -> dict[str, str]:
        return {"format": "meta", "source": self.folder.name, "shards": str(len(self.paths))}


def _load_pth(torch, path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad archive
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint ({exc}).") from None


def open_source(hf: Path | None = None, meta: Path | None = None,
                vocab_size: int | None = None, max_seq_len: int | None = None) -> Source:
    """Open exactly one of a Hugging Face or a Meta checkpoint folder.

    Args:
        vocab_size: a Meta checkpoint's, when its params.json leaves it out (-1).
        max_seq_len: the context the variant will have, when it is given (--max-seq-len).
    """
    if (hf is None) == (meta is None):
        raise CheckpointError("pass exactly one of --hf DIR, --meta DIR or --gguf FILE.")
    return HFSource(hf, max_seq_len) if hf is not None else MetaSource(meta, vocab_size)

