"""Read one CC4M build through the on-disk contract (the ONLY module of ovseg_core that knows the build format).

What it reads, by the paths of `manifests.layout.BuildLayout` (the contract package spells them; nothing here does):
    shards      <key>.jpg/.txt/.json per sample, key = `manifests.layout.sample_key(sample_id)`
    meta parts  one row per written sample (counts come from here, never hard-coded)
    locator     sample_id -> shard, offset, size of the .jpg member data (O(1) partner fetch)
    partners    sample_id, rank, partner_id, shared_class (fallback when a shard json lacks "partners")
    manifest    optional; its sha256 is recorded in checkpoints

Shards may live elsewhere (`shard_base_url`): an http(s) server, or any fsspec URL (s3://, gs://, memory://, ...),
as webdataset reads them. The small tables (meta, index, manifest) stay in the local build folder. Streaming reads a
shard as one request; the locator's partner fetches become HTTP range requests (fsspec `cat_file` ranges).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from manifests.fileio import sha256_file
from manifests.layout import BuildLayout
from manifests.locations import is_url, open_location
from manifests.schema import count_problems, validate_manifest


def is_val_sample(sample_id: int, val_percent: float) -> bool:
    """Deterministic held-out split: a stable hash of the sample id (not its position) so it survives re-sharding."""
    if val_percent <= 0:
        return False
    digest = hashlib.blake2b(str(int(sample_id)).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") % 10000) < val_percent * 100


class InvalidBuild(ValueError):
    """The folder is not a finished, consistent CC4M build (the manifest is missing, invalid or disagrees)."""


def check_build(root: str | Path, shards_here: bool = True) -> dict[str, Any]:
    """The quick side of the build contract, before any training: manifest.json exists and is valid, its counts add
    up, every shard it lists exists with the listed size, no other shard is there, and meta holds `written` rows.
    No hashing (`cc4m verify` re-hashes everything). `shards_here=False` when the shards are read from a URL.
    Returns the manifest; raises InvalidBuild saying what is wrong."""
    root = Path(root)
    path = BuildLayout(root).manifest
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InvalidBuild(f"{root} is not a finished CC4M build: cannot read {path} ({err}). Build it with "
                           "`cc4m build`, or finish the interrupted build by running it again") from None
    problems = validate_manifest(manifest) or count_problems(manifest["counts"], manifest["shards"])
    if not problems:
        problems = _shard_and_meta_problems(BuildLayout(root), manifest, shards_here)
    if problems:
        raise InvalidBuild(f"{root}: the build does not match its manifest: " + "; ".join(problems[:5])
                           + f". `cc4m verify {root}` checks everything; rebuild with `cc4m build`")
    return manifest


def _shard_and_meta_problems(layout: BuildLayout, manifest: dict[str, Any], shards_here: bool) -> list[str]:
    problems = []
    for entry in manifest["shards"] if shards_here else ():
        shard = layout.shards_dir / entry["name"]
        size = shard.stat().st_size if shard.exists() else None
        if size != entry["bytes"]:
            problems.append(f"shard {entry['name']}: {'missing' if size is None else f'{size} bytes'}, the manifest "
                            f"says {entry['bytes']}")
    listed = {entry["name"] for entry in manifest["shards"]}
    problems += [f"shard {p.name} is not in the manifest" for p in layout.shards()
                 if shards_here and p.name not in listed]
    meta_rows = sum(pq.read_metadata(p).num_rows for p in layout.parts(layout.meta_dir))
    if meta_rows != manifest["counts"]["reshard"]["written"]:
        problems.append(f"meta holds {meta_rows} rows, the manifest says {manifest['counts']['reshard']['written']}")
    return problems


def read_range(url: str, offset: int, size: int, timeout: float = 60.0) -> bytes:
    """`size` bytes at `offset` of a remote shard (an HTTP Range request, or fsspec's ranged cat_file)."""
    if is_url(url, http_only=True):
        req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-{offset + size - 1}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
        if r.status == 200 and len(data) > size:  # a server that ignores Range sends the whole object
            data = data[offset:offset + size]
        return data
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path, start=offset, end=offset + size)


_TAR_BLOCK = 512
_SAMPLE_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key / extension split
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (e.g. __index__)


