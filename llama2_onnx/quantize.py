"""Weight-only 4-bit block quantization in the layout of ONNX Runtime's MatMulNBits operator.

A Linear weight W (out=N, in=K) is cut along K into blocks of `block` values. Each block gets
one float16 scale s and its values become 4-bit codes q in 0..15 with the implicit zero point
8 (symmetric; no zero-point tensor, which DirectML's MatMulNBits does not take):

    W[n, k] ~= (q[n, k] - 8) * s[n, k // block]

Packing (MatMulNBits' B input, uint8 (N, K / block, block / 2)): two codes per byte, the even
k in the low nibble. Scales are (N, K / block) float16.

Rounding: round-to-nearest. The scale maps the block's value of largest magnitude m to -8
(the code range is -8..7, so m's sign picks the end and the full range is used), and is rounded
to float16 before the codes are computed, so codes and stored scale agree. A per-block scale
search (trying m / (8 f) for f in 1, 0.95, 0.9, 0.85 and keeping the least squared error)
was measured and dropped: on the demo model it lowered held-out perplexity by 0.07 %
(22.689 with the search, 22.706 without; float32 22.360) for 4x the work.

Codes kept from a 4-bit source (a GGUF file's Q4_0 / Q4_1 blocks, gguf_source.py) arrive as
`Int4Blocks`: blocks of 32 with a float16 scale and, for Q4_1, a float16 offset per block:
W[n, k] = (q - 8) * s[n, b] + o[n, b]. The codes and scales are MatMulNBits' own; the offsets
add sum_b o[n, b] * (the sum of x over block b), a product 32 times smaller (graph.py). Q4_1's
w = d * q + m is this with s = d and o = m + 8 d. MatMulNBits' own zero points would say the
same (z = -m / d), but a fractional zero point is a float one, which ONNX Runtime's CPU kernel
runs 20x slower than none (19 ms against 0.9 ms for 576 x 3072) and which DirectML and WebGPU
do not take.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

BLOCK_SIZES = (32, 64, 128)
ZERO_POINT = 8
ROWS_PER_CHUNK = 256  # rows quantized together: bounds temporaries to a few MB per thread
THREADS = min(8, os.cpu_count() or 1)


def check_block(k: int, block: int, name: str = "weight") -> None:
    """Raise ValueError when `k` (the input width) is not a whole number of blocks."""
    if block not in BLOCK_SIZES:
        raise ValueError(f"block size {block} is not one of {BLOCK_SIZES}")
    if k % block:
        raise ValueError(f"{name} has input width {k}, not a multiple of the block size {block}")


def quantize(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a Linear weight (N, K) to MatMulNBits' packed codes and float16 scales.

    Args:
        weight: (out_features, in_features), any float dtype.
        block: values per block along in_features (32, 64 or 128).
    Returns:
        packed uint8 (N, K / block, block / 2) and scales float16 (N, K / block).
    """
    n, k = weight.shape
    check_block(k, block)
    packed = np.empty((n, k // block, block // 2), np.uint8)
    scales = np.empty((n, k // block), np.float16)

    def chunk(start: int) -> None:  # writes only its own rows: chunks run on threads
        rows = slice(start, min(n, start + ROWS_PER_CHUNK))
        blocks = np.asarray(weight[rows], np.float32).reshape(-1, k // block, block)
        index = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, index, axis=-1)  # signed, largest magnitude
        scale = (extreme / -ZERO_POINT).astype(np.float16)  # (rows, blocks, 1)
        s32 = scale.astype(np.float32)
        inv = np.divide(1.0, s32, out=np.zeros_like(s32), where=s32 != 0)
        codes = np.clip(np.rint(blocks * inv) + ZERO_POINT, 0, 15).astype(np.uint8)
        packed[rows] = pack(codes)
        scales[rows] = scale[..., 0]

    # NumPy releases the GIL in these loops, so row chunks quantize in parallel; the result is
    # the same whatever the number of threads.
    starts = range(0, n, ROWS_PER_CHUNK)
    with ThreadPoolExecutor(max_workers=min(len(starts), THREADS)) as pool:
        list(pool.map(chunk, starts))
    return packed, scales


def dequantize(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 weight (N, K) that packed codes and scales stand for."""
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1)
    values = (codes.astype(np.float32) - ZERO_POINT) * scales.astype(np.float32)[..., None]
    return values.reshape(packed.shape[0], -1)


def pack(codes: np.ndarray) -> np.ndarray:
    """Codes 0..15 (..., block) as MatMulNBits packs them: (..., block / 2), even k low."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


@dataclass
class Int4Blocks:
    """A Linear weight (N, K) as a 4-bit source stores it: codes (N, K / block, block) uint8
    in 0..15, scales (N, K / block) float16 and offsets (N, K / block) float16 or None (zero):
    W[n, k] = (codes - 8) * scales + offsets, per block."""

    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None = None

    @property
    def block(self) -> int:
        return self.codes.shape[-1]

    def rows(self, order: np.ndarray) -> Int4Blocks:
        """The same blocks with rows taken in `order`."""
        offsets = None if self.offsets is None else self.offsets[order]
        return Int4Blocks(self.codes[order], self.scales[order], offsets)

    def dequantize(self) -> np.ndarray:
        """The float32 weight (N, K) these blocks stand for."""
        values = (self.codes.astype(np.float32) - ZERO_POINT) * \
            self.scales.astype(np.float32)[..., None]
        if self.offsets is not None:
            values += self.offsets.astype(np.float32)[..., None]
        return values.reshape(self.codes.shape[0], -1)

    @classmethod
    def concatenate(cls, parts: list[Int4Blocks]) -> Int4Blocks:
        """Rows of several weights stacked (a fused projection); offsets written out (zero
        where a part has none) when any part has them."""
        offsets = None
        if any(p.offsets is not None for p in parts):
            offsets = np.concatenate([np.zeros(p.scales.shape, np.float16) if p.offsets is None
                                      else p.offsets for p in parts])
        return cls(np.concatenate([p.codes for p in parts]),
                   np.concatenate([p.scales for p in parts]), offsets)
