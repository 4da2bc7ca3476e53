"""What identifies a stored image for dedup: the sha256 of its stored JPEG bytes and a 64-bit DCT perceptual hash.

One definition, used where the image is made (inside the download workers, next to the encoder: the hashes then ride
in the staging parquet and dedup reads no image again) and by dedup itself for images staged without them (older
staging rounds, injected images). Both must give the same bits for the same bytes, so both call `stored_hashes`.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

# Part of the dedup hash cache's settings: bumped whenever the same bytes would give another pHash.
# 2: full greyscale decode with OpenCV + area reduction to side x side (was Pillow draft decode + LANCZOS, ~3x slower).
PHASH_VERSION = 2
# The settings the download workers hash with (DedupConfig's defaults); dedup uses staged hashes only when its own
# settings are these.
STAGED_HASH_SIZE = 8
STAGED_HIGHFREQ_FACTOR = 4
# Where they are stored: the staging parquets' and downloads.parquet's columns (null where an image has none).
STORED_HASH_FIELDS = (pa.field("stored_sha256", pa.string()), pa.field("stored_phash", pa.uint64()))


def _dct_rows(n_out: int, n_in: int) -> np.ndarray:
    """First n_out rows of the (unnormalised) DCT-II matrix of size n_in: scale does not matter for a median test."""
    k = np.arange(n_out)[:, None]
    i = np.arange(n_in)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n_in))


def gray_pixels(data: bytes, side: int) -> np.ndarray:
    """The image (any format OpenCV decodes) as greyscale, area-reduced to side x side, float64. Raises ValueError
    if it does not decode. The EXIF orientation is ignored: this hashes the pixels as stored."""
    import cv2

    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    if gray is None or gray.size == 0:
        raise ValueError("image does not decode")
    small = cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA)
    return small.astype(np.float64)


def phash_pixels(pixels: np.ndarray, hash_size: int = 8) -> np.ndarray:
    """pHash of grayscale images (B, S, S) -> (B,) uint64, the imagehash.phash definition: 2-D DCT, keep the top-left
    hash_size x hash_size coefficients, bit = coefficient > their median; bits row-major, first bit most significant."""
    pixels = np.asarray(pixels, dtype=np.float64)
    side = pixels.shape[-1]
    dct = _dct_rows(hash_size, side)
    low = dct @ pixels @ dct.T  # (B, hash_size, hash_size)
    flat = low.reshape(low.shape[0], -1)
    bits = flat > np.median(flat, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).ravel()


def phash_bytes(data: bytes, hash_size: int = 8, highfreq_factor: int = 4) -> int:
    """pHash of one encoded image."""
    return int(phash_pixels(gray_pixels(data, hash_size * highfreq_factor)[None], hash_size)[0])


def hamming(a: int | np.ndarray, b: int | np.ndarray) -> np.ndarray:
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return np.bitwise_count(x).astype(np.int32)


def stored_hashes(jpg: bytes) -> tuple[str, int | None]:
    """(sha256 hex, pHash or None if it does not decode) of stored JPEG bytes, with the staged settings."""
    try:
        phash: int | None = phash_bytes(jpg, STAGED_HASH_SIZE, STAGED_HIGHFREQ_FACTOR)
    except ValueError:
        phash = None
    return hashlib.sha256(jpg).hexdigest(), phash
