"""Read a GGUF file (llama.cpp's format) as canonical tensors, one de-quantized tensor at a time.

GGUF keeps each tensor's blocks as llama.cpp stores them: `gguf` (llama.cpp's own Python
reader, the `export` extra) maps the file into memory and de-quantizes one tensor on request,
so an export holds about one tensor in memory (plus the mapped pages it has read).

Two things differ from a Hugging Face checkpoint:
- Row order of wq and wk: llama.cpp's converter permutes Hugging Face's half-split rotary rows
  into Meta's interleaved pairs (each head's rows 0, d/2, 1, d/2+1, ...), so they are read back
  with `checkpoints.meta_to_half_split`, per head of q (n_heads) and of k (n_kv_heads).
- 4-bit blocks: Q4_0 (blocks of 32, one float16 scale d: w = d * (q - 8)) and Q4_1 (a scale d
  and a minimum m: w = d * q + m) are offered whole (`int4_blocks`), so an int4 export keeps
  their codes instead of rounding a second time: Q4_1's minimum becomes a per-block offset
  (quantize.Int4Blocks).

The tokenizer and chat template come from the file's metadata, written as the Hugging Face
files a checkpoint folder has (`tokenizer_files`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoints import _Checked, meta_to_half_split
from .config import Config
from .errors import CheckpointError, ConfigError
from .quantize import Int4Blocks

GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
}
# The block types read (gguf.GGMLQuantizationType names); the 4-bit ones whose codes int4 keeps.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
KEPT_4BIT = ("Q4_0", "Q4_1")
GGUF_BLOCK = 32  # values per Q4_0 / Q4_1 block
# tokenizer.ggml.pre: how text is split before byte-level BPE merges (llama.cpp's pre-tokenizer
# types). "digits": every digit alone, then GPT-2's split (SmolLM2's and StarCoder's own
# tokenizer.json); "gpt2": GPT-2's split; "llama3": Llama 3's split.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"smollm": "digits", "starcoder": "digits", "refact": "digits",
                  "gpt-2": "gpt2", "default": "gpt2",
                  "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3"}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading a GGUF file needs the package gguf: pip install "
                              "'llama2-onnx[export]' (or pip install gguf).") from None
    return gguf


class GGUFSource(_Checked):
    """A GGUF file of llama.cpp's `llama` architecture, read as canonical float tensors."""

    prequantized = True

    def __init__(self, path: Path, max_seq_len: int | None = None) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise CheckpointError(f"--gguf {self.path} is a folder; pass the .gguf file in it.")
        if not self.path.is_file():
            raise CheckpointError(f"--gguf {self.path} does not exist; pass the .gguf file.")
        gguf = _gguf()
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        # gguf raises these for an unknown block type, a bad magic and a header cut short.
        except (ValueError, IndexError, KeyError, OverflowError) as exc:
            raise CheckpointError(_open_error(self.path, exc)) from None
        self.fields = {name: field.contents() for name, field in self.reader.fields.items()
                       if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                       "tokenizer.ggml.token_type")}
        self.config = gguf_config(self.fields, str(self.path))
        self.tensors: dict[str, object] = {}
        self.keys: dict[str, str] = {}  # canonical name -> the file's own
        size = self.path.stat().st_size
        for tensor in self.reader.tensors:
            if tensor.name == ROPE_FREQS:
                self.config = self.config.replace(rope_scaling=llama3_scaling(
                    np.asarray(tensor.data, np.float64), self.config, str(self.path)))
                continue
            self._add(tensor, size)
        self.tied = "output.weight" not in self.tensors and "tok_embeddings.weight" in self.tensors
        if self.tied:  # the output projection is the embedding table (SmolLM2, Llama 3.2 1B)
            self.tensors["output.weight"] = self.tensors["tok_embeddings.weight"]
            self.keys["output.weight"] = self.keys["tok_embeddings.weight"]
        self.available = set(self.tensors)
        self._check_complete()

    def _add(self, tensor, file_size: int) -> None:
        key, kind = tensor.name, tensor.tensor_type.name
        parts = key.split(".", 2)
        if key in GGUF_NAMES:
            name = GGUF_NAMES[key]
        elif len(parts) == 3 and parts[0] == "blk" and parts[2] in GGUF_LAYER_NAMES:
            name = f"layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}"
        else:
            raise CheckpointError(f"{self.path} holds tensor {key!r} that a Llama model does not "
                                  "have; only llama.cpp's `llama` architecture is supported.")
        if kind not in SUPPORTED_TYPES:
            raise CheckpointError(f"tensor {key} in {self.path} is stored as {kind}, which this "
                                  f"exporter does not read (it reads {', '.join(SUPPORTED_TYPES)});"
                                  " re-quantize the file with llama.cpp to one of those types.")
        if int(tensor.data_offset) + int(tensor.n_bytes) > file_size:
            raise CheckpointError(_truncated(self.path))
        self.tensors[name], self.keys[name] = tensor, key

    def read(self, name: str) -> np.ndarray:
        gguf = _gguf()
        tensor = self.tensors[name]
        rows, cols = (int(d) for d in reversed(tensor.shape)) if len(tensor.shape) == 2 else (
            None, int(tensor.shape[0]))
        arr = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        arr = np.asarray(arr, np.float32).reshape((cols,) if rows is None else (rows, cols))
        if not arr.flags.writeable:  # F32 tensors are views of the read-only mapped file
            arr = arr.copy()
        return self._check(name, self._unpermute(name, arr))

    def _unpermute(self, name: str, arr: np.ndarray) -> np.ndarray:
        if name.endswith("attention.wq.weight"):
            return meta_to_half_split(arr, self.config.n_heads)
        if name.endswith("attention.wk.weight"):
            return meta_to_half_split(arr, self.config.n_kv_heads)
        return arr

    def int4_blocks(self, name: str) -> Int4Blocks | None:
        """The tensor's own 4-bit codes, in MatMulNBits' terms (blocks of 32 along K), when it
        is stored as Q4_0 or Q4_1; None otherwise.

        Q4_0: w = d * (q - 8), MatMulNBits' own form. Q4_1: w = d * q + m = d * (q - 8) + o
        with the offset o = m + 8 d (quantize.Int4Blocks), rounded to float16 like m itself;
        a tensor whose offsets pass float16's range is de-quantized instead.
        """
        tensor = self.tensors[name]
        kind = tensor.tensor_type.name
        if kind not in KEPT_4BIT or len(tensor.shape) != 2:
            return None
        n, k = (int(d) for d in reversed(tensor.shape))
        raw = np.asarray(tensor.data, np.uint8).reshape(n, k // GGUF_BLOCK, -1)
        head = 2 if kind == "Q4_0" else 4  # float16 d (and m), then 16 bytes of codes
        d = raw[..., 0:2].copy().view(np.float16)[..., 0]
        qs = raw[..., head:head + GGUF_BLOCK // 2]
        # llama.cpp puts a block's values 0..15 in the low nibbles, 16..31 in the high ones.
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (n, k / 32, 32)
        offsets = None
        if kind == "Q4_1":
            m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            o = m + 8 * d.astype(np.float32)
            if not np.isfinite(o).all() or np.abs(o).max() > np.finfo(np.float16).max:
                return None
            offsets = o.astype(np.float16)
        blocks = Int4Blocks(codes, d, offsets)
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = self.config.n_heads if name.endswith("wq.weight") else self.config.n_kv_heads
            order = meta_to_half_split(np.arange(n)[:, None], heads)[:, 0]
            blocks = blocks.rows(order)  # whole rows move: a row's blocks run along K
        return blocks

    def where(self, name: str) -> str:
        return f"{self.keys[name]} in {self.path}"

    def describe(self) -> dict[str, str]:
        types = sorted({t.tensor_type.name for t in self.reader.tensors})
        return {"format": "gguf", "source": self.path.name, "gguf_types": ",".join(types)}

    def tokenizer_files(self) -> dict[str, str]:
        """The Hugging Face tokenizer files (name -> text) that the metadata describes:
        tokenizer.json, tokenizer_config.json and generation_config.json (variant_folder's
        HF_TOKENIZER, TOKENIZER_CONFIG, GENERATION_CONFIG)."""
        from .variant_folder import GENERATION_CONFIG, HF_TOKENIZER, TOKENIZER_CONFIG

        tokens = self._array("tokenizer.ggml.tokens")
        tokenizer = build_tokenizer(self.fields, tokens, self._array("tokenizer.ggml.merges"),
                                    self._array("tokenizer.ggml.token_type"), str(self.path))
        bos, eos = (self.fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
        config = {"bos_token": None if bos is None else tokens[bos],
                  "eos_token": None if eos is None else tokens[eos],
                  "add_bos_token": bool(self.fields.get("tokenizer.ggml.add_bos_token", False)),
                  "add_eos_token": bool(self.fields.get("tokenizer.ggml.add_eos_token", False)),
                  "tokenizer_class": "PreTrainedTokenizerFast",
                  "model_max_length": self.config.max_seq_len}
        if "tokenizer.chat_template" in self.fields:
            config["chat_template"] = self.fields["tokenizer.chat_template"]
        files = {HF_TOKENIZER: tokenizer.to_str(),
                 TOKENIZER_CONFIG: json.dumps(config, indent=2, ensure_ascii=False) + "\n"}
        if eos is not None:
            generation = {"bos_token_id": bos, "eos_token_id": eos}
            files[GENERATION_CONFIG] = json.dumps(generation, indent=2) + "\n"
        return files

    def _array(self, key: str) -> list | None:
        field = self.reader.fields.get(key)
        return None if field is None else list(field.contents())


def _open_error(path: Path, exc: Exception) -> str:
    text = str(exc)
    if "GGMLQuantizationType" in text or "is not a valid" in text:
        return (f"{path} uses a tensor type this version of gguf does not know ({text}); "
                "re-quantize the file with llama.cpp to Q4_0, Q4_1, Q8_0, F16 or F32.")
    if "magic" in text.lower():
        return f"{path} is not a GGUF file (its first bytes are not GGUF's); pass a .gguf file."
    return _truncated(path)


def _truncated(path: Path) -> str:
    return (f"{path} ends before the data its header describes; the file is truncated: "
            "download it again.")


def gguf_config(fields: dict, source: str) -> Config:
    """Translate a GGUF file's `llama.*` metadata into a Config, refusing other architectures
    and rope scaling the Config cannot take.

    Raises:
        ConfigError naming the key and the fix.
    """
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{source} holds a {arch!r} model; only llama.cpp's `llama` "
                          "architecture (Llama 2/3, TinyLlama, SmolLM2, Mistral) can be exported.")

    def key(name: str, default=None):
        value = fields.get(f"llama.{name}", default)
        if value is None:
            raise ConfigError(f"{source} lacks llama.{name}; it is not a complete GGUF file of "
                              "a Llama model: download it again.")
        return value

    heads, dim = int(key("attention.head_count")), int(key("embedding_length"))
    rope_dims = fields.get("llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != dim // heads:
        raise ConfigError(f"{source} applies rotary to {rope_dims} of each head's {dim // heads} "
                          "dimensions, which Llama models do not do; this file cannot be exported.")
    extra = {}
    scaling = fields.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        extra["rope_scaling"] = _rope_scaling(fields, scaling, source)
    tokens = fields.get("llama.vocab_size")
    if tokens is None:
        raise ConfigError(f"{source} lacks llama.vocab_size; download the file again.")
    return Config(dim=dim, n_layers=int(key("block_count")), n_heads=heads,
                  n_kv_heads=int(key("attention.head_count_kv", heads)),
                  vocab_size=int(tokens),
                  norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
                  rope_theta=float(key("rope.freq_base", 10000.0)),
                  max_seq_len=int(key("context_length", 4096)),
                  intermediate_size=int(key("feed_forward_length")), **extra)


ROPE_FREQS = "rope_freqs.weight"
# llama.cpp writes Llama 3.1-style scaling as per-pair factors (rope_freqs.weight: each pair's
# angle is divided by its factor) without the parameters they came from; these are the
# parameters Meta's models use (3.1: factor 8; 3.2 and 3.3: 32 or 8), recognised by the factors.
LLAMA3_CANDIDATES = tuple(
    {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192} for factor in (8.0, 32.0, 16.0, 4.0, 2.0))


def llama3_scaling(factors: np.ndarray, config: Config, source: str) -> dict:
    """The rope_scaling (llama3) whose per-pair factors equal a file's rope_freqs.weight.

    Raises:
        ConfigError when no known parameters give those factors.
    """
    from .rope import inverse_frequencies

    plain = inverse_frequencies(config.head_dim, config.rope_theta)
    if factors.shape == plain.shape:
        for scaling in LLAMA3_CANDIDATES:
            theirs = plain / inverse_frequencies(config.head_dim, config.rope_theta, scaling)
            if np.allclose(factors, theirs, rtol=1e-4):
                return dict(scaling)
    raise ConfigError(f"{source} holds rope scaling factors ({ROPE_FREQS}) that match no known "
                      "Llama 3 scaling; export the model's Hugging Face folder with --hf instead.")


def _rope_scaling(fields: dict, kind: str, source: str) -> dict:
    """A Hugging Face rope_scaling dict for linear scaling, when the Config takes one."""
    import dataclasses

    factor = fields.get("llama.rope.scaling.factor")
    takes = "rope_scaling" in {f.name for f in dataclasses.fields(Config)}
    if kind != "linear" or factor is None or not takes:
        raise ConfigError(f"{source} uses rope scaling {kind!r}, which this exporter does not "
                          "support from a GGUF file; export the Hugging Face folder with --hf.")
    return {"rope_type": "linear", "factor": float(factor)}


def build_tokenizer(fields: dict, tokens: list | None, merges: list | None,
                    token_types: list | None, source: str):
    """A Hugging Face `tokenizers.Tokenizer` for a byte-level BPE vocabulary (GGUF's `gpt2`).

    Raises:
        CheckpointError for a SentencePiece-style (`llama`) or other vocabulary, or a
        pre-tokenizer whose text split is not known here.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2" or not tokens or merges is None:
        raise CheckpointError(f"{source} has a {model!r} tokenizer; only byte-level BPE ('gpt2': "
                              "SmolLM2, Llama 3) is read from a GGUF file: export the Hugging "
                              "Face folder with --hf instead.")
    pre = fields.get("tokenizer.ggml.pre", "default")
    split = PRE_TOKENIZERS.get(pre)
    if split is None:
        raise CheckpointError(f"{source} splits text the {pre!r} way (tokenizer.ggml.pre), "
                              "which this exporter does not know; export the Hugging Face folder "
                              "with --hf instead.")
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split != "llama3")
    tokenizer.pre_tokenizer = {
        "gpt2": byte_level,
        "digits": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           byte_level]),
        "llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                           byte_level]),
    }[split]
    tokenizer.decoder = decoders.ByteLevel()
    kinds = dict(enumerate(token_types or []))  # a file may state no token types
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for i, t in enumerate(tokens) if kinds.get(i) == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for i, t in enumerate(tokens) if kinds.get(i) == USER_DEFINED])
    return tokenizer
