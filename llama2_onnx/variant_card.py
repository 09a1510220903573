"""Generated text files of a variant folder: its README card and its Git LFS attributes."""

from __future__ import annotations

from pathlib import PurePosixPath

from .config import Config
from .variant_folder import (
    CONFIG,
    EMBEDDINGS,
    GRAPH_DIR,
    LFS_PATTERNS,
    MANIFEST,
    README,
    TOKENIZER,
    data_path,
    graph_name,
)

LFS_ATTRS = "filter=lfs diff=lfs merge=lfs -text"  # the attributes of an LFS-tracked pattern


def gitattributes() -> str:
    lines = [f"{p} {LFS_ATTRS}" for p in LFS_PATTERNS]
    return "\n".join(lines) + "\n"


def variant_readme(name: str, config: Config, tokenizer: tuple[str, ...] = (TOKENIZER,)) -> str:
    """The variant's README card; `tokenizer`: the names of its tokenizer's files."""
    templated = tokenizer[0] != TOKENIZER
    kind = ("base (plain text completion)" if not config.chat else
            "chat (the model's own chat template)" if templated else
            "chat (Llama-2-chat prompt format)")
    files = ", ".join(f"`{n}`" for n in tokenizer)
    family = "Llama-family" if templated else "Llama 2"
    gib = config.weight_bytes() / 2**30
    shape = f"{config.n_layers} / {config.dim} / {config.n_heads} / {config.n_kv_heads}"
    precision = config.dtype + (f", blocks of {config.block_size}, float16 scales, float16 "
                                "activations" if config.dtype == "int4" else "")
    prov = ", ".join(f"{k}: {v}" for k, v in sorted(config.provenance.items()))
    graph = PurePosixPath(GRAPH_DIR, graph_name(name))
    rotary = f"theta {config.rope_theta:g}" + rope_scaling_text(config.rope_scaling)
    # The link goes one folder up, to the distribution's README (the same file name as a card's).
    return f"""# {name}

{family} variant for [llama2_onnx](../{README}): ONNX graph with external weights, embedding
table, tokenizer and config, produced by `tools/export_and_publish.py`.

| | |
|---|---|
| kind | {kind} |
| precision | {precision} |
| parameters | {config.n_params() / 1e6:.1f} M ({gib:.2f} GiB of weights) |
| layers / dim / heads / kv heads | {shape} |
| vocabulary | {config.vocab_size} |
| context | {config.max_seq_len} tokens |
| rotary positions | {rotary} |
| graph contract | {config.contract_version} |
| provenance | {prov} |

Files: `{graph}` (graph), `{data_path(graph)}` (weights),
`{EMBEDDINGS}` (token embeddings), {files}, `{CONFIG}`,
`{MANIFEST}` (size and sha256 of every file; check with
`python tools/export_and_publish.py verify {name}`).

A variant keeps the license of the weights it was made from (Llama 2's: Meta's Llama 2
Community License).
"""


def rope_scaling_text(scaling: dict | None) -> str:
    """", llama3 scaling x8 from 8192 positions" and the like ("" without scaling)."""
    if not scaling:
        return ""
    text = f", {scaling['rope_type']} scaling x{scaling['factor']:g}"
    original = scaling.get("original_max_position_embeddings")
    return text + (f" from {original} positions" if original else "")
