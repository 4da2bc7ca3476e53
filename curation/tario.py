"""Reading and writing shard tars at the speed of the disk: the one place the project parses tar headers.

Python's tarfile builds a TarInfo object per member and parses every field of every header; on 10,000-image builds
that was most of the reshard stage's time, and of a finished build's rerun (invariants read every shard's headers).
Here:
  - `scan` walks the headers of a POSIX tar (USTAR, with PAX extended headers as img2dataset writes them), checks
    each header's checksum, and yields (name, data offset, size); anything else (links, GNU long names, sparse
    files) hands the file to tarfile, so an unusual tar is read correctly, only slower;
  - `read_members` yields (name, bytes) of the members wanted;
  - `ShardWriter` writes the deterministic USTAR our shards use (mtime 0, uid/gid 0, empty user names, mode 0644),
    byte for byte what `tarfile.open(..., format=USTAR_FORMAT)` wrote for them, and knows each member's data offset.
"""
from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads an archive to whole records
_REGULAR = (b"0", b"\0")


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
        if kind not in _REGULAR or set(pax) - {"path", "size", "mtime", "atime", "ctime", "uid", "gid", "uname",
                                                "gname", "comment"}:
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


def scan(path: str | Path) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of every regular member, in file order."""
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


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file as our shards store it (see the module docstring)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    header = bytearray(BLOCK)
    header[0:len(raw)] = raw
    header[100:108] = _octal(0o644, 8)
    header[108:116] = _octal(0, 8)
    header[116:124] = _octal(0, 8)
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(0, 12)
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"  # magic + version; user/group names and device numbers stay NUL
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


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
