"""Open a variant folder into an Engine after checking its files (LFS pointers, sizes, vocab)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import safetensors_io
from .config import NP_DTYPES, Config
from .errors import UserError, VariantError
from .files import check_not_lfs_pointer
from .legacy import load_legacy
from .placement import Placement, RunOptions, place
from .resources import GiB, free_host_memory, require
from .session import EngineParts, FileStamps, Runtime, create_session
from .tokenizer import check_vocab, load_tokenizer
from .variant_folder import (
    CACHE_DIR,
    CONFIG,
    EMBEDDINGS,
    MANIFEST,
    ORIGINAL,
    OURS,
    TOKENIZER,
    check_files,
    data_path,
    find_graph,
    folder_format,
    original_files,
    tokenizer_file,
    variant_format,
)
from .variants import slot_hint


def load_variant(path: Path, options: RunOptions) -> EngineParts:
    """Open a variant folder (our format or the original one); see Engine.from_variant."""
    if variant_format(path) == ORIGINAL:
        if options.verify:
            raise UserError(f"--verify checks a variant's {MANIFEST}, and {path} is in the "
                            "original Llama-2-Onnx format, which has none; drop --verify.")
        graph, embeddings, tokenizer = original_files(path)
        return load_legacy(graph, embeddings, tokenizer, options)
    check_not_lfs_pointer(path / CONFIG)
    if options.check_files or options.verify:
        problems = check_files(path, sha256=options.verify)
        if problems:
            raise VariantError(problems[0])
    config = Config.load(path / CONFIG)
    return open_files(find_graph(path), path / EMBEDDINGS, tokenizer_file(path), config, options,
                      name=path.name)


def open_explicit(graph: Path, embeddings: Path | None, tokenizer: Path | None,
                  options: RunOptions) -> EngineParts:
    """Files named one by one (the original example's --onnx_file, --embedding_file and
    --tokenizer_path): a graph inside one of our variant folders takes that folder's other
    files unless named; an original-format graph needs its embeddings named.

    Raises:
        UserError when the graph does not exist or the original format's embeddings are not
        named.
    """
    if not graph.is_file():
        raise UserError(f"--onnx_file {graph} does not exist{slot_hint(graph)}.")
    if options.verify:
        raise UserError("--verify checks a variant folder's manifest; use it with --variant "
                        "FOLDER instead of --onnx_file.")
    folder = graph.parent.parent
    tokenizer = Path(tokenizer or folder / TOKENIZER)
    if folder_format(folder) == OURS:
        config = Config.load(folder / CONFIG)
        return open_files(graph, Path(embeddings or folder / EMBEDDINGS), tokenizer, config,
                          options)
    if not embeddings:
        raise UserError("--embedding_file is required with an original-format --onnx_file.")
    return load_legacy(graph, Path(embeddings), tokenizer, options)


def load_embeddings(path: Path, config: Config) -> np.ndarray:
    if not path.is_file():
        raise VariantError(f"embeddings file {path} does not exist; pass --embedding_file or "
                           "fetch the variant again.")
    check_not_lfs_pointer(path)
    infos = safetensors_io.read_header(path)
    if "weight" not in infos:
        raise VariantError(f"{path} has no 'weight' tensor; re-export the variant.")
    # Copied into memory, not left mapped: a mapped file truncated under a running process
    # kills it (SIGBUS), and the table is small beside the weights.
    table = np.array(safetensors_io.map_tensor(infos["weight"]))
    if table.shape != (config.vocab_size, config.dim):
        raise VariantError(f"{path} has shape {table.shape} but the model needs "
                           f"({config.vocab_size}, {config.dim}); re-export the variant.")
    return table.astype(NP_DTYPES[config.dtype], copy=False)


def open_files(graph: Path, embeddings: Path, tokenizer_path: Path, config: Config,
               options: RunOptions, name: str = "") -> EngineParts:
    """Open explicit files of our graph contract (a variant folder's, or the CLI's
    --onnx_file style) where and how place() decides."""
    for p in (graph, data_path(graph)):
        check_not_lfs_pointer(p)
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocab(tokenizer, config, tokenizer_path)
    table = load_embeddings(embeddings, config)
    placement = place(config, options)
    check_memory(graph, config, placement)
    session = create_session(graph, placement)
    check_graph_matches(session, config, graph, placement)
    runtime = Runtime(session, config, placement)
    if runtime.max_chunk is not None:
        runtime.warm_up()
    stamps = FileStamps([graph, data_path(graph)]) if placement.on_host else None
    return EngineParts(runtime, tokenizer, table, config, name or graph.stem,
                       [*placement.notes, *old_cache_notes(graph)], stamps)


def old_cache_notes(graph: Path) -> list[str]:
    """Name the optimized copy of the weights that versions before this one kept in
    ONNX/.cache (nothing reads it now; it is the user's to delete)."""
    folder = graph.parent / CACHE_DIR
    size = sum(p.stat().st_size for p in folder.glob("*") if p.is_file()) if folder.is_dir() else 0
    if not size:
        return []
    return [f"{folder} holds {size / GiB:.1f} GiB that earlier versions cached and nothing uses "
            "now; delete that folder to free the space."]


def check_memory(graph: Path, config: Config, placement: Placement) -> None:
    """Refuse, with the numbers, a run whose weights and KV cache cannot fit.

    Raises:
        UserError when host memory (or the device's, where it can be read) is too small.
    """
    data = data_path(graph)
    weights = data.stat().st_size if data.exists() else graph.stat().st_size
    kv = placement.kv_cache_bytes(config)  # every slot's row
    slots = placement.slots
    fix = "use a smaller variant"
    if kv > weights:
        fix = "pass a smaller --max_seq_len" + (" or --parallel" if slots > 1 else "")
    one_layer = kv // (2 * config.n_layers)  # the zeroed host buffer each cache starts from
    host = weights + kv if placement.on_host else one_layer
    context = f"a {placement.cache_len}-token context"
    what = f"this variant with {context}" if slots == 1 else (
        f"this variant with {slots} slots of {context}")
    require(f"{what} (weights {weights / GiB:.1f} GiB + KV cache {kv / GiB:.1f} GiB)", host,
            free_host_memory(), "host memory", fix)
    if not placement.on_host:
        require(what, weights + kv, placement.free_device_memory(), "GPU memory", fix)


def check_graph_matches(session, config: Config, graph: Path, placement: Placement) -> None:
    """Refuse a config.json that does not describe `graph` (layers, heads, sizes, dtype).

    Raises:
        VariantError naming the first disagreement.
    """
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    layers = sum(1 for name in inputs if name.startswith("past_key."))
    dtype = {"tensor(float)": "float32", "tensor(float16)": "float16"}.get(
        getattr(inputs.get("inputs_embeds"), "type", ""), "?")
    cache = getattr(inputs.get("past_key.0"), "shape", [None] * 4)
    found = {"n_layers": layers, "activation dtype": dtype,
             "dim": getattr(inputs.get("inputs_embeds"), "shape", [None])[-1],
             "n_kv_heads": cache[1], "head_dim": cache[3],
             "vocab_size": getattr(outputs.get("logits"), "shape", [None])[-1]}
    expected = {"n_layers": config.n_layers, "activation dtype": placement.activation,
                "dim": config.dim,
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
