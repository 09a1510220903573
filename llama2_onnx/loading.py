"""Open a variant folder into an Engine after checking its files (LFS pointers, sizes, vocab)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import safetensors_io
from .config import NP_DTYPES, Config
from .errors import UserError, VariantError
from .files import check_files as manifest_problems
from .files import check_not_lfs_pointer
from .session import Runtime, create_session, resolve_provider
from .tokenizer import Tokenizer


def check_folder(path: Path) -> None:
    """Raise a VariantError naming the fix when `path` cannot hold a usable variant."""
    if not path.exists():
        raise VariantError(f"variant folder {path} does not exist; list the variants with "
                           "`python MinimumExample/Example_ONNX_LlamaV2.py --list`.")
    if path.is_dir() and not any(p.name != ".git" for p in path.iterdir()):
        name = path.name
        raise VariantError(f"{path} is empty: its submodule is not initialised; run `git "
                           f"submodule init {name} && git submodule update && git lfs pull` "
                           f"(in {name}) from the repository root.")


def load_engine(engine_cls, path: Path, provider: str = "auto", max_seq_len: int | None = None,
                check_files: bool = True, verify: bool = False, graph_capture: bool = False,
                graph_cache: bool = True):
    """Build an Engine from a variant folder; see Engine.from_variant."""
    check_folder(path)
    if not (path / "config.json").exists():
        from .legacy import find_legacy_files, load_legacy_engine

        files = find_legacy_files(path)
        if files is None:
            raise VariantError(f"{path} holds neither config.json nor an original Llama-2-Onnx "
                               "graph (ONNX/*.onnx with embeddings.pth); is it a variant folder?")
        return load_legacy_engine(engine_cls, *files, provider=provider, max_seq_len=max_seq_len)
    check_not_lfs_pointer(path / "config.json")
    if check_files or verify:
        problems = manifest_problems(path, sha256=verify)
        if problems:
            raise VariantError(problems[0])
    config = Config.load(path / "config.json")
    graph = next((path / "ONNX").glob("*.onnx"), None)
    if graph is None:
        raise VariantError(f"{path / 'ONNX'} has no .onnx graph; re-export or fetch the variant.")
    return open_engine(engine_cls, graph, path / "embeddings.safetensors",
                       path / "tokenizer.model", config, provider=provider,
                       max_seq_len=max_seq_len, graph_capture=graph_capture,
                       graph_cache=graph_cache, name=path.name)


def load_embeddings(path: Path, config: Config) -> np.ndarray:
    if not path.is_file():
        raise VariantError(f"embeddings file {path} does not exist; pass --embedding_file or "
                           "fetch the variant again.")
    check_not_lfs_pointer(path)
    infos = safetensors_io.read_header(path)
    if "weight" not in infos:
        raise VariantError(f"{path} has no 'weight' tensor; re-export the variant.")
    table = safetensors_io.read_tensor(infos["weight"])
    if table.shape != (config.vocab_size, config.dim):
        raise VariantError(f"{path} has shape {table.shape} but the model needs "
                           f"({config.vocab_size}, {config.dim}); re-export the variant.")
    return table.astype(NP_DTYPES[config.dtype], copy=False)


def provider_for(config: Config, requested: str) -> str:
    """The provider to run `config` on. ONNX Runtime's CUDA GroupQueryAttention exists for
    float16 only (OperatorKernels.md): on CUDA a float32 graph runs attention on the CPU and
    keeps the cache in host memory (see Runtime). `auto` therefore keeps float32 variants on
    the CPU; `--provider cuda` still runs them, matrix products on the GPU."""
    provider = resolve_provider(requested)
    if provider == "cuda" and config.dtype == "float32" and requested == "auto":
        return "cpu"
    return provider


def context_length(config: Config, max_seq_len: int | None) -> int:
    if max_seq_len is None:
        return config.max_seq_len
    if not 1 < max_seq_len <= config.max_seq_len:
        raise UserError(f"--max_seq_len {max_seq_len} must be between 2 and "
                        f"{config.max_seq_len} for this variant.")
    return max_seq_len


def open_engine(engine_cls, graph: Path, embeddings: Path, tokenizer_path: Path, config: Config,
                provider: str = "auto", max_seq_len: int | None = None,
                graph_capture: bool = False, graph_cache: bool = True, name: str = ""):
    """Open explicit files of our graph contract (the CLI's --onnx_file style)."""
    from .generation import check_vocab

    for p in (graph, Path(str(graph) + ".data")):
        check_not_lfs_pointer(p)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    check_vocab(tokenizer, config, tokenizer_path)
    table = load_embeddings(embeddings, config)
    provider = provider_for(config, provider)
    if graph_capture and provider == "cuda" and config.dtype == "float32":
        raise UserError("--graph_capture needs every node on the GPU, but float32 attention runs "
                        "on the CPU under CUDA; use a float16 variant or drop --graph_capture.")
    cache_len = context_length(config, max_seq_len)
    session = create_session(graph, provider, cache_len, graph_capture, use_cache=graph_cache,
                             dtype=config.dtype)
    runtime = Runtime(session, config, provider, cache_len, graph_capture)
    return engine_cls(runtime, tokenizer, table, config, name=name or graph.stem)
