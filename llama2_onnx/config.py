"""The one model configuration: written to each variant's config.json, read by everything else."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import ConfigError, is_whole_number
from .files import write_text_atomic
from .rope import ROPE_KEYS, ROPE_TYPES

# Bumped whenever graph input/output names, shapes or meanings change (see DESIGN.md).
CONTRACT_VERSION = 1

DType = Literal["float32", "float16", "int4"]
DTYPES: tuple[str, ...] = ("float32", "float16", "int4")
# The activation (and KV cache, embedding table) dtype of each variant dtype: int4 variants
# hold 4-bit weights for the linear layers and compute in float16 (see graph.py).
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int4": np.float16}
INT4_BLOCK_SIZES = (32, 64, 128)
# int4 variants quantize the output projection (vocab x dim) too: it costs a little perplexity
# on the demo model, and it is a fifth of a small model's weights, which a CPU decodes several
# times faster in int4 than in float16 (the numbers: docs/export.md, "int4 variants").
INT4_QUANTIZES_OUTPUT = True
# What a variant's config.json must state (the rest have Llama 2's defaults).
REQUIRED_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len",
                 "dtype", "contract_version")


@dataclass
class Config:
    """Llama 2 model arguments (Meta's names) plus what a variant needs to run.

    `intermediate_size` is set when a checkpoint states its MLP width directly (Hugging Face
    configs do); otherwise the width follows Meta's rule from `multiple_of` and
    `ffn_dim_multiplier`. `rope_scaling` holds Hugging Face's dict for scaled rotary
    frequencies (Llama 3.1's `{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}`, or `{"rope_type":
    "linear", "factor": 4.0}`); None is plain rotary (rope.py computes both).
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096
    intermediate_size: int | None = None
    dtype: DType = "float16"
    block_size: int | None = None  # int4 only: weights per quantization block
    chat: bool = False
    contract_version: int = CONTRACT_VERSION
    provenance: dict[str, Any] = field(default_factory=dict)
    # int4 only: whether the output projection is 4-bit (None: INT4_QUANTIZES_OUTPUT). A GGUF
    # import keeps it float16 where the file stored it above 4 bits (docs/export.md).
    output_int4: bool | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self._check_types()
        self.rope_scaling = checked_rope_scaling(self.rope_scaling)
        if self.dim % self.n_heads:
            raise ConfigError(
                f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                "fix the checkpoint's config."
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs whole groups."
            )
        # ONNX Runtime's GroupQueryAttention kernels need head_dim to be a multiple of 16.
        if self.head_dim % 16:
            raise ConfigError(
                f"head_dim={self.head_dim} (dim/n_heads) is not a multiple of 16, which ONNX "
                "Runtime's GroupQueryAttention requires; this model cannot be exported."
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}.")
        self._check_block_size()
        if self.contract_version != CONTRACT_VERSION:
            raise ConfigError(
                f"this variant uses graph contract {self.contract_version} but this code reads "
                f"contract {CONTRACT_VERSION}; re-export it with tools/export_and_publish.py."
            )

    def _check_types(self) -> None:
        def whole(v):
            return is_whole_number(v)

        real = is_positive_number
        rules = {name: (whole, "a positive integer") for name in (
            "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len",
            "multiple_of")}
        rules.update({"norm_eps": (real, "a positive number"),
                      "rope_theta": (real, "a positive number"),
                      "ffn_dim_multiplier": (lambda v: v is None or real(v),
                                             "a positive number or null"),
                      "intermediate_size": (lambda v: v is None or whole(v),
                                            "a positive integer or null"),
                      "chat": (lambda v: isinstance(v, bool), "true or false"),
                      "output_int4": (lambda v: v is None or isinstance(v, bool),
                                      "true, false or null"),
                      "contract_version": (whole, "a positive integer"),
                      "provenance": (lambda v: isinstance(v, dict), "an object")})
        for name, (ok, what) in rules.items():
            value = getattr(self, name)
            if not ok(value):
                raise ConfigError(f"config value {name}={value!r} must be {what}.")

    def _check_block_size(self) -> None:
        if self.output_int4 is not None and self.dtype != "int4":
            raise ConfigError("output_int4 only applies to int4 variants.")
        if self.dtype != "int4":
            if self.block_size is not None:
                raise ConfigError(f"block_size={self.block_size} only applies to int4 variants.")
            return
        if self.block_size not in INT4_BLOCK_SIZES:
            raise ConfigError(f"block size {self.block_size!r} is not one of "
                              f"{', '.join(map(str, INT4_BLOCK_SIZES))}; pick one of those.")
        widths = {"dim": self.dim, "intermediate size": self.hidden_dim}
        for name, width in widths.items():
            if width % self.block_size:
                raise ConfigError(f"the model's {name} {width} is not a multiple of the int4 "
                                  f"block size {self.block_size}; use a block size that "
                                  "divides it or export float16.")

    @property
    def quantizes_output(self) -> bool:
        """Whether an int4 variant stores the output projection as 4-bit codes."""
        return INT4_QUANTIZES_OUTPUT if self.output_int4 is None else self.output_int4

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Width of the SiLU-gated MLP (Meta's FeedForward rule unless stated directly)."""
        if self.intermediate_size:
            return self.intermediate_size
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def n_params(self) -> int:
        """Number of weights, embedding table included."""
        attn = self.dim * (self.dim + 2 * self.kv_dim) + self.dim * self.dim
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + self.dim

    def weight_bytes(self) -> int:
        """Bytes of all weights as the variant stores them, embedding table included.

        int4: the blocks' linear layers and the output projection take half a byte per weight
        plus a float16 scale per block; norms and the embedding table stay float16 (graph.py).
        """
        if self.dtype != "int4":
            return self.n_params() * np.dtype(NP_DTYPES[self.dtype]).itemsize
        linear = self.n_layers * (2 * self.dim * self.dim + 2 * self.dim * self.kv_dim
                                  + 3 * self.dim * self.hidden_dim)
        if self.quantizes_output:
            linear += self.vocab_size * self.dim
        per_weight = 0.5 + 2 / self.block_size
        return int(linear * per_weight) + (self.n_params() - linear) * 2

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("block_size", "rope_scaling", "output_int4"):  # unset: config.json stays
            if data[key] is None:  # as it was before these existed
                del data[key]
        return data

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        """Build a Config, failing loudly on keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{source} has unknown keys {unknown}; it was written by a newer exporter or "
                "edited by hand; re-export the variant or remove those keys."
            )
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> Config:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist; is this a variant folder?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); re-export the variant.") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object; re-export the variant.")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ConfigError(f"{path} lacks {', '.join(missing)}; re-export the variant.")
        return cls.from_dict(data, source=str(path))

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def checked_rope_scaling(scaling: Any) -> dict[str, Any] | None:
    """A rope_scaling value as Config keeps it: None, or a dict with "rope_type" (Hugging Face's
    older key "type" is accepted) and exactly the numbers that type needs.

    Raises:
        ConfigError naming the bad value, one sentence each.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"config value rope_scaling={scaling!r} must be an object or null.")
    scaling = dict(scaling)
    kind = scaling.pop("rope_type", None)
    older = scaling.pop("type", None)
    kind = older if kind is None else kind
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope scaling type {kind!r} is not supported (only "
                          f"{' and '.join(map(repr, ROPE_TYPES))} are), so this model cannot be "
                          "exported; use a checkpoint without it.")
    needed = ROPE_KEYS[kind]
    missing = [k for k in needed if k not in scaling]
    unknown = sorted(set(scaling) - set(needed))
    if missing or unknown:
        what = (f"lacks {', '.join(missing)}" if missing
                else f"has keys it does not use ({', '.join(unknown)})")
        raise ConfigError(f"rope_scaling of type {kind!r} {what}; it needs exactly "
                          f"{', '.join(needed)}: fix the checkpoint's config.")
    for key in needed:
        _check_rope_number(kind, key, scaling[key])
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError(f"rope_scaling high_freq_factor={scaling['high_freq_factor']!r} must be "
                          f"greater than low_freq_factor={scaling['low_freq_factor']!r}; fix the "
                          "checkpoint's config.")
    return {"rope_type": kind, **scaling}


def _check_rope_number(kind: str, key: str, value: Any) -> None:
    if key == "original_max_position_embeddings":
        ok, what = is_whole_number(value), "a positive integer"
    else:
        ok = is_positive_number(value)
        what = "a positive number"
    if not ok:
        raise ConfigError(f"rope_scaling {key}={value!r} (type {kind!r}) must be {what}; fix the "
                          "checkpoint's config.")


def is_positive_number(value: Any) -> bool:
    """A finite number above 0 (an int or a float, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf
