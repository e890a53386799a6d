"""How ggml packs small integer codes into bytes: one unpack/pack pair per bit layout.

Shared by the quantizers (which pack fresh codes) and by `codes` (which reads codes back and
rewrites them), so each layout is written once.
"""

from __future__ import annotations

import numpy as np


def nibbles(qs: np.ndarray, half: int) -> np.ndarray:
    """Per `2*half` codes, byte j holds code j in its low nibble and code j+half in its high one."""
    q = qs.reshape(qs.shape[0], -1, 1, half)
    return np.concatenate([q & 0xF, q >> 4], axis=2).reshape(qs.shape[0], -1)


def pack_nibbles(codes: np.ndarray, half: int) -> np.ndarray:
    q = codes.reshape(codes.shape[0], -1, 2, half)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(codes.shape[0], -1)


def bitplanes(b: np.ndarray) -> np.ndarray:
    """32 bytes -> 256 bits: code j's bit is bit j//32 of byte j%32 (Q3_K hmask, Q5_K qh)."""
    bits = np.unpackbits(b, axis=1, bitorder="little").reshape(b.shape[0], 32, 8)
    return np.ascontiguousarray(bits.transpose(0, 2, 1)).reshape(b.shape[0], -1)


def pack_bitplanes(bits: np.ndarray) -> np.ndarray:
    planes = np.ascontiguousarray(bits.reshape(bits.shape[0], 8, 32).transpose(0, 2, 1))
    return np.packbits(planes.reshape(bits.shape[0], -1), axis=1, bitorder="little")


def crumbs(b: np.ndarray) -> np.ndarray:
    """Per 128 codes, 32 bytes: byte l holds codes l, l+32, l+64, l+96 at bits 0, 2, 4, 6."""
    q = b.reshape(b.shape[0], -1, 32)
    out = np.empty((b.shape[0], q.shape[1], 4, 32), np.uint8)
    for j in range(4):  # one shift per crumb: a third faster than a broadcast shift and mask
        np.bitwise_and(q >> np.uint8(2 * j), 3, out=out[:, :, j])
    return out.reshape(b.shape[0], -1)


def pack_crumbs(codes: np.ndarray) -> np.ndarray:
    q = codes.reshape(codes.shape[0], -1, 4, 32)
    # explicit ors: np.bitwise_or.reduce over the crumb axis was half again slower
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(codes.shape[0], -1)


def low_bits32(qh: np.ndarray) -> np.ndarray:
    """A little-endian 32-bit word per block: code j's high bit is bit j (Q5_0, Q5_1)."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def pack_low_bits32(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits.reshape(-1, 32), axis=1, bitorder="little")
