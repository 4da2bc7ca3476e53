"""curation.tario: the header scanner and the shard writer agree with tarfile, and a corrupt header is caught."""
from __future__ import annotations

import io
import tarfile

import pytest

from curation import tario

SIZES = [0, 1, 511, 512, 513, 1024, 3000]


def _member(name: str, size: int) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, 0, 0o644, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, bytes((i * 7 + size) % 256 for i in range(size))


def test_shard_writer_is_byte_identical_to_tarfile_ustar_and_knows_its_offsets(tmp_path):
    members = [(f"{i:012d}.{ext}", size) for i, size in enumerate(SIZES) for ext in ("jpg", "txt")]
    reference, ours = tmp_path / "ref.tar", tmp_path / "ours.tar"
    with tarfile.open(reference, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, size in members:
            info, data = _member(name, size)
            tar.addfile(info, io.BytesIO(data))
    offsets = []
    with open(ours, "wb") as fh:
        writer = tario.ShardWriter(fh)
        for name, size in members:
            offsets.append(writer.add(name, _member(name, size)[1]))
        writer.close()
    assert ours.read_bytes() == reference.read_bytes()
    with tarfile.open(reference) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar]
    assert tario.scan(ours) == expected
    assert tario._fast_scan(ours) == expected  # the memory-mapped path, not the careful one, read it
    assert offsets == [offset for _, offset, _ in expected]
    assert dict(tario.read_members(ours, {"000000000003.txt"})) == {"000000000003.txt": _member("x", 512)[1]}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_scan_reads_pax_and_falls_back_to_tarfile_for_other_headers(tmp_path, fmt):
    path = tmp_path / "other.tar"
    names = ["short.jpg", "l" * 140 + ".jpg", "dir/" + "p" * 120 + "/x.json", "caf\u00e9.txt"]
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            info, data = _member(name, 100 * i + 7)
            info.mtime = 1_700_000_000.25  # a fractional mtime: PAX writes an extended header for it
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar]
    assert tario.scan(path) == expected
    assert [n for n, _ in tario.read_members(path)] == names
    # PAX extended headers are read on the fast path too; GNU long names are left to the careful one
    assert tario._fast_scan(path) == (expected if fmt == tarfile.PAX_FORMAT else None)


def test_the_fast_scan_reads_what_webdataset_and_img2dataset_write(tmp_path):
    """tarfile's default (PAX) format with short ASCII names and whole-second mtimes has no extended headers."""
    path = tmp_path / "staging.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(5):
            for ext in ("jpg", "txt", "json"):
                info, data = _member(f"{i:09d}.{ext}", 37 * i + 3)
                info.mtime = 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar]
    assert tario._fast_scan(path) == expected == tario.scan(path)


def test_a_flipped_header_byte_or_a_truncated_member_is_an_error(tmp_path):
    path = tmp_path / "shard.tar"
    with open(path, "wb") as fh:
        writer = tario.ShardWriter(fh)
        writer.add("a.jpg", b"x" * 700)  # data in 2 blocks: the next header starts at 512 + 1024
        writer.add("a.txt", b"caption")
        writer.close()
    data = bytearray(path.read_bytes())
    data[512 + 1024 + 3] ^= 0x01
    (tmp_path / "flipped.tar").write_bytes(bytes(data))
    assert tario._fast_scan(tmp_path / "flipped.tar") is None  # its checksum pass refuses, the careful scan names it
    with pytest.raises(tarfile.ReadError, match="checksum"):
        tario.scan(tmp_path / "flipped.tar")
    (tmp_path / "cut.tar").write_bytes(path.read_bytes()[:512 + 300])
    with pytest.raises(tarfile.ReadError, match="truncated"):
        list(tario.read_members(tmp_path / "cut.tar"))
