"""Checks on a variant's files before loading: Git LFS pointers, sizes and sha256 (manifest)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path, PurePosixPath

from .errors import UserError, VariantError
from .variant_folder import (
    CACHE_DIR,
    CONFIG,
    EMBEDDINGS,
    GRAPH_DIR,
    MANIFEST,
    STAGING_MARK,
    TOKENIZER,
    data_path,
    graphs,
)

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
# Files every variant of our format has besides its graph (ONNX/<name>.onnx and .onnx.data).
REQUIRED_FILES = (CONFIG, TOKENIZER, EMBEDDINGS)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_lfs_pointer(path: Path) -> bool:
    """True when `path` is a Git LFS pointer file (small text) instead of the real content."""
    try:
        if path.stat().st_size > 1024:
            return False
        with open(path, "rb") as f:
            return f.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX
    except OSError:
        return False


def lfs_message(path: Path) -> str:
    folder = _repo_root(path)
    return (f"{path} is a Git LFS pointer, not the file itself; run `git lfs pull` in "
            f"{folder} to download it.")


def _repo_root(path: Path) -> Path:
    for parent in [path.parent, *path.parents]:
        if (parent / ".git").exists():
            return parent
    return path.parent


def check_not_lfs_pointer(path: Path) -> None:
    if is_lfs_pointer(path):
        raise VariantError(lfs_message(path))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict | None:
    """The variant's manifest, checked for shape; None when the folder has none.

    Raises:
        VariantError when it is not valid JSON or not `{"files": {path: {size, sha256}}}`.
    """
    path = folder / MANIFEST
    if not path.is_file():
        return None
    check_not_lfs_pointer(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise VariantError(f"{path} is not valid JSON; fetch the variant again.") from None
    problem = _manifest_shape_problem(manifest)
    if problem:
        raise VariantError(f"{path} is malformed ({problem}); re-export or fetch the variant "
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
    problems = [f"{folder / MANIFEST} does not list {rel}; the manifest is incomplete: "
                "re-export or fetch the variant again." for rel in
                dict.fromkeys([*REQUIRED_FILES, *graph, *present]) if rel not in listed]
    if not found and not any(rel.endswith(".onnx") for rel in listed):
        problems.append(f"{folder / GRAPH_DIR} has no .onnx graph; re-export or fetch the "
                        "variant.")
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


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never half."""
    # A name no other file has (a user's own "<name>.tmp" is never overwritten); on any
    # failure the temporary file is removed and `path` is untouched.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_user_text(path: Path, flag: str, fix: str) -> str:
    """The text of a file a user named with `flag` (a corpus, a text to score).

    Raises:
        UserError (one sentence ending in `fix`) when it is missing, or binary: not UTF-8,
        or holding a NUL byte.
    """
    if not path.is_file():
        raise UserError(f"{flag} {path} is not a file; {fix}.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text, where = "", exc.start
    else:
        where = data.find(b"\0")
    if where >= 0:
        raise UserError(f"{flag} {path} is binary, not UTF-8 text (at byte {where}); {fix}.")
    return text
