"""Reading and writing shard tars at the speed of the disk: the one place the project parses tar headers.

Python's tarfile builds a TarInfo object per member and parses every field of every header; on 10,000-image builds
that was most of the reshard stage's time, and of a finished build's rerun (invariants read every shard's headers).
Here:
  - `scan` walks the headers of a POSIX tar (USTAR, with PAX extended headers as img2dataset writes them), checks
    each header's checksum, and yields (name, data offset, size); anything else (links, GNU long names, sparse
    files) hands the file to tarfile, so an unusual tar is read correctly, only slower;
  - `read_members` yields (name, bytes) of the members wanted;
  - `ShardWriter` writes the deterministic USTAR our shards use (mtime 0, uid/gid 0, empty user names, mode 0644),
    byte for byte what `tarfile.open(..., format=USTAR_FORMAT)` wrote for them, and knows each member's data offset;
    `write_tar` is one under a temporary name, renamed when complete. Every tar the project writes (final shards,
    staging shards, webdataset test sources) is written here.
"""
from __future__ import annotations

import mmap
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from curation.io import atomic_path

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads an archive to whole records
_REGULAR = (b"0", b"\0")
_REGULAR_KINDS, _PAX = (ord("0"), 0), ord("x")  # the type flag as the int a memory map's index gives
# PAX keys that change nothing about where a member's data is, or (path, size) that both scans apply
_HARMLESS_PAX = frozenset({"path", "size", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "comment"})


class _Fallback(Exception):
    """A header this scanner does not handle: read the file with tarfile."""


def _number(field: bytes) -> int:
    digits = field.strip(b"\0 ")
    return int(digits, 8) if digits else 0


def _checked(header: bytes, where: str) -> None:
    stored = header[148:156].strip(b"\0 ")
    if not stored or int(stored, 8) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
        raise tarfile.ReadError(f"{where}: bad tar header checksum")