def _tar_number(field: bytes, where: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError as err:
        raise ValueError(f"{where}: malformed tar header (size field {field!r})") from err


def _read_exact(stream: Any, n: int, where: str) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # http streams may return short reads
        more = stream.read(n - len(data))
        if not more:
            raise ValueError(f"{where}: tar truncated ({len(data)} of {n} bytes of a member)")
        data += more
    return data


def tar_members(stream: Any, where: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file of a tar stream, parsing only the header fields a shard needs.

    tarfile parses every header field in Python and was ~a third of a loader core's CPU after the decode went to
    the GPU. Handles ustar/GNU regular files, directories, GNU long names and pax path/size records; any other
    member type is an error (never skipped silently).
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(_TAR_BLOCK)
        if len(header) < _TAR_BLOCK or header == bytes(_TAR_BLOCK):
            return  # end-of-archive blocks (or a clean end of the stream)
        kind = header[156:157]
        size = int(pax.get("size", 0)) or _tar_number(header[124:136], where)
        data = _read_exact(stream, size, where)
        stream.read(-size % _TAR_BLOCK)
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8")
        elif kind == b"x":
            pax = dict(_pax_records(data))
        elif kind in (b"0", b"\0", b"7"):
            name = pax.get("path") or long_name or _ustar_name(header)
            long_name, pax = None, {}
            yield name, data
        elif kind in (b"5", b"g"):
            long_name, pax = None, {}
        else:
            raise ValueError(f"{where}: unsupported tar member type {kind!r}")


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _pax_records(data: bytes) -> Iterator[tuple[str, str]]:
    for line in data.decode("utf-8").splitlines():
        key_value = line.split(" ", 1)[-1]
        if "=" in key_value:
            key, value = key_value.split("=", 1)
            yield key, value


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """webdataset samples (dicts of members by extension, plus __key__ and __url__) of one shard at `url`, grouped
    as webdataset groups them (consecutive members with the same key; lower-case extensions)."""
    stream = open_location(url)
    where = str(url)
    try:
        sample: dict[str, Any] | None = None
        for name, data in tar_members(stream, where):
            if ("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name):
                continue
            match = _SAMPLE_NAME.match(name)
            if match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": where}
            if ext in sample:
                raise ValueError(f"{where}: duplicate member {name} in one sample")
            sample[ext] = data
        if sample is not None:
            yield sample
    finally:
        stream.close()


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


@dataclass(frozen=True)
class Locator:
    shard: str
    offset: int
    size: int


class BuildReader:
    """Paths, counts, locator and partner lists of one build; cheap to pickle into DataLoader workers.

    Open file handles are kept per process (re-opened after fork) so partner fetches are one seek + read.
    """

    def __init__(self, build_dir: str | os.PathLike, shard_base_url: str | None = None) -> None:
        self.layout = BuildLayout(Path(build_dir))
        self.root = self.layout.root
        if not self.root.is_dir():
            raise FileNotFoundError(f"build folder {self.root} does not exist")
        self.shard_base_url = shard_base_url.rstrip("/") + "/" if shard_base_url else None
        self.shards_dir = self.layout.shards_dir
        self.meta_dir = self.layout.meta_dir
        self.locator_path = self.layout.locator
        self.partners_path = self.layout.partners
        self.manifest_path = self.layout.manifest
        self.shard_paths: list[Path] = self.layout.shards()
        if self.shard_base_url is not None:
            manifest = self.manifest() or {}
            names = sorted(sh["name"] for sh in manifest.get("shards") or [])
            if not names and self.locator_path.exists():  # builds whose manifest has no shard list
                names = sorted(set(pq.read_table(self.locator_path, columns=["shard"])["shard"].to_pylist()))
            if not names:
                raise FileNotFoundError(f"neither {self.manifest_path} nor the locator lists shards to read from "
                                        f"{self.shard_base_url}")
            self.shard_urls: list[str] = [self.shard_base_url + n for n in names]
        else:
            if not self.shard_paths:
                raise FileNotFoundError(f"no shards in {self.shards_dir}")
            self.shard_urls = [str(p) for p in self.shard_paths]
        self._handles: dict[str, Any] = {}
        self._handles_pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        for lazy in ("_locator", "partners", "_sample_ids"):  # large tables are re-read lazily in the worker if needed
            state.pop(lazy, None)
        return state

    # ---- tables (column arrays, not row dicts: a 4M-sample build must fit in every DataLoader worker) ----
    @cached_property
    def _meta_parts(self) -> list[Path]:
        parts = self.layout.parts(self.meta_dir)
        if not parts:
            raise FileNotFoundError(f"no meta parts in {self.meta_dir}")
        return parts

    @cached_property
    def _sample_ids(self) -> np.ndarray:
        ids = np.concatenate([pq.read_table(p, columns=["sample_id"])["sample_id"].to_numpy() for p in self._meta_parts])
        return np.sort(ids.astype(np.int64))

    def meta_rows(self, sample_ids: Sequence[int]) -> list[dict[str, Any]]:
        """Meta rows (caption, entities, entity_words, ...) of the given ids, in the order given."""
        wanted = pa.array(np.asarray(sample_ids, dtype=np.int64))
        rows: dict[int, dict[str, Any]] = {}
        for part in self._meta_parts:
            table = pq.read_table(part)
            table = table.filter(pc.is_in(table["sample_id"], value_set=wanted))
            rows.update({int(r["sample_id"]): r for r in table.to_pylist()})
        missing = [int(s) for s in sample_ids if int(s) not in rows]
        if missing:
            raise KeyError(f"{len(missing)} sample ids not in the build's meta, e.g. {missing[:5]}")
        return [rows[int(s)] for s in sample_ids]

    @cached_property
    def _locator(self) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, np.ndarray]:
        table = pq.read_table(self.locator_path, columns=["sample_id", "shard", "offset", "size"])
        order = np.argsort(table["sample_id"].to_numpy())
        shard_codes = table["shard"].dictionary_encode().combine_chunks()
        return (table["sample_id"].to_numpy()[order], shard_codes.indices.to_numpy()[order],
                shard_codes.dictionary.to_pylist(), table["offset"].to_numpy()[order], table["size"].to_numpy()[order])

    def locate(self, sample_id: int) -> Locator:
        ids, shard_idx, shard_names, offsets, sizes = self._locator
        i = int(np.searchsorted(ids, sample_id))
        if i >= len(ids) or ids[i] != sample_id:
            raise KeyError(f"sample {sample_id} is not in {self.locator_path}")
        return Locator(shard_names[shard_idx[i]], int(offsets[i]), int(sizes[i]))

    @cached_property
    def partners(self) -> dict[int, list[tuple[int, str]]]:
        """index/partners.parquet as {sample_id: [(partner_id, shared_class)] by rank}; only read as a fallback
        for shard json without a "partners" list."""
        if not self.partners_path.exists():
            return {}
        table = pq.read_table(self.partners_path).to_pydict()
        out: dict[int, list[tuple[int, int, str]]] = {}
        for s, r, p, c in zip(table["sample_id"], table["rank"], table["partner_id"], table["shared_class"]):
            out.setdefault(int(s), []).append((int(r), int(p), str(c)))
        return {s: [(p, c) for _, p, c in sorted(v)] for s, v in out.items()}

    def sample_ids(self) -> list[int]:
        return self._sample_ids.tolist()

    def num_samples(self) -> int:
        """Written samples, from the meta table (the manifest's count must agree)."""
        return len(self._sample_ids)

    def split_ids(self, split: str, val_percent: float) -> list[int]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        want_val = split == "val"
        return [s for s in self.sample_ids() if is_val_sample(s, val_percent) == want_val]

    def manifest_sha256(self) -> str | None:
        return sha256_file(self.manifest_path) if self.manifest_path.exists() else None

    def manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    # ---- O(1) image fetch ----
    def _handle(self, shard: str) -> Any:
        if self._handles_pid != os.getpid():  # forked DataLoader worker: never share a file position with the parent
            self._handles = {}
            self._handles_pid = os.getpid()
        f = self._handles.get(shard)
        if f is None:
            f = open(self.shards_dir / shard, "rb")  # noqa: SIM115 - kept open for O(1) fetches; close()
            self._handles[shard] = f
        return f

    def read_jpeg(self, sample_id: int) -> bytes:
        """The JPEG bytes of a sample, by id, via the locator: one seek + one read (a range request when remote)."""
        loc = self.locate(int(sample_id))
        if self.shard_base_url is not None:
            data = read_range(self.shard_base_url + loc.shard, loc.offset, loc.size)
            if len(data) != loc.size:
                raise OSError(f"short read for sample {sample_id} in {loc.shard}: {len(data)} of {loc.size} bytes")
            return data
        f = self._handle(loc.shard)
        f.seek(loc.offset)
        data = f.read(loc.size)
        if len(data) != loc.size:
            raise OSError(f"short read for sample {sample_id} in {loc.shard}: {len(data)} of {loc.size} bytes")
        return data

    def read_image(self, sample_id: int) -> Image.Image:
        return decode_image(self.read_jpeg(sample_id))

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}
