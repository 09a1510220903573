"""The optimized-graph cache beside a variant's graph: keyed on content, checked when loaded.

ONNX Runtime spends most of a first load optimizing the graph; the result is kept in
`ONNX/.cache/` and reused only when it provably belongs to the same inputs:

    ONNX/.cache/<graph>.<provider>.onnx        optimized graph   ┐ written by ONNX Runtime
    ONNX/.cache/<graph>.<provider>.onnx.data   its weights       ┘
    ONNX/.cache/<graph>.<provider>.json        key + size, sampled and full sha256 of both

The key holds the source graph's and data's size and sha256 from the variant's manifest,
ONNX Runtime's version, the provider and every session setting that changes the optimized
graph (context length, graph capture, dtype). A load checks the key, the sizes and a sampled
hash (256 blocks of 64 KiB: catches a zeroed or replaced file in milliseconds); `--verify`
checks the full sha256. Any mismatch rebuilds. There is one cache per provider: a new context
length replaces the old files instead of adding a copy of the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import sha256_file
from .layout import CACHE_DIR, data_path

KEY_VERSION = 2
_SAMPLES, _BLOCK = 256, 1 << 16


@dataclass
class CachePlan:
    """Where a session loads from and whether it writes a fresh cache."""

    graph: Path                   # the variant's source graph
    load_from: Path               # the graph the session opens (source or cached)
    write_to: Path | None = None  # where ONNX Runtime writes the optimized graph (and .data)
    key: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def paths(graph: Path, provider: str) -> tuple[Path, Path, Path]:
    """(optimized graph, its data file, its record) for `graph` on `provider`."""
    base = graph.parent / CACHE_DIR / f"{graph.stem}.{provider}"
    return Path(f"{base}.onnx"), Path(f"{base}.onnx.data"), Path(f"{base}.json")


def sampled_sha256(path: Path) -> str:
    """sha256 of the size and of 256 evenly spaced 64 KiB blocks (the whole file if small)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= _SAMPLES * _BLOCK:
            digest.update(f.read())
        else:
            step = (size - _BLOCK) // (_SAMPLES - 1)
            for i in range(_SAMPLES):
                f.seek(i * step)
                digest.update(f.read(_BLOCK))
    return digest.hexdigest()


def plan(graph: Path, key: dict[str, Any] | None, verify: bool = False) -> CachePlan:
    """Decide whether to load the cached optimized graph, write a new one, or neither.

    Args:
        graph: the variant's source graph.
        key: what the cache must have been built from (see the module docstring); None: no
            cache (no manifest to key it on, or the caller turned caching off).
        verify: check the cache's full sha256, not only its sampled hash.
    """
    if key is None:
        return CachePlan(graph, graph)
    onnx_path, cached_data, record_path = paths(graph, key["provider"])
    if _matches(onnx_path, cached_data, record_path, key, verify):
        return CachePlan(graph, onnx_path, key=key)
    folder = onnx_path.parent
    if not _writable(folder):
        return CachePlan(graph, graph, notes=[
            f"{graph.parent} is read-only, so the optimized graph is not cached; every start "
            "optimizes it again (copy the variant somewhere writable to avoid that)."])
    needed = 2 * sum(p.stat().st_size for p in (graph, data_path(graph)) if p.exists())
    if shutil.disk_usage(graph.parent).free < needed + (1 << 30):
        return CachePlan(graph, graph, notes=[
            f"not enough free disk in {graph.parent} to cache the optimized graph "
            f"({needed / 2**30:.1f} GiB needed); every start optimizes it again."])
    _clear(folder, graph, key["provider"])
    return CachePlan(graph, graph, write_to=onnx_path, key=key)


def record(plan_: CachePlan) -> None:
    """After ONNX Runtime wrote the optimized graph: record what it is, so later loads can
    check it. Without both files (ONNX Runtime wrote nothing) nothing is recorded."""
    if plan_.write_to is None or plan_.key is None:
        return
    onnx_path, cached_data, record_path = paths(plan_.graph, plan_.key["provider"])
    if not onnx_path.is_file():
        return
    files = {}
    for label, path in (("onnx", onnx_path), ("data", cached_data)):
        if path.is_file():
            files[label] = {"size": path.stat().st_size, "sample": sampled_sha256(path),
                            "sha256": sha256_file(path)}
    tmp = record_path.with_name(record_path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"key": plan_.key, "files": files}, indent=1), encoding="utf-8")
    os.replace(tmp, record_path)


def forget(graph: Path, provider: str) -> None:
    """Drop the record so the next load rebuilds (used when the cached graph fails to load)."""
    paths(graph, provider)[2].unlink(missing_ok=True)


def _matches(onnx_path: Path, cached_data: Path, record_path: Path, key: dict[str, Any],
             verify: bool) -> bool:
    try:
        saved = json.loads(record_path.read_text(encoding="utf-8"))
        if saved["key"] != key or "onnx" not in saved["files"]:
            return False
        for label, path in (("onnx", onnx_path), ("data", cached_data)):
            entry = saved["files"].get(label)
            if entry is None:
                if path.exists():
                    return False
                continue
            if path.stat().st_size != entry["size"] or sampled_sha256(path) != entry["sample"]:
                return False
            if verify and sha256_file(path) != entry["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _clear(folder: Path, graph: Path, provider: str) -> None:
    """Remove every cache file of this graph and provider (any context length, any version)."""
    for path in folder.glob(f"{graph.stem}.{provider}.*"):
        if path.is_file():
            path.unlink(missing_ok=True)
