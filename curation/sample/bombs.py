"""Hostile images for the download-safety tests and benchmarks: small on the wire, huge when decoded. One generator
each, shared by tests/curation (hostile_web, test_imaging) and benchmarks/bench_download_memory.py."""
from __future__ import annotations

import io
import struct
import zlib


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 10_000, height: int | None = None) -> bytes:
    """A valid greyscale PNG of width x height (default square) zero pixels: ~100 kB compressed for 10,000 x 10,000,
    which decode to 100 MP (over the 89 MP cap)."""
    height = width if height is None else height
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def jpeg_header_bomb(side: int = 30_000) -> bytes:
    """A small JPEG whose SOF header claims side x side (900 MP by default): refused from the header, never decoded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", side, side)
            break
        i += 2 + length
    return bytes(data)