def _pax_records(data: bytes) -> dict[str, str]:
    """`<length> <key>=<value>\\n` records of a PAX extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _scan_headers(fh: BinaryIO, where: str) -> Iterator[tuple[str, int, int]]:
    pax: dict[str, str] = {}
    while True:
        header = fh.read(BLOCK)
        if len(header) < BLOCK or not header.strip(b"\0"):
            return
        _checked(header, f"{where} at byte {fh.tell() - BLOCK}")
        kind, size = header[156:157], _number(header[124:136])
        if kind in (b"x", b"g"):
            data = fh.read(-(-size // BLOCK) * BLOCK)[:size]
            if kind == b"x":
                pax = _pax_records(data)
            continue
        if kind not in _REGULAR or set(pax) - _HARMLESS_PAX:
            raise _Fallback
        name = header[:100].rstrip(b"\0").decode("utf-8", "surrogateescape")
        prefix = header[345:500].rstrip(b"\0").decode("utf-8", "surrogateescape") if header[257:262] == b"ustar" \
            else ""
        name = pax.get("path") or (f"{prefix}/{name}" if prefix else name)
        size = int(pax["size"]) if "size" in pax else size
        pax = {}
        offset = fh.tell()
        yield name, offset, size
        fh.seek(offset + -(-size // BLOCK) * BLOCK)


def _fast_scan(path: str | Path) -> list[tuple[str, int, int]] | None:
    """`scan` for the common case, on a memory map, with every header checksum verified at the end in one numpy pass
    (a header is trusted for its size only once that pass agrees). None whenever anything is unusual (a bad
    checksum, a PAX header, another member type, an empty file): the careful scan then decides, with its messages."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size < BLOCK:
            return None
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            members, headers, pos, pax = [], [], 0, {}
            try:
                while pos + BLOCK <= size:
                    if mm[pos] == 0:  # no member name starts with NUL: the end-of-archive blocks, or damage
                        if mm[pos:pos + BLOCK].strip(b"\0"):
                            return None
                        break
                    kind, length = mm[pos + 156], int(mm[pos + 124:pos + 136].strip(b"\0 ") or b"0", 8)
                    headers.append(pos)
                    data_at = pos + BLOCK
                    if kind == _PAX:  # img2dataset's per-member PAX header (a fractional mtime)
                        pax = _pax_records(mm[data_at:data_at + length])
                    elif kind not in _REGULAR_KINDS or (pax and set(pax) - _HARMLESS_PAX) or (
                            mm[pos + 345] != 0 and mm[pos + 257:pos + 262] == b"ustar"):
                        return None  # links, global headers, prefixed names...: the careful scan handles them
                    else:
                        length = int(pax["size"]) if "size" in pax else length
                        name = pax.get("path") or mm[pos:pos + 100].rstrip(b"\0").decode("utf-8", "surrogateescape")
                        members.append((name, data_at, length))
                        pax = {}
                    pos = data_at + -(-length // BLOCK) * BLOCK
            except ValueError:
                return None
            if not headers or pos > size:
                return None
            # uint8 rows, a copy (fancy indexing): no view of the map outlives it
            blocks = np.frombuffer(mm, np.uint8)[np.array(headers)[:, None] + np.arange(BLOCK)]
            stored = [mm[h + 148:h + 156].strip(b"\0 ") for h in headers]
        sums = blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    try:
        if not all(stored) or not np.array_equal(sums, [int(v, 8) for v in stored]):
            return None
    except ValueError:
        return None
    return members


def scan(path: str | Path) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of every regular member, in file order."""
    fast = _fast_scan(path)
    if fast is not None:
        return fast
    with open(path, "rb") as fh:
        try:
            return list(_scan_headers(fh, Path(path).name))
        except _Fallback:
            pass
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def read_members(path: str | Path, wanted: set[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the members named in `wanted` (all when None), in file order."""
    members = scan(path)
    with open(path, "rb") as fh:
        for name, offset, size in members:
            if wanted is None or name in wanted:
                fh.seek(offset)
                data = fh.read(size)
                if len(data) != size:
                    raise tarfile.ReadError(f"{Path(path).name}: member {name} is truncated")
                yield name, data


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


# The fixed parts of our USTAR headers: mode/uid/gid (100-124), mtime (136-148), and from the type flag (156) on:
# "0", an empty link name, the magic and version, empty user/group names and device numbers.
_MODE_IDS = _octal(0o644, 8) + _octal(0, 8) + _octal(0, 8)
_MTIME = _octal(0, 12)
_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (BLOCK - 265)
_FIXED_SUM = sum(_MODE_IDS) + sum(_MTIME) + sum(_TAIL) + 8 * 32  # the checksum field counts as 8 spaces


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file as our shards store it (see the module docstring)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    size_field = _octal(size, 12)
    checksum = sum(raw) + sum(size_field) + _FIXED_SUM
    return raw.ljust(100, b"\0") + _MODE_IDS + size_field + _MTIME + b"%06o\0 " % checksum + _TAIL


class ShardWriter:
    """Append members to an open binary file; `close()` writes the end-of-archive blocks and record padding."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.pos = fh, 0

    def add(self, name: str, data: bytes) -> int:
        """Write one member; returns the offset of its data."""
        self.fh.write(ustar_header(name, len(data)))
        offset = self.pos + BLOCK
        self.fh.write(data)
        pad = -len(data) % BLOCK
        self.fh.write(b"\0" * pad)
        self.pos = offset + len(data) + pad
        return offset

    def close(self) -> None:
        end = self.pos + 2 * BLOCK
        self.fh.write(b"\0" * (2 * BLOCK + (-end % RECORD)))


@contextmanager
def write_tar(path: str | Path) -> Iterator[ShardWriter]:
    """A tar written under a temporary name and renamed when complete (curation.io's atomic rule): add members with
    `.add(name, data)`; the end-of-archive blocks are written when the block ends without an error."""
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        writer = ShardWriter(fh)
        yield writer
        writer.close()
