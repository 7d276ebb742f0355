"""Frame-level pixel work that needs numpy only (no torch), so that a decoding child process can do it.

`resize_nearest` picks exactly the rows and columns the reference's `F.interpolate(frames, (S, S))` (torch's
legacy "nearest") picks: index `min(floor(i * (src / dst)), src - 1)` computed in float32, as torch's CPU kernel
computes it; tests check it against torch itself over many sizes.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=64)
def nearest_index(src: int, dst: int) -> np.ndarray:
    """The source rows/columns torch's nearest interpolation picks for src → dst."""
    if dst == src:
        return np.arange(src)
    if dst == 2 * src:  # torch's exact shortcut for doubling
        return np.arange(dst) >> 1
    scale = np.float32(src) / np.float32(dst)
    picked = np.floor(np.arange(dst, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(picked, src - 1)


def resize_nearest(arr: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 → (size, size, 3), as the reference's `F.interpolate(frames, (size, size))`."""
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    return np.ascontiguousarray(arr[nearest_index(arr.shape[0], size)][:, nearest_index(arr.shape[1], size)])
