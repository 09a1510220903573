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
    return _tensor_infos(Path(path), header, 8 + length)


_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1}


def _tensor_infos(path: Path, header: object, base: int) -> dict[str, TensorInfo]:
    """Check every entry of a parsed header (shape, dtype, byte span inside the file, no
    overlaps) and return where each tensor's bytes are."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} has a corrupt safetensors header ({why}); download or "
                               "export it again.")

    if not isinstance(header, dict):
        raise bad("not a JSON object")
    size, infos, spans = path.stat().st_size, {}, []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
            raise bad(f"tensor {name!r} lacks dtype, shape or data_offsets")
        shape, offsets, dtype = meta["shape"], meta["data_offsets"], meta["dtype"]
        if not (isinstance(shape, list) and all(_whole(d) for d in shape)) or not (
                isinstance(offsets, list) and len(offsets) == 2 and all(map(_whole, offsets))):
            raise bad(f"tensor {name!r} has an invalid shape or data_offsets")
        start, end = offsets
        if dtype not in _ITEMSIZE or end - start != _ITEMSIZE[dtype] * int(np.prod(shape)):
            raise bad(f"tensor {name!r}: {dtype} {shape} does not fill bytes {start}..{end}")
        if base + end > size:
            raise bad(f"tensor {name!r} ends past the end of the file; it is truncated")
        spans.append((start, end, name))
        infos[name] = TensorInfo(path, dtype, tuple(shape), base + start, base + end)
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise bad(f"tensors {first!r} and {second!r} overlap")
    return infos


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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


def map_tensor(info: TensorInfo) -> np.ndarray:
    """A read-only memory map of one float16/float32 tensor: pages are read when used, so
    opening a 7B's embedding table costs nothing and rows never looked up stay on disk."""
    if info.dtype not in ("F16", "F32"):
        return read_tensor(info)
    return np.memmap(info.path, dtype=_DTYPES[info.dtype], mode="r", offset=info.start,
                     shape=info.shape)


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
