"""Streaming safetensors reading and writing with plain file IO (no memory maps).

The exporter reads one tensor at a time into a fresh buffer and drops it, so the process's
resident memory stays near the largest tensor. (A memory map would keep every touched page of a
13 GB checkpoint counted in the process's resident set.)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64"}


@dataclass(frozen=True)
class TensorInfo:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Map each tensor name in a .safetensors file to where its bytes are."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path} is too short to be a safetensors file; download it "
                                  "again.")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise CheckpointError(
                f"{path} does not look like a safetensors file (is it a Git LFS pointer? run "
                "`git lfs pull`)."
            )
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header; download it "
                                  "again.") from None
    base = 8 + length
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        infos[name] = TensorInfo(Path(path), meta["dtype"], tuple(meta["shape"]),
                                 base + start, base + end)
    return infos


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor as float32 (bfloat16 is widened) or its stored float type."""
    if info.dtype not in _DTYPES:
        raise CheckpointError(f"{info.path}: tensor dtype {info.dtype} is not supported.")
    buf = np.empty(info.end - info.start, dtype=np.uint8)
    with open(info.path, "rb") as f:
        f.seek(info.start)
        if f.readinto(memoryview(buf)) != buf.size:
            raise CheckpointError(f"{info.path} is truncated; download it again.")
    arr = buf.view(_DTYPES[info.dtype]).reshape(info.shape)
    if info.dtype == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def write_streaming(
    path: Path,
    specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors are produced one at a time, in `specs` order."""
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": metadata or {}}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in specs:
            arr = np.ascontiguousarray(produce(name), dtype=dtype)
            assert arr.shape == tuple(shape), (name, arr.shape, shape)
            f.write(memoryview(arr).cast("B"))
