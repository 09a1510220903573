"""The variant folder: the one place its file names are spelled (see DESIGN.md).

    <variant>/ONNX/LlamaV2_<variant>.onnx        graph         (GRAPH_DIR, graph_name)
    <variant>/ONNX/LlamaV2_<variant>.onnx.data   its weights   (data_path)
    <variant>/ONNX/.cache/                       old optimized-graph cache; unused
    <variant>/embeddings.safetensors             EMBEDDINGS
    <variant>/tokenizer.model                    TOKENIZER (SentencePiece: Llama 2)
    <variant>/tokenizer.json                     HF_TOKENIZER (Hugging Face `tokenizers`), with
    <variant>/tokenizer_config.json              TOKENIZER_CONFIG (BOS/EOS, chat_template) and
    <variant>/generation_config.json             GENERATION_CONFIG (extra stop ids; optional)
    <variant>/config.json                        CONFIG
    <variant>/manifest.json                      MANIFEST
    <variant>/README.md, .gitattributes, .gitignore    README, GITATTRIBUTES, GITIGNORE
    original format: ONNX/*.onnx, embeddings.pth (ORIGINAL_EMBEDDINGS), tokenizer.model beside
    the folder or one folder up (tokenizer_near)

It also holds the one vocabulary of a folder's states (variant_state: ready, not pulled,
submodule not initialised, incomplete, absent; the format, ours or the original release's, is an
attribute beside the state), the checks on a folder (check_folder, variant_format, find_graph)
and its manifest (write_manifest, read_manifest, check_files, published_files). Everything else
imports these names, in code and in the text it writes (tests/test_structure.py checks).
"""

from __future__ import annotations

import configparser
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import TypeVar

from .errors import VariantError
from .files import (
    check_not_lfs_pointer,
    is_lfs_pointer,
    lfs_message,
    sha256_file,
    write_text_atomic,
)

CONFIG = "config.json"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
HF_TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
# The files of each tokenizer a variant can carry: the first is the tokenizer, the required ones
# come next, generation_config.json is optional (HF_OPTIONAL).
HF_TOKENIZER_FILES = (HF_TOKENIZER, TOKENIZER_CONFIG, GENERATION_CONFIG)
HF_OPTIONAL = (GENERATION_CONFIG,)
EMBEDDINGS = "embeddings.safetensors"
ORIGINAL_EMBEDDINGS = "embeddings.pth"
GRAPH_DIR = "ONNX"
GRAPH_SUFFIX, DATA_SUFFIX = ".onnx", ".data"
CACHE_DIR = ".cache"
README = "README.md"
GITATTRIBUTES = ".gitattributes"
GITIGNORE = ".gitignore"
GITMODULES = ".gitmodules"  # the distribution's: which slots are submodules
# What Git LFS stores of a published variant: the graph, its weights, embeddings and tokenizer.
LFS_PATTERNS = (f"*{GRAPH_SUFFIX}", f"*{GRAPH_SUFFIX}{DATA_SUFFIX}", f"*{Path(EMBEDDINGS).suffix}",
                f"*{Path(TOKENIZER).suffix}")
# Written first into an export's hidden staging folder and removed before it becomes the variant:
# only folders carrying it are ever cleaned up as leftovers of an interrupted export.
STAGING_MARK = ".llama2_onnx-staging"
# Files every variant of our format has besides its graph (ONNX/<name>.onnx and .onnx.data) and
# its tokenizer's files (tokenizer_files).
REQUIRED_FILES = (CONFIG, EMBEDDINGS)
_SHA256 = re.compile(r"[0-9a-f]{64}")
AnyPath = TypeVar("AnyPath", bound=PurePath)


def graph_name(variant: str) -> str:
    return f"LlamaV2_{variant}{GRAPH_SUFFIX}"


def data_path(graph: AnyPath) -> AnyPath:
    """The external-data file beside a graph (a posix path stays one: the README card's)."""
    return graph.with_name(graph.name + DATA_SUFFIX)


def graphs(folder: Path) -> list[Path]:
    """Every ONNX/*.onnx graph of a variant folder (a valid variant has exactly one)."""
    graph_dir = Path(folder) / GRAPH_DIR
    return sorted(graph_dir.glob(f"*{GRAPH_SUFFIX}")) if graph_dir.is_dir() else []


def pull_command(name: str) -> str:
    """The commands that fetch a published variant's submodule and its LFS files."""
    return f"git submodule init {name} && git submodule update && (cd {name} && git lfs pull)"


# ---------------------------------------------------------------------------- states

# What a variant folder is, in one vocabulary (variant_state decides; --list, the chat app and
# the loader show these words).
READY, NOT_PULLED, NOT_INITIALISED, INCOMPLETE, ABSENT = (
    "ready", "not pulled (Git LFS pointers)", "submodule not initialised", "incomplete", "absent")
