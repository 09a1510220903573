"""Write an output folder atomically: a hidden staging folder, signal-safe cleanup, and a
`--force` replacement that only ever replaces a folder this package wrote.

    <out>/.<name>.partial-<pid>/   written here first (removed on any error or signal)
    <out>/<name>/                  appears only when complete (one rename)
    <out>/.<name>.old-<pid>/       the replaced folder, for the instant between two renames

A later run cleans up after an export whose process is gone (SIGKILL, power loss): it removes
its marked `.partial-` folder and renames an `.old-` folder back (remove_stale_leftovers).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import Interrupted, UserError, VariantError
from .variant_folder import (
    CACHE_DIR,
    CONFIG,
    GRAPH_DIR,
    MANIFEST,
    STAGING_MARK,
    read_manifest,
    written_by,
)

# Written by the tools that make checkpoints (tools/make_random_checkpoint.py, train_demo.py)
# into their --out folder, listing what they write: they write only into a new or empty folder
# or one carrying it, so a downloaded checkpoint's config.json and shards are never replaced.
TOOL_MARK = ".llama2_onnx-tool-output"
_LEFTOVER = re.compile(r"^\.(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]*)\.(partial|old)-(?P<pid>\d+)$")
# Kept when a variant folder is replaced: its git repository (published variants) and caches.
_KEPT = (".git",)
_IGNORED_PREFIXES = (".git/", f"{GRAPH_DIR}/{CACHE_DIR}/")
EXPORTER_TAG = "llama2_onnx"
_HOLD: dict = {"active": False, "pending": None}  # see _signals_held


def staging_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


def begin_staging(staging: Path) -> None:
    """Create the hidden staging folder with its mark (see variant_folder.STAGING_MARK).

    Raises:
        UserError when a folder of that name exists without the mark (someone else's).
    """
    if staging.exists() or staging.is_symlink():
        if not (staging / STAGING_MARK).is_file() or staging.is_symlink():
            raise UserError(f"{staging} exists and was not made by this exporter; move it away "
                            "and export again.")
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    (staging / STAGING_MARK).write_text(f"{os.getpid()}\n", encoding="utf-8")


def remove_stale_leftovers(folder: Path) -> tuple[list[Path], list[Path]]:
    """Deal with what an export killed outright (SIGKILL, power loss) left in `folder`, once
    its process is gone: a marked `.NAME.partial-PID` staging folder is removed; a
    `.NAME.old-PID` folder (a replaced variant, between two renames) is renamed back to NAME
    when NAME is missing, else removed if it is entirely the exporter's and holds no `.git`.
    Anything else is left alone.

    Returns:
        (folders removed, folders restored).
    """
    removed, restored = [], []
    if not folder.is_dir():
        return removed, restored
    for path in sorted(folder.iterdir()):
        match = _LEFTOVER.match(path.name)
        if not match or not path.is_dir() or path.is_symlink() or _pid_alive(int(match["pid"])):
            continue
        if ".partial-" in path.name:
            if (path / STAGING_MARK).is_file():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            continue
        final = folder / match["name"]
        if not final.exists() and not final.is_symlink():
            os.replace(path, final)
            restored.append(final)
        elif not (path / ".git").exists() and _first_unlisted_file(path) is None:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed, restored


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
    """Turn SIGINT, SIGTERM and SIGHUP into `Interrupted` (a KeyboardInterrupt) while the block
    runs, so `finally` clauses remove half-written files; `_signals_held` defers them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [n for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {}

    def handler(signum, frame):
        if _HOLD["active"]:
            _HOLD["pending"] = signum
            return
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
        raise UserError(f"--force only replaces a folder this exporter wrote, but {final} "
                        f"holds {stranger}; move it away or choose another --variant/--out.")
    tracked = tracked_by_enclosing_git(final)
    if tracked:
        raise UserError(f"--force would replace {final}, whose files are part of the git "
                        f"repository around it ({tracked[0]} among them; the demo ships that "
                        "way); choose another --variant or --out.")


def tracked_by_enclosing_git(folder: Path) -> list[str]:
    """Files in `folder` that the git repository around it tracks as its own (a submodule,
    such as a published variant, is its own repository and does not count); [] when there is
    no such repository or git is not installed."""
    try:
        done = subprocess.run(["git", "-C", str(folder.parent), "ls-files", "--stage", "-z",
                               "--", folder.name], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode:
        return []
    entries = [e.split("\t", 1) for e in done.stdout.decode("utf-8", "replace").split("\0") if e]
    return [path for mode, path in entries if not mode.startswith("160000")]


def _first_unlisted_file(folder: Path) -> str | None:
    """What `folder` holds that its exporter did not write, as words that finish "it holds ..."
    (the first file its manifest does not list, or the missing manifest); None when every file
    is accounted for."""
    try:
        manifest = read_manifest(folder)
    except VariantError:
        manifest = None
    exporter = written_by(folder)
    if manifest is None or exporter is None:
        return f"no {MANIFEST} and {CONFIG} of this exporter"
    listed = set(manifest["files"])
    if not exporter.startswith(EXPORTER_TAG):
        return f"a {CONFIG} written by another tool"
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_dir() and not path.is_symlink() or rel == MANIFEST:
            continue
        if rel in _KEPT or rel.startswith(_IGNORED_PREFIXES) or rel.endswith(".tmp"):
            continue
        if rel not in listed:
            return f"{rel}, which it did not write"
    return None


def move_into_place(staging: Path, final: Path) -> None:
    """Swap the finished `staging` folder in as `final`, keeping `final`'s `.git`.

    SIGINT, SIGTERM and SIGHUP wait until the swap is done (they arrive right after it), so an
    interruption never leaves `final` missing with the old variant hidden beside it; after a
    SIGKILL in between, the next export renames the hidden folder back.
    """
    (staging / STAGING_MARK).unlink()
    with _signals_held():
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


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """While the block runs, a signal caught by `signals_as_interrupts` is noted, not raised;
    it is raised when the block ends. (Masking the signal would not do: another thread may
    take a process-directed signal, and Python then runs the handler in the main thread.)"""
    _HOLD["active"], _HOLD["pending"] = True, None
    try:
        yield
    finally:
        _HOLD["active"] = False
    if _HOLD["pending"] is not None:
        raise Interrupted(_HOLD["pending"])


def check_tool_out(out: Path) -> list[str]:
    """Refuse a tool's `--out` unless it is new, an empty folder, or one a tool of this package
    wrote (its TOOL_MARK lists every file in it; half-written `*.tmp` files aside).

    Returns:
        The files an earlier run wrote there (replaced by claim_tool_out); [] when none.
    Raises:
        UserError naming what is in the way and what to do.
    """
    if not out.exists():
        if out.is_symlink():
            raise UserError(f"--out {out} is a link to nothing; pass a new or empty folder.")
        return []
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a new or empty folder to write into.")
    entries = sorted(p.name for p in out.iterdir())
    listed = _tool_mark_files(out)
    if listed is None:
        if not entries:
            return []
        raise UserError(f"--out {out} holds files this tool did not write (the first: "
                        f"{entries[0]}), which it could replace; pass a new or empty folder.")
    for name in entries:
        path = out / name
        ours = name in listed and (path.is_symlink() or not path.is_dir())
        if name != TOOL_MARK and not ours and not (name.endswith(".tmp") and path.is_file()):
            raise UserError(f"--out {out} holds {name}, which this tool did not write; move "
                            "it away or pass a new or empty folder.")
    return listed


def claim_tool_out(out: Path, files: Sequence[str], tool: str) -> None:
    """Make `out` ready for `tool` to write `files` (plain names) into, after check_tool_out:
    an earlier run's files are removed and the mark lists `files` before any is written, so
    an interrupted run can simply be run again."""
    previous = check_tool_out(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_tool_mark(out, sorted({*previous, *files}), tool)  # covers both while removing
    for name in previous:
        (out / name).unlink(missing_ok=True)
    _write_tool_mark(out, sorted(files), tool)


def _write_tool_mark(out: Path, files: list[str], tool: str) -> None:
    tmp = out / f"{TOOL_MARK}.tmp"
    tmp.write_text(json.dumps({"written_by": tool, "files": files}, indent=2) + "\n",
                   encoding="utf-8")
    os.replace(tmp, out / TOOL_MARK)


def _tool_mark_files(out: Path) -> list[str] | None:
    """The plain file names a valid mark in `out` lists; None without one."""
    mark = out / TOOL_MARK
    try:
        files = json.loads(mark.read_text(encoding="utf-8"))["files"] if mark.is_file() and \
            not mark.is_symlink() else None
    except (OSError, ValueError, TypeError, KeyError):
        return None
    plain = isinstance(files, list) and all(
        isinstance(f, str) and f not in ("", ".", "..", TOOL_MARK) and "/" not in f
        and "\\" not in f for f in files)
    return files if plain else None
