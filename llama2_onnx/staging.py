"""Write an output folder atomically: a hidden staging folder, signal-safe cleanup, and a
`--force` replacement that only ever replaces a folder this package wrote.

    <out>/.<name>.partial-<pid>/   written here first (removed on any error or signal)
    <out>/<name>/                  appears only when complete (one rename)
    <out>/.<name>.old-<pid>/       the replaced folder, for the instant between two renames

A later run removes `.partial-`/`.old-` folders whose process is gone (SIGKILL, power loss).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import Interrupted, UserError
from .layout import CACHE_DIR, CONFIG, GRAPH_DIR, MANIFEST

_LEFTOVER = re.compile(r"^\.(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]*)\.(partial|old)-(?P<pid>\d+)$")
# Kept when a variant folder is replaced: its git repository (published variants) and caches.
_KEPT = (".git",)
_IGNORED_PREFIXES = (".git/", f"{GRAPH_DIR}/{CACHE_DIR}/")
EXPORTER_TAG = "llama2_onnx"


def staging_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


def remove_stale_leftovers(folder: Path) -> list[Path]:
    """Remove `.NAME.partial-PID` / `.NAME.old-PID` folders in `folder` whose PID is not
    running. An `.old-` folder that still holds a `.git` repository is left alone.

    Returns:
        The folders removed.
    """
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _LEFTOVER.match(path.name)
        if not match or not path.is_dir() or path.is_symlink():
            continue
        if _pid_alive(int(match["pid"])) or (".old-" in path.name and (path / ".git").exists()):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else (or cannot tell): keep its files
    return True


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into `Interrupted` (a KeyboardInterrupt) while the block runs,
    so `finally` clauses remove half-written files exactly as they do for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {}

    def handler(signum, frame):
        raise Interrupted(signum)

    for name in names:
        previous[name] = signal.signal(getattr(signal, name), handler)
    try:
        yield
    finally:
        for name in names:
            signal.signal(getattr(signal, name), previous[name])


def check_replaceable(final: Path, force: bool, protected: Sequence[Path]) -> None:
    """Refuse to write `final` unless it is absent, or `force` is set and it is a folder this
    package wrote (its manifest lists every file in it) that holds none of `protected`.

    Raises:
        UserError naming what is there and what to do.
    """
    if not final.exists() and not final.is_symlink():
        return
    if not force:
        raise UserError(f"{final} already exists; pass --force to replace it or choose another "
                        "--variant/--out.")
    if final.is_symlink() or not final.is_dir():
        raise UserError(f"{final} is not a folder this exporter wrote (it is a "
                        f"{'link' if final.is_symlink() else 'file'}); --force only replaces "
                        "exported variants: move it away or choose another --variant/--out.")
    target = final.resolve()
    for path in protected:
        path = Path(path).resolve()
        if path == target or target in path.parents:
            raise UserError(f"--force would replace {final}, which holds {path}; choose "
                            "another --variant or --out.")
    stranger = _first_unlisted_file(final)
    if stranger is not None:
        raise UserError(f"--force only replaces a folder this exporter wrote, and {final} "
                        f"holds {stranger}, which it did not write; move that away or choose "
                        "another --variant/--out.")


def _first_unlisted_file(folder: Path) -> str | None:
    """The first file in `folder` that its exporter's manifest does not list, or a sentence
    saying the folder has no exporter's manifest; None when every file is accounted for."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        listed = set(manifest["files"])
        exporter = str(config.get("provenance", {}).get("exporter", ""))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return "files but no manifest.json/config.json written by this exporter"
    if not exporter.startswith(EXPORTER_TAG):
        return "a config.json written by another tool"
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_dir() and not path.is_symlink() or rel == MANIFEST:
            continue
        if rel in _KEPT or rel.startswith(_IGNORED_PREFIXES) or rel.endswith(".tmp"):
            continue
        if rel not in listed:
            return rel
    return None


def move_into_place(staging: Path, final: Path) -> None:
    """Swap the finished `staging` folder in as `final`, keeping `final`'s `.git`."""
    if not final.exists():
        os.replace(staging, final)
        return
    trash = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, trash)
    os.replace(staging, final)
    for name in _KEPT:
        if (trash / name).exists() or (trash / name).is_symlink():
            os.replace(trash / name, final / name)
    shutil.rmtree(trash, ignore_errors=True)