# The format of a folder that holds a variant's files: ours (config.json) or the original
# Llama-2-Onnx release's (ONNX/*.onnx with embeddings.pth); an attribute, not a state.
OURS, ORIGINAL = "ours", "original"


@dataclass(frozen=True)
class VariantState:
    """One variant folder: its state, what to run when it is not ready, and its format."""

    name: str
    path: Path
    state: str
    hint: str = ""
    format: str | None = None  # OURS or ORIGINAL; None while the folder holds neither

    @property
    def ready(self) -> bool:
        return self.state == READY


def variant_state(path: Path) -> VariantState:
    """Classify one variant folder (the manifest's sizes are compared, not its sha256).

    Raises:
        VariantError when its manifest is malformed.
    """
    name, pull = path.name, f"run `{pull_command(path.name)}`"
    missing = missing_state(path)
    if missing == ABSENT:
        declared = name in submodule_paths(path.parent)
        return VariantState(name, path, ABSENT, pull if declared else (
            "not published in this distribution yet; README 'Exporting and publishing'"))
    if missing == NOT_INITIALISED:
        return VariantState(name, path, NOT_INITIALISED, pull)
    kind = folder_format(path)
    if kind is None:
        return VariantState(name, path, INCOMPLETE, f"no {CONFIG}: re-export or fetch it")
    lfs_pull = f"run `git lfs pull` in {name}"
    if kind == ORIGINAL:
        if any(is_lfs_pointer(p) for p in original_files(path)):
            return VariantState(name, path, NOT_PULLED, lfs_pull, kind)
        return VariantState(name, path, READY, "original Llama-2-Onnx format", kind)
    problems = check_files(path)
    if any("Git LFS pointer" in p for p in problems) or is_lfs_pointer(path / CONFIG):
        return VariantState(name, path, NOT_PULLED, lfs_pull, kind)
    if problems:
        return VariantState(name, path, INCOMPLETE, problems[0], kind)
    return VariantState(name, path, READY, "", kind)


def missing_state(folder: Path) -> str | None:
    """ABSENT, NOT_INITIALISED (an uninitialised submodule: nothing but a .git) or None when
    the folder has files, from the file names alone."""
    folder = Path(folder)
    if not folder.exists():
        return ABSENT
    if folder.is_dir() and not any(p.name != ".git" for p in folder.iterdir()):
        return NOT_INITIALISED
    return None


def folder_format(folder: Path) -> str | None:
    """OURS (a config.json), ORIGINAL (ONNX/*.onnx with embeddings.pth) or None (neither),
    from the file names alone."""
    if (Path(folder) / CONFIG).exists():
        return OURS
    return ORIGINAL if original_files(folder) else None


def check_folder(path: Path) -> None:
    """Raise a VariantError naming the fix when `path` is absent or an empty submodule."""
    missing = missing_state(path)
    if missing == ABSENT:
        raise VariantError(f"variant folder {path} does not exist; list the variants with "
                           "`python MinimumExample/Example_ONNX_LlamaV2.py --list`.")
    if missing == NOT_INITIALISED:
        raise VariantError(f"{path} is empty: its submodule is not initialised; run "
                           f"`{pull_command(path.name)}` from the repository root.")


def variant_format(path: Path) -> str:
    """OURS or ORIGINAL: the format of a folder about to be opened.

    Raises:
        VariantError naming the fix when the folder is absent, an empty submodule or holds
        neither format's files.
    """
    check_folder(path)
    kind = folder_format(path)
    if kind is None:
        raise VariantError(f"{path} holds neither {CONFIG} nor an original Llama-2-Onnx "
                           f"graph ({GRAPH_DIR}/*{GRAPH_SUFFIX} with {ORIGINAL_EMBEDDINGS}); is "
                           "it a variant folder?")
    return kind


def looks_like_variant(folder: Path) -> bool:
    """A folder with a config.json or an ONNX/ folder (a slot the distribution does not list)."""
    return (folder / CONFIG).exists() or (folder / GRAPH_DIR).is_dir()


def find_graph(path: Path) -> Path:
    """The one ONNX/*.onnx graph of a variant folder.

    Raises:
        VariantError when it holds none or several.
    """
    found = graphs(path)
    if len(found) != 1:
        what = f"no {GRAPH_SUFFIX} graph" if not found else f"{len(found)} graphs"
        raise VariantError(f"{path / GRAPH_DIR} holds {what} but a variant has exactly one; "
                           "re-export or fetch the variant again.")
    return found[0]


