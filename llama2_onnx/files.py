"""Checks on single files: Git LFS pointers, sha256, atomic writes and a user's text file."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .errors import UserError, VariantError

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"


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
