"""MXFP4 (gpt-oss's expert weights): 32 values share a power-of-two scale byte (E8M0) and each
is a 4-bit E2M1 code, `x = kvalue[code] * 2^(e - 128)` (ggml's table holds doubled E2M1
values, so the scale is halved).

Quantizing is gguf-py's: checked byte for byte against ggml's `quantize_row_mxfp4_ref`
through the oracle (tests/test_quants.py), including denormal and huge blocks and maxima just
below a power of two, where `floorf(log2f(amax))` could have gone either way. What is here is
the code layout aware rounding needs: its code table is not in order (codes 8-15 are the
negatives, code 8 is -0), so codes are moved as ranks among the 15 distinct levels.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32

# code -> doubled E2M1 value (ggml's kvalues_mxfp4)
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=F32)
LEVELS = np.unique(KVALUES)  # the distinct levels, in order
RANK_OF_CODE = np.searchsorted(LEVELS, KVALUES).astype(np.uint8)
# the code written for each rank: zero as code 0, which is what ggml's quantizer writes
CODE_OF_RANK = np.array([int(np.flatnonzero(KVALUES == v)[0]) for v in LEVELS], dtype=np.uint8)


def half_scale(e: np.ndarray) -> np.ndarray:
    """ggml_e8m0_to_fp32_half: 2^(e - 128) as float32 (denormal patterns for e < 2)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(F32)