def original_files(folder: Path) -> tuple[Path, Path, Path] | None:
    """(graph, embeddings.pth, tokenizer.model) of an original-format folder, or None.

    The original repository kept tokenizer.model at its root, beside the variant folders.
    """
    found = graphs(folder)
    embeddings = Path(folder) / ORIGINAL_EMBEDDINGS
    if not found or not embeddings.exists():
        return None
    return found[0], embeddings, tokenizer_near(Path(folder))


def tokenizer_near(folder: Path) -> Path:
    """tokenizer.model in `folder`, else one folder up (where Meta's download and the original
    Llama-2-Onnx release keep it); `folder`'s own path when neither exists."""
    candidates = (folder / TOKENIZER, folder.parent / TOKENIZER)
    return next((p for p in candidates if p.is_file()), candidates[0])


def variant_tokenizer(folder: Path) -> Path:
    """The tokenizer a variant of our format was exported with: the one of tokenizer.model and
    tokenizer.json its manifest lists (the exporter writes one of them); without such a manifest
    tokenizer.model when it exists (every variant before tokenizer.json), else tokenizer.json,
    else tokenizer.model's path (whose absence the loader names)."""
    folder = Path(folder)
    try:
        listed = (read_manifest(folder) or {}).get("files", {})
    except VariantError:
        listed = {}
    named = [name for name in (TOKENIZER, HF_TOKENIZER) if name in listed]
    if len(named) == 1:
        return folder / named[0]
    return next((folder / n for n in (TOKENIZER, HF_TOKENIZER) if (folder / n).is_file()),
                folder / TOKENIZER)


def tokenizer_files(tokenizer: Path) -> list[tuple[Path, str]]:
    """The files that make up the tokenizer in `tokenizer` and their names in a variant folder:
    a SentencePiece model alone (tokenizer.model), or a tokenizer.json with the
    tokenizer_config.json and (if present) generation_config.json beside it."""
    tokenizer = Path(tokenizer)
    if not is_hf_tokenizer(tokenizer):
        return [(tokenizer, TOKENIZER)]
    beside = [(tokenizer.with_name(name), name) for name in HF_TOKENIZER_FILES[1:]]
    return [(tokenizer, HF_TOKENIZER), *((path, name) for path, name in beside
                                         if name not in HF_OPTIONAL or path.is_file())]


def is_hf_tokenizer(tokenizer: Path) -> bool:
    """Whether a tokenizer file is a Hugging Face tokenizer.json (else SentencePiece)."""
    return Path(tokenizer).suffix == Path(HF_TOKENIZER).suffix


def submodule_paths(root: Path) -> list[str]:
    """Paths of the submodules declared in `root/.gitmodules`."""
    parser = configparser.ConfigParser()
    if not (root / GITMODULES).is_file():
        return []
    parser.read(root / GITMODULES, encoding="utf-8")
    return [parser[s]["path"] for s in parser.sections() if "path" in parser[s]]


# ---------------------------------------------------------------------------- manifest


def write_manifest(folder: Path, name: str, known: dict[str, dict] | None = None) -> dict:
    """Record the size and sha256 of every file in `folder` (except the manifest itself).

    `known`: entries already computed while writing (relative path -> size and sha256),
    used when the file still has that size instead of reading it back."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in (MANIFEST, STAGING_MARK) or rel.startswith(".git/") or \
                f"/{CACHE_DIR}/" in f"/{rel}":
            continue
        size = path.stat().st_size
        entry = (known or {}).get(rel)
        files[rel] = entry if entry and entry["size"] == size else {
            "size": size, "sha256": sha256_file(path)}
    manifest = {"variant": name, "files": files}
    _save_manifest(folder, manifest)
    return manifest


def written_by(folder: Path) -> str | None:
    """The exporter that the folder's config.json names in its provenance ("" when it names
    none), read without checking the rest (another tool's config.json answers too; Config.load
    is the strict reading); None when there is no readable config.json."""
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        return str(config.get("provenance", {}).get("exporter", ""))
    except (OSError, ValueError, AttributeError):
        return None


def refresh_manifest_entry(folder: Path, rel: str) -> None:
    """Record the current size and sha256 of one file in a folder's (valid) manifest."""
    manifest = read_manifest(folder)
    assert manifest is not None, "verified variants have a manifest"
    path = folder / rel
    manifest["files"][rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    _save_manifest(folder, manifest)


def _save_manifest(folder: Path, manifest: dict) -> None:
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path) -> dict | None:
    """The variant's manifest, checked for shape; None when the folder has none.

    Raises:
        VariantError when it is a Git LFS pointer, not valid JSON or not
        `{"files": {path: {size, sha256}}}`.
    """
    path = folder / MANIFEST
    if not path.is_file():
        return None
    check_not_lfs_pointer(path)
    return parse_manifest(path.read_bytes(), path)


