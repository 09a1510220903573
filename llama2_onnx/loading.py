"""Open a variant folder into an Engine after checking its files (LFS pointers, sizes, vocab)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import safetensors_io, webgpu
from .config import NP_DTYPES, Config
from .errors import UserError, VariantError
from .files import check_files as manifest_problems
from .files import check_not_lfs_pointer
from .graph_forms import EXPORTED, PACKED_FLOAT32, form_for
from .layout import (
    ABSENT,
    CACHE_DIR,
    CONFIG,
    EMBEDDINGS,
    EMPTY,
    GRAPH_DIR,
    LEGACY,
    TOKENIZER,
    UNKNOWN,
    data_path,
    folder_format,
    graphs,
    legacy_files,
    pull_command,
)
from .resources import GiB, free_cuda_memory, free_host_memory, require
from .session import EngineParts, Runtime, create_session, resolve_provider
from .tokenizer import Tokenizer, check_vocab


def check_folder(path: Path) -> None:
    """Raise a VariantError naming the fix when `path` cannot hold a usable variant."""
    kind = folder_format(path)
    if kind == ABSENT:
        raise VariantError(f"variant folder {path} does not exist; list the variants with "
                           "`python MinimumExample/Example_ONNX_LlamaV2.py --list`.")
    if kind == EMPTY:
        raise VariantError(f"{path} is empty: its submodule is not initialised; run "
                           f"`{pull_command(path.name)}` from the repository root.")


def load_variant(path: Path, provider: str = "auto", max_seq_len: int | None = None,
                 check_files: bool = True, verify: bool = False,
                 graph_capture: bool | str = "auto",
                 prefill_chunk: int | str | None = "auto", profile: str | None = None
                 ) -> EngineParts:
    """Open a variant folder (our format or the original one); see Engine.from_variant."""
    check_folder(path)
    kind = folder_format(path)
    if kind == UNKNOWN:
        raise VariantError(f"{path} holds neither config.json nor an original Llama-2-Onnx "
                           "graph (ONNX/*.onnx with embeddings.pth); is it a variant folder?")
    if kind == LEGACY:
        from .legacy import load_legacy

        return load_legacy(*legacy_files(path), provider=provider, max_seq_len=max_seq_len)
    check_not_lfs_pointer(path / CONFIG)
    if check_files or verify:
        problems = manifest_problems(path, sha256=verify)
        if problems:
            raise VariantError(problems[0])
    config = Config.load(path / CONFIG)
    return open_files(find_graph(path), path / EMBEDDINGS, path / TOKENIZER, config,
                      provider=provider, max_seq_len=max_seq_len, graph_capture=graph_capture,
                      name=path.name, prefill_chunk=prefill_chunk, profile=profile)


def find_graph(path: Path) -> Path:
    """The one ONNX/*.onnx graph of a variant folder."""
    found = graphs(path)
    if len(found) != 1:
        what = "no .onnx graph" if not found else f"{len(found)} graphs"
        raise VariantError(f"{path / GRAPH_DIR} holds {what} but a variant has exactly one; "
                           "re-export or fetch the variant again.")
    return found[0]


# Longest prefill chunk per provider (see Runtime.run): on CUDA every new input length costs
# 0.1-0.9 s the first time ONNX Runtime sees it, so prompts run in power-of-two chunks that
# are all seen once at load. DirectML cannot continue a prefill (one token at a time after the
# first run) and the CPU has no such first-time cost: both run the whole prompt at once.
DEFAULT_PREFILL_CHUNK = {"cuda": 1024}


def default_graph_capture(provider: str, config: Config) -> bool:
    """CUDA replays the decode step as a captured CUDA graph (float16 and int4 variants;
    float32 ones never run on CUDA, see provider_for). Shown token-identical over a
    4,608-token chat with sampling, regenerate, removed turns and clipping
    (tools/graph_capture_check.py); DirectML's capture is not yet shown equal, so it stays
    opt-in there."""
    return provider == "cuda"


def load_embeddings(path: Path, config: Config) -> np.ndarray:
    if not path.is_file():
        raise VariantError(f"embeddings file {path} does not exist; pass --embedding_file or "
                           "fetch the variant again.")
    check_not_lfs_pointer(path)
    infos = safetensors_io.read_header(path)
    if "weight" not in infos:
        raise VariantError(f"{path} has no 'weight' tensor; re-export the variant.")
    # A plain array over the map: slicing a np.memmap costs more per decode step.
    table = np.asarray(safetensors_io.map_tensor(infos["weight"]))
    if table.shape != (config.vocab_size, config.dim):
        raise VariantError(f"{path} has shape {table.shape} but the model needs "
                           f"({config.vocab_size}, {config.dim}); re-export the variant.")
    return table.astype(NP_DTYPES[config.dtype], copy=False)


def provider_for(config: Config, requested: str) -> str:
    """The one rule for where a variant runs. ONNX Runtime's CUDA GroupQueryAttention exists
    for float16 only (OperatorKernels.md), so a float32 graph on CUDA would run attention on
    the CPU; measured on an H100 that split gives wrong logits from the second decode step, so
    float32 variants run on the CPU: `auto` picks it, `--provider cuda` is refused.

    Raises:
        UserError for `--provider cuda` with a float32 variant.
    """
    provider = resolve_provider(requested)
    if provider == "cuda" and config.dtype == "float32":
        if requested == "auto":
            return "cpu"
        raise UserError("float32 variants run on the CPU (ONNX Runtime has no float32 CUDA "
                        "attention kernel); use a float16 or int4 variant with --provider cuda, "
                        "or --provider cpu.")
    return provider


def context_length(config: Config, max_seq_len: int | None) -> int:
    if max_seq_len is None:
        return config.max_seq_len
    if not 1 < max_seq_len <= config.max_seq_len:
        raise UserError(f"--max_seq_len {max_seq_len} must be between 2 and "
                        f"{config.max_seq_len} for this variant.")
    return max_seq_len


def open_files(graph: Path, embeddings: Path, tokenizer_path: Path, config: Config,
               provider: str = "auto", max_seq_len: int | None = None,
               graph_capture: bool | str = "auto", name: str = "",
               prefill_chunk: int | str | None = "auto",
               profile: str | None = None) -> EngineParts:
    """Open explicit files of our graph contract (a variant folder's, or the CLI's
    --onnx_file style)."""
    for p in (graph, data_path(graph)):
        check_not_lfs_pointer(p)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    check_vocab(tokenizer, config, tokenizer_path)
    table = load_embeddings(embeddings, config)
    provider = provider_for(config, provider)
    if graph_capture == "auto":
        graph_capture = default_graph_capture(provider, config)
    cache_len = context_length(config, max_seq_len)
    check_memory(graph, config, provider, cache_len)
    # WebGPU: an adapter without shader-f16 computes float16 and int4 variants in float32.
    float16 = provider != "webgpu" or config.dtype == "float32" or webgpu.has_shader_f16()
    form = form_for(provider, config.dtype, float16)
    session = create_session(graph, provider, cache_len, graph_capture, dtype=config.dtype,
                             form=form, profile=profile)
    check_graph_matches(session, config, graph, form)
    chunk = DEFAULT_PREFILL_CHUNK.get(provider) if prefill_chunk == "auto" else prefill_chunk
    runtime = Runtime(session, config, provider, cache_len, graph_capture, max_chunk=chunk or None)
    if runtime.max_chunk is not None:
        runtime.warm_up()
    notes = old_cache_notes(graph)
    if not float16:
        notes.append(f"this WebGPU adapter has no float16 arithmetic (shader-f16), so this "
                     f"{config.dtype} variant computes in float32 (its KV cache takes twice the "
                     "memory).")
    return EngineParts(runtime, tokenizer, table, config, name or graph.stem, notes)


def old_cache_notes(graph: Path) -> list[str]:
    """Name the optimized copy of the weights that versions before this one kept in
    ONNX/.cache (nothing reads it now; it is the user's to delete)."""
    folder = graph.parent / CACHE_DIR
    size = sum(p.stat().st_size for p in folder.glob("*") if p.is_file()) if folder.is_dir() else 0
    if not size:
        return []
    return [f"{folder} holds {size / GiB:.1f} GiB that earlier versions cached and nothing uses "
            "now; delete that folder to free the space."]


def kv_cache_bytes(config: Config, cache_len: int, provider: str = "cuda") -> int:
    """The KV cache's size; int4 variants keep a float32 one on the CPU (graph_forms)."""
    wide = form_for(provider, config.dtype) == PACKED_FLOAT32
    itemsize = 4 if wide else np.dtype(NP_DTYPES[config.dtype]).itemsize
    return 2 * config.n_layers * config.n_kv_heads * cache_len * config.head_dim * itemsize


def check_memory(graph: Path, config: Config, provider: str, cache_len: int) -> None:
    """Refuse, with the numbers, a run whose weights and KV cache cannot fit.

    Raises:
        UserError when host memory (or a CUDA device's, where it can be read) is too small.
    """
    data = data_path(graph)
    weights = data.stat().st_size if data.exists() else graph.stat().st_size
    kv = kv_cache_bytes(config, cache_len, provider)
    fix = "pass a smaller --max_seq_len" if kv > weights else "use a smaller variant"
    one_layer = kv // (2 * config.n_layers)  # the zeroed host buffer each cache starts from
    kv_on_host = provider == "cpu"
    host = (weights if provider == "cpu" else 0) + (kv if kv_on_host else one_layer)
    require(f"this variant with a {cache_len}-token context (weights "
            f"{weights / GiB:.1f} GiB + KV cache {kv / GiB:.1f} GiB)", host, free_host_memory(),
            "host memory", fix)
    if provider == "cuda":
        require(f"this variant with a {cache_len}-token context", weights + kv,
                free_cuda_memory(), "GPU memory", fix)


def check_graph_matches(session, config: Config, graph: Path, form: str = EXPORTED) -> None:
    """Refuse a config.json that does not describe `graph` (layers, heads, sizes, dtype).

    Raises:
        VariantError naming the first disagreement.
    """
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    layers = sum(1 for name in inputs if name.startswith("past_key."))
    dtype = {"tensor(float)": "float32", "tensor(float16)": "float16"}.get(
        getattr(inputs.get("inputs_embeds"), "type", ""), "?")
    activation = "float32" if form == PACKED_FLOAT32 else np.dtype(NP_DTYPES[config.dtype]).name
    cache = getattr(inputs.get("past_key.0"), "shape", [None] * 4)
    found = {"n_layers": layers, "activation dtype": dtype,
             "dim": getattr(inputs.get("inputs_embeds"), "shape", [None])[-1],
             "n_kv_heads": cache[1], "head_dim": cache[3],
             "vocab_size": getattr(outputs.get("logits"), "shape", [None])[-1]}
    expected = {"n_layers": config.n_layers, "activation dtype": activation, "dim": config.dim,
                "n_kv_heads": config.n_kv_heads, "head_dim": config.head_dim,
                "vocab_size": config.vocab_size}
    for key, value in expected.items():
        if found[key] != value:
            raise VariantError(f"{graph.parent.parent / CONFIG} says {key}={value} but "
                               f"the graph {graph.name} has {found[key]}; the config does not "
                               "belong to this graph: re-export or fetch the variant again.")
    limit = session.get_modelmeta().custom_metadata_map.get("max_seq_len")
    if limit is not None and int(limit) < config.max_seq_len:
        raise VariantError(f"{graph.parent.parent / CONFIG} says max_seq_len="
                           f"{config.max_seq_len} but the graph was built for {limit} tokens; "
                           "re-export the variant with --max-seq-len.")
