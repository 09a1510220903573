"""The variant folder: the one place its file names are spelled (see DESIGN.md).

    <variant>/ONNX/LlamaV2_<variant>.onnx        graph         (GRAPH_DIR, graph_name)
    <variant>/ONNX/LlamaV2_<variant>.onnx.data   its weights   (data_path)
    <variant>/ONNX/.cache/                       old optimized-graph cache; unused
    <variant>/embeddings.safetensors             EMBEDDINGS
    <variant>/tokenizer.model                    TOKENIZER
    <variant>/config.json                        CONFIG
    <variant>/manifest.json                      MANIFEST
    <variant>/README.md, .gitattributes, .gitignore
    (original format: embeddings.pth, tokenizer.model possibly one folder up)
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.json"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
EMBEDDINGS = "embeddings.safetensors"
LEGACY_EMBEDDINGS = "embeddings.pth"
GRAPH_DIR = "ONNX"
CACHE_DIR = ".cache"
README = "README.md"
GITATTRIBUTES = ".gitattributes"
GITIGNORE = ".gitignore"
# Written first into an export's hidden staging folder and removed before it becomes the variant:
# only folders carrying it are ever cleaned up as leftovers of an interrupted export.
STAGING_MARK = ".llama2_onnx-staging"


def graph_name(variant: str) -> str:
    return f"LlamaV2_{variant}.onnx"


def data_path(graph: Path) -> Path:
    """The external-data file beside a graph."""
    return Path(f"{graph}.data")


def graphs(folder: Path) -> list[Path]:
    """Every ONNX/*.onnx graph of a variant folder (a valid variant has exactly one)."""
    graph_dir = Path(folder) / GRAPH_DIR
    return sorted(graph_dir.glob("*.onnx")) if graph_dir.is_dir() else []


def pull_command(name: str) -> str:
    """The commands that fetch a published variant's submodule and its LFS files."""
    return f"git submodule init {name} && git submodule update && (cd {name} && git lfs pull)"


# What a folder holds, decided here only (variants' slot states, loading, the CLI's --onnx_file).
ABSENT, EMPTY, OURS, LEGACY, UNKNOWN = "absent", "empty", "ours", "legacy", "unknown"


def folder_format(folder: Path) -> str:
    """From the file names alone: ABSENT, EMPTY (an uninitialised submodule: nothing but a
    .git), OURS (config.json), LEGACY (the original release: ONNX/*.onnx and embeddings.pth)
    or UNKNOWN."""
    folder = Path(folder)
    if not folder.exists():
        return ABSENT
    if folder.is_dir() and not any(p.name != ".git" for p in folder.iterdir()):
        return EMPTY
    if (folder / CONFIG).exists():
        return OURS
    return LEGACY if legacy_files(folder) else UNKNOWN


def legacy_files(folder: Path) -> tuple[Path, Path, Path] | None:
    """(graph, embeddings.pth, tokenizer.model) of an original-format folder, or None.

    The original repository kept tokenizer.model at its root, beside the variant folders.
    """
    found = graphs(folder)
    embeddings = Path(folder) / LEGACY_EMBEDDINGS
    if not found or not embeddings.exists():
        return None
    tokenizer = next((p for p in (Path(folder) / TOKENIZER, Path(folder).parent / TOKENIZER)
                      if p.exists()), Path(folder) / TOKENIZER)
    return found[0], embeddings, tokenizer