def parse_manifest(data: bytes, source: object) -> dict:
    """A manifest's content (a file's or a commit's), checked for shape.

    Raises:
        VariantError naming `source` when it is not valid JSON or not a manifest.
    """
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise VariantError(f"{source} is not valid JSON; fetch the variant again.") from None
    problem = _manifest_shape_problem(manifest)
    if problem:
        raise VariantError(f"{source} is malformed ({problem}); re-export or fetch the variant "
                           "again.")
    return manifest


def _manifest_shape_problem(manifest: object) -> str:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return 'it needs an object with a "files" object'
    for rel, entry in manifest["files"].items():
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith("/") or "\\" in rel or ".." in parts or ":" in rel:
            return f"entry {rel!r} is not a path inside the variant"
        if not isinstance(entry, dict):
            return f"entry {rel!r} is not an object"
        size, digest = entry.get("size"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"entry {rel!r} has no valid size"
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return f"entry {rel!r} has no valid sha256"
    return ""


def variant_file_problems(folder: Path, listed: dict) -> list[str]:
    """What a complete manifest must list: every required file, the one graph and its data,
    and every file in ONNX/ (an old optimized-graph cache aside)."""
    found = graphs(folder)
    if len(found) > 1:
        names = ", ".join(g.name for g in found)
        return [f"{folder / GRAPH_DIR} holds {len(found)} graphs ({names}) but a variant has "
                "exactly one; remove the extra one or fetch the variant again."]
    graph = [p.relative_to(folder).as_posix() for p in (found[0], data_path(found[0]))
             ] if found else []
    present = [p.relative_to(folder).as_posix() for p in (folder / GRAPH_DIR).rglob("*")
               if p.is_file() and CACHE_DIR not in p.relative_to(folder).parts] if found else []
    tokenizer = HF_TOKENIZER if HF_TOKENIZER in listed and TOKENIZER not in listed else TOKENIZER
    tokenizer_names = [name for _, name in tokenizer_files(folder / tokenizer)]
    problems = [f"{folder / MANIFEST} does not list {rel}; the manifest is incomplete: "
                "re-export or fetch the variant again." for rel in
                dict.fromkeys([*REQUIRED_FILES, *tokenizer_names, *graph, *present])
                if rel not in listed]
    if not found and not any(rel.endswith(GRAPH_SUFFIX) for rel in listed):
        problems.append(f"{folder / GRAPH_DIR} has no {GRAPH_SUFFIX} graph; re-export or fetch "
                        "the variant.")
    return problems


def check_files(folder: Path, sha256: bool = False) -> list[str]:
    """Compare the variant's files with its manifest.

    Args:
        folder: the variant folder.
        sha256: also hash every file (slow for big variants); otherwise sizes only.
    Returns:
        One sentence per problem found; empty when everything matches.
    Raises:
        VariantError when the manifest itself is malformed.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder / MANIFEST} is missing; re-export or fetch the variant again."]
    problems = []
    for rel, entry in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path} is missing; run `git lfs pull` in {folder} or re-export.")
        elif is_lfs_pointer(path) and entry["size"] > 1024:
            problems.append(lfs_message(path))
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path} has {path.stat().st_size} bytes but the manifest says "
                            f"{entry['size']}; it is truncated or corrupted: run `git lfs pull` "
                            f"in {folder} again (or re-export).")
        elif sha256 and sha256_file(path) != entry["sha256"]:
            problems.append(f"{path} does not match its sha256 in the manifest; it is corrupted: "
                            f"delete it and run `git lfs pull` in {folder} (or re-export).")
    return problems + variant_file_problems(folder, manifest["files"])


def published_files(folder: Path) -> tuple[list[str], list[str]]:
    """Split a variant folder into what publishing ships and everything else.

    Args:
        folder: a variant folder with a manifest.
    Returns:
        (manifest.json and every file it lists; every other file in the folder, its `.git`
        and old optimized-graph caches aside), both sorted posix paths relative to `folder`.
    Raises:
        VariantError when the manifest is missing or malformed.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        raise VariantError(f"{folder / MANIFEST} is missing; re-export the variant.")
    listed = sorted({MANIFEST, *manifest["files"]})
    others = []
    for top, dirs, names in os.walk(folder):
        here = Path(top).relative_to(folder)
        dirs[:] = [d for d in dirs if d != CACHE_DIR and (here.parts or d != ".git")]
        others += [rel for name in names if (rel := (here / name).as_posix()) not in listed
                   and rel != ".git"]  # a submodule's .git is a file pointing to its repository
    return listed, sorted(others)


def left_out_warning(left_out: list[str]) -> str:
    """The one warning line naming the files a publish did not ship ("" when none)."""
    if not left_out:
        return ""
    return (f"not published (not listed in {MANIFEST}, so left out): {', '.join(left_out)}; "
            "re-export the variant if one of them belongs in it.")
