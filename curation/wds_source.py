"""Webdataset sources: build CC4M from a crawl already made (pixparse/cc12m-wds, or your own img2dataset output).

A source is a folder of `.tar` shards, a glob (`/data/cc12m/*.tar`) or a brace pattern
(`/data/cc12m/cc12m-{00000..01242}.tar`, also `http(s)://host/cc12m-{00000..01242}.tar`). Each sample is the tar
members sharing a key: `<key>.jpg` (or .jpeg/.png/.webp), `<key>.txt` (the caption) and optionally `<key>.json`
(img2dataset's: `url`, `caption`, ...). Nothing is downloaded from the URLs: the image bytes come from the shard.

`WebDatasetSource` is this kind's curation.source.Source. Its two steps replace ingest and download of a TSV
build, with the same outputs, so every later stage is unchanged:

- `ingest_wds`: one ingest part per source shard (part index = shard index) with sample_id, url, caption,
  source_shard, source_key; a rejects part per shard with the reason of every sample that cannot be used
  (`empty_caption`, `bad_utf8`, `caption_too_long`, `no_image`, `duplicate_key`).
- `extract_selected`: for the selected samples, the image bytes through `curation.imaging.to_stored_jpeg` (EXIF,
  pixel cap, resize as configured) into `staging/NNNNN.tar` + `NNNNN.parquet` + `NNNNN_stats.json` and
  downloads.parquet, the layout `curation.staging.iter_staged_images` and the verify stage read. An image that
  cannot be stored is a `failed_to_resize` row whose error names the reason (`undecodable: ...`).

Sample ids (stable across reruns): the img2dataset key as a number when it is all digits (at most 15 of them:
cc12m-wds keys are 9), otherwise POSITIONAL_BASE + shard index * SHARD_STRIDE + position in the shard (counting
every sample), a range numeric keys never reach. Two samples with one id are refused with a clear error.

Why the shards are streamed twice (ingest, then extraction of the selected ones) rather than copied once: copying
the whole crawl into the build would double its disk use, while a second sequential read is cheap for local shards.
For an http source, mirror the shards locally first if the link is slow. The extraction checks each shard's sha256
against the one recorded at ingest, so a shard changed in between is an error, not a silent mix.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import re
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from braceexpand import braceexpand

from curation import tario
from curation.download import DownloadConfig
from curation.fetch import is_transient, reason_of
from curation.imagehash import STORED_HASH_FIELDS, stored_hashes
from curation.imaging import ImageRejected, ImageSpec, to_stored_jpeg
from curation.ingest import DONE_MARKER, REJECT_SCHEMA, IngestConfig, SourceError
from curation.io import (
    fingerprint_of,
    read_json,
    read_parquet,
    table_digest,
    with_unit_record,
    write_json_atomic,
    write_parquet_atomic,
)
from curation.progress import Progress, ProgressCallback
from curation.staging import DOWNLOADS_META_KEY, DOWNLOADS_SCHEMA, STATUSES, TIMESTAMP, with_stored_hashes
from manifests.layout import BuildLayout, part_name
from manifests.locations import is_url, open_location

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_NUMERIC_KEY_DIGITS = 15
POSITIONAL_BASE = 10**15
SHARD_STRIDE = 10**6  # samples per shard at most (cc12m-wds has ~10k)
WDS_REJECT_REASONS = ("empty_caption", "bad_utf8", "caption_too_long", "no_image", "duplicate_key")
SHARD_META_KEY = b"cc4m.wds_shard"
HTTP_TIMEOUT_S = 60

WDS_INGEST_SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("url", pa.string()), ("caption", pa.string()), ("source_shard", pa.string()),
    ("source_key", pa.string()),
])
STAGED_SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), *STORED_HASH_FIELDS,
])


# ------------------------------------------------------------------------------------------------ naming the shards
def is_wds_source(source: str | Path) -> bool:
    """A folder, a `.tar` file or glob, or a brace pattern: a webdataset source (a TSV/parquet otherwise)."""
    text = str(source).strip()
    if not text:
        return False  # Path("") would be the working directory
    if re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", text):
        return True
    if text.split("?", 1)[0].endswith(".tar"):
        return True
    return not is_url(text) and Path(text).is_dir()


def expand_shards(source: str | Path) -> list[str]:
    """The shards of a source, in the order that fixes shard indexes: brace order as written, else sorted names."""
    text = str(source)
    if not is_url(text) and Path(text).is_dir():
        shards = sorted(str(p) for p in Path(text).glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"webdataset source {text}: the folder holds no .tar shards")
        return shards
    shards = []
    for item in braceexpand(text):
        if is_url(item):
            shards.append(item)
        elif glob.has_magic(item):
            found = sorted(glob.glob(item))
            if not found:
                raise FileNotFoundError(f"webdataset source {text}: no shard matches {item}")
            shards += found
        else:
            shards.append(item)
    missing = [s for s in shards if not is_url(s) and not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"webdataset source {text}: {len(missing)} shard(s) not found, e.g. {missing[:3]}")
    if len(set(shards)) != len(shards):
        raise ValueError(f"webdataset source {text} names a shard twice")
    return shards


class WebDatasetSource:
    """A crawl already made, as webdataset shards (the module docstring): the curation.source.Source of a crawl.
    Its ingest reads the shards' captions; its materialization extracts the selected images from the shards."""

    def __init__(self, source: str) -> None:
        self.location = source

    def check(self) -> None:
        try:
            expand_shards(self.location)
        except (OSError, ValueError) as exc:
            raise SourceError(f"{exc}. Check the shard folder, glob or brace pattern") from exc

    def absolute_location(self) -> str:
        # absolute(), not resolve(): a glob or brace pattern stays as written
        return self.location if is_url(self.location) else str(Path(self.location).absolute())

    def remote_copy(self, build_dir: str | Path) -> Path | None:
        return None  # never fetched whole: ingest and extraction stream the shards

    def ingest(self, build_dir: str | Path, cfg: IngestConfig, progress: ProgressCallback | None = None,
               processes: int = 1) -> dict[str, Any]:
        return ingest_wds(self.location, build_dir, cfg, progress, processes)

    def materialize(self, build_dir: str | Path, cfg: DownloadConfig, progress: ProgressCallback | None = None,
                    parts: Any = None) -> dict[str, Any]:
        return extract_selected(build_dir, cfg, progress)  # reads the shards here: `parts` (Dask) is not used


class _HashingReader:
    """A read-only stream that hashes what passes through it (the shard's sha256 at no extra read)."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.digest, self.bytes = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:  # tarfile stops at the end-of-archive blocks; hash the padding after them too
        while self.read(1 << 20):
            pass


@contextmanager
def hashed_shard(shard: str) -> Iterator[_HashingReader]:
    """Stream a local or remote shard (manifests.locations), hashing what is read."""
    raw = open_location(shard, timeout=HTTP_TIMEOUT_S)
    try:
        yield _HashingReader(raw)
    finally:
        raw.close()


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name, the extension the rest."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_shard_samples(stream: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in tar order; members of one sample are consecutive in webdataset."""
    key, files = None, {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, ext = _split_name(member.name)
            if member_key != key:
                if key is not None:
                    yield key, files
                key, files = member_key, {}
            files[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, files


# --------------------------------------------------------------------------------------------------------- ingest
def positional_id(shard_index: int, position: int) -> int:
    if position >= SHARD_STRIDE:
        raise ValueError(f"shard {shard_index} has more than {SHARD_STRIDE} samples: positional ids would collide")
    return POSITIONAL_BASE + shard_index * SHARD_STRIDE + position


def sample_id_for(key: str, shard_index: int, position: int) -> int:
    """The img2dataset key when numeric, else the positional id (see the module docstring)."""
    base = key.rpartition("/")[2]
    if base.isdigit() and len(base) <= MAX_NUMERIC_KEY_DIGITS:
        return int(base)
    return positional_id(shard_index, position)


def _caption(files: dict[str, bytes]) -> tuple[str | None, str | None, str | None]:
    """(caption, url, reject reason)."""
    meta: dict[str, Any] = {}
    if "json" in files:
        try:
            loaded = json.loads(files["json"])
            meta = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            meta = {}
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    if "txt" in files:
        try:
            caption = files["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return None, url, "bad_utf8"
    else:
        caption = meta.get("caption") if isinstance(meta.get("caption"), str) else ""
    return caption.strip(), url, None


def _shard_rows(shard: str, index: int, cfg: IngestConfig) -> tuple[list[dict], list[dict], dict[str, Any]]:
    ok: list[dict] = []
    bad: list[dict] = []
    seen: set[str] = set()
    with hashed_shard(shard) as stream:
        for position, (key, files) in enumerate(iter_shard_samples(stream)):
            sid = sample_id_for(key, index, position)
            caption, url, reason = _caption(files)
            if key in seen:  # a repeated key: rejected under its positional id, which no other sample has
                reason, sid = "duplicate_key", positional_id(index, position)
            elif reason is None and not caption:
                reason = "empty_caption"
            elif reason is None and len(caption) > cfg.max_caption_chars:
                reason = "caption_too_long"
            elif reason is None and not any(ext in files for ext in IMAGE_EXTS):
                reason = "no_image"
            seen.add(key)
            if reason:
                raw = f"{Path(shard).name}:{key}: members {sorted(files)}"[: cfg.raw_chars_kept]
                bad.append({"sample_id": sid, "line": position + 1, "raw": raw, "reason": reason})
            else:
                ok.append({"sample_id": sid, "url": url, "caption": caption, "source_shard": shard,
                           "source_key": key})
        stream.drain()
    return ok, bad, {"shard": shard, "sha256": stream.digest.hexdigest(), "bytes": stream.bytes}


def _write_shard_part(layout: BuildLayout, index: int, ok: list[dict], bad: list[dict], info: dict) -> None:
    meta = {SHARD_META_KEY: json.dumps(info, sort_keys=True).encode()}
    rejects = pa.Table.from_pylist(bad, schema=REJECT_SCHEMA).sort_by("sample_id")
    ingested = pa.Table.from_pylist(ok, schema=WDS_INGEST_SCHEMA).sort_by("sample_id")
    # Rejects first: the ingest part's presence marks the shard as done (as for a TSV).
    write_parquet_atomic(layout.rejects_dir / part_name(index), rejects)
    # Its unit record makes the next stages content-addressed (curation.parse.part_fingerprint) as for a TSV source.
    fingerprint = fingerprint_of({"stage": "ingest-wds", "ingested": table_digest(ingested),
                                  "rejects": table_digest(rejects)})
    write_parquet_atomic(layout.ingest_dir / part_name(index),
                         with_unit_record(ingested.replace_schema_metadata(meta), fingerprint))


def _recorded_shard(layout: BuildLayout, index: int, shard: str) -> dict[str, Any] | None:
    """The shard info of a finished part for this shard, or None (not done, or made from another shard)."""
    part, rejects = layout.ingest_dir / part_name(index), layout.rejects_dir / part_name(index)
    if not (part.exists() and rejects.exists()):
        return None
    info = json.loads((pq.read_schema(part).metadata or {}).get(SHARD_META_KEY, b"{}"))
    return info if info.get("shard") == shard else None


def _check_unique_ids(layout: BuildLayout, parts: list[str]) -> None:
    ids = pa.chunked_array(
        [read_parquet(d / p, columns=["sample_id"])["sample_id"].combine_chunks()
         for p in parts for d in (layout.ingest_dir, layout.rejects_dir)], pa.int64())
    if len(pc.unique(ids)) != len(ids):
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")[0].as_py()
        raise ValueError(f"webdataset source: sample id {dup} occurs in more than one sample (two shards with the "
                         f"same numeric key?); the ids would not be unique. Remove the duplicate shard.")


def _ingest_one(job: tuple[str, str, int, IngestConfig]) -> dict[str, Any]:
    build_dir, shard, index, cfg = job
    ok, bad, info = _shard_rows(shard, index, cfg)
    _write_shard_part(BuildLayout(Path(build_dir)), index, ok, bad, info)
    return info


def ingest_wds(source: str, build_dir: str | Path, cfg: IngestConfig | None = None,
               progress: ProgressCallback | None = None, processes: int = 1) -> dict[str, Any]:
    """Every source shard -> ingest/part-<shard index> + rejects/part-<shard index>; returns the ingest counts.
    Resumable per shard; a finished ingest of the same shards returns its recorded counts. `processes` shards are
    read at once (the build passes download.processes_count: for this source, reading shards is the download)."""
    cfg = cfg or IngestConfig()
    layout = BuildLayout(Path(build_dir))
    shards = expand_shards(source)
    identity = {"source_kind": "webdataset", "shards": shards,
                "content_config": {k: v for k, v in cfg.to_dict().items() if k != "progress"}}
    done_path = layout.ingest_dir / DONE_MARKER
    if done_path.exists():
        recorded = read_json(done_path)
        if {k: recorded.get(k) for k in identity} != identity:
            raise ValueError(f"{layout.root} already holds an ingest of a different source or settings; "
                             f"use a fresh build folder")
        result = recorded["result"]
        if all(_recorded_shard(layout, i, s) for i, s in enumerate(shards)):
            return result
    for directory in (layout.ingest_dir, layout.rejects_dir):
        stale = {p.name for p in layout.parts(directory)} - {part_name(i) for i in range(len(shards))}
        if stale:
            raise ValueError(f"{directory} holds parts of another source ({sorted(stale)[:3]}); use a fresh folder")

    meter = Progress("ingest", len(shards), "shard", progress)
    infos = [_recorded_shard(layout, i, s) for i, s in enumerate(shards)]
    meter.advance(sum(info is not None for info in infos))
    todo = [(str(layout.root), s, i, cfg) for i, (s, info) in enumerate(zip(shards, infos)) if info is None]
    for job, info in zip(todo, _map(_ingest_one, todo, processes)):
        infos[job[2]] = info
        meter.advance()
    meter.finish()
    parts = [part_name(i) for i in range(len(shards))]
    _check_unique_ids(layout, parts)

    reasons: Counter[str] = Counter()
    ingested = 0
    for part in parts:
        reasons.update(read_parquet(layout.rejects_dir / part, columns=["reason"])["reason"].to_pylist())
        ingested += pq.read_metadata(layout.ingest_dir / part).num_rows
    rejected = sum(reasons.values())
    result = {
        "source": str(source), "source_kind": "webdataset",
        # One digest for the whole source: sha256 of the shards' own (name, sha256) list.
        "source_sha256": hashlib.sha256(json.dumps([[i["shard"], i["sha256"]] for i in infos]).encode()).hexdigest(),
        "source_shards": len(shards), "source_rows": ingested + rejected, "read": ingested + rejected,
        "ingested": ingested, "rejected": rejected, "rejects_by_reason": dict(sorted(reasons.items())),
        "parts": parts,
    }
    write_json_atomic(done_path, {**identity, "result": result})
    return result


def _map(fn: Callable[[Any], Any], jobs: list[Any], processes: int) -> Iterator[Any]:
    """fn over jobs, in order: in this process, or in `processes` worker processes (one shard per job)."""
    if processes <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    # spawn: a forked copy of a Prefect worker or a threaded caller is not safe; fn is importable.
    with ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn")) as pool:
        yield from pool.map(fn, jobs)


# ----------------------------------------------------------------------------------------------------- extraction
@dataclass(frozen=True)
class _ShardJob:
    name: str  # staging shard name: rank of the shard's first selected id, so staging names follow id order
    shard: str
    sha256: str
    wanted: dict[str, int]  # source key -> sample_id
    staging_dir: str
    spec: ImageSpec
    fingerprint: str


def _stage_done(job: _ShardJob) -> bool:
    stats = Path(job.staging_dir) / f"{job.name}_stats.json"
    return stats.exists() and read_json(stats).get("cc4m_fingerprint") == job.fingerprint


def _extract_one(job: _ShardJob) -> int:
    """Stream one source shard; write staging NNNNN.tar (+ .parquet, then _stats.json last). Returns rows written."""
    staging, name = Path(job.staging_dir), job.name
    rows: list[dict[str, Any]] = []
    extracted: set[str] = set()
    started = time.perf_counter()
    with hashed_shard(job.shard) as stream, tario.write_tar(staging / f"{name}.tar") as tar:
        for key, files in iter_shard_samples(stream):
            sid = job.wanted.get(key)
            if sid is None or key in extracted:  # a repeated key: ingest kept its first sample only
                continue
            extracted.add(key)
            data = next(files[ext] for ext in IMAGE_EXTS if ext in files)
            row = {"sample_id": sid, "key": key, "sha256": hashlib.sha256(data).hexdigest()}
            try:
                stored = to_stored_jpeg(data, job.spec)
            except ImageRejected as err:
                rows.append({**row, "status": "failed_to_resize", "error_message": str(err)[:500], "sha256": None})
                continue
            tar.add(f"{key}.jpg", stored.jpeg)
            stored_sha256, stored_phash = stored_hashes(stored.jpeg)  # here, in the parallel workers (see dedup)
            rows.append({**row, "status": "success", "error_message": None, "width": stored.width,
                         "height": stored.height, "stored_sha256": stored_sha256, "stored_phash": stored_phash})
        stream.drain()
    if stream.digest.hexdigest() != job.sha256:
        raise ValueError(f"source shard {job.shard} changed since ingest (sha256 {stream.digest.hexdigest()} != "
                         f"{job.sha256}); rebuild in a fresh folder")
    lost = sorted(set(job.wanted) - {r["key"] for r in rows})
    if lost:
        raise ValueError(f"source shard {job.shard} lacks selected samples {lost[:5]}")
    write_parquet_atomic(staging / f"{name}.parquet", pa.Table.from_pylist(rows, schema=STAGED_SCHEMA))
    statuses = Counter(r["status"] for r in rows)
    write_json_atomic(staging / f"{name}_stats.json", {
        "count": len(rows), "successes": statuses["success"], "failed_to_download": 0,
        "failed_to_resize": statuses["failed_to_resize"], "duration": round(time.perf_counter() - started, 3),
        "status_dict": dict(Counter(r["error_message"].split(":")[0] for r in rows if r["error_message"])),
        "source_shard": job.shard, "cc4m_fingerprint": job.fingerprint,
    })
    return len(rows)


def _selected_sources(layout: BuildLayout) -> pa.Table:
    """sample_id, url, source_shard, source_key of every selected sample, in sample_id order."""
    parts = layout.parts(layout.selected_dir)
    if not parts:
        raise FileNotFoundError(f"extract: no selected parts in {layout.selected_dir} (run select first)")
    selected = pa.concat_tables(read_parquet(p, columns=["sample_id"]) for p in parts)
    ingest = pa.concat_tables(
        read_parquet(p, columns=["sample_id", "url", "source_shard", "source_key"])
        for p in layout.parts(layout.ingest_dir))
    table = selected.join(ingest, keys="sample_id", join_type="inner").sort_by("sample_id")
    if table.num_rows != selected.num_rows:
        raise ValueError(f"extract: {selected.num_rows - table.num_rows} selected samples have no ingest row")
    return table


def _shard_infos(layout: BuildLayout) -> dict[str, tuple[int, str]]:
    """source shard -> (shard index, sha256 recorded at ingest)."""
    out = {}
    for index, part in enumerate(layout.parts(layout.ingest_dir)):
        info = json.loads((pq.read_schema(part).metadata or {}).get(SHARD_META_KEY, b"{}"))
        if not info:
            raise ValueError(f"extract: {part} was not made from a webdataset source")
        out[info["shard"]] = (index, info["sha256"])
    return out


def extract_selected(build_dir: str | Path, cfg: DownloadConfig,
                     progress: ProgressCallback | None = None) -> dict[str, Any]:
    """The download stage of a webdataset build: selected samples' images from the source shards -> staging/ and
    downloads.parquet (one row per selected sample). Idempotent and resumable per source shard. `processes_count`
    shards are extracted in parallel. Returns counts shaped like `download_selected`'s."""
    layout = BuildLayout(Path(build_dir))
    staging = layout.staging_dir
    selected = _selected_sources(layout)
    spec = ImageSpec(image_size=cfg.image_size, resize_mode=cfg.resize_mode, encode_quality=cfg.encode_quality)
    infos = _shard_infos(layout)
    ids_digest = hashlib.sha256(selected["sample_id"].to_numpy().tobytes()).hexdigest()
    fingerprint = hashlib.sha256(json.dumps(
        {"ids": ids_digest, "spec": spec.__dict__, "shards": sorted(infos.items())}, sort_keys=True).encode()
    ).hexdigest()

    if layout.downloads.exists():
        recorded = json.loads((pq.read_schema(layout.downloads).metadata or {}).get(DOWNLOADS_META_KEY, b"{}"))
        if recorded.get("fingerprint") == fingerprint:
            return {**recorded["counts"], "skipped": True}
    marker = staging / "extract.json"
    if staging.exists() and (not marker.exists() or read_json(marker).get("fingerprint") != fingerprint):
        log.warning("extract: staging was made from other inputs or settings, discarding %s", staging)
        shutil.rmtree(staging)
        layout.downloads.unlink(missing_ok=True)
    staging.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"fingerprint": fingerprint})

    wanted: dict[str, dict[str, int]] = {}
    for sid, shard, key in zip(*(selected[c].to_pylist() for c in ("sample_id", "source_shard", "source_key"))):
        wanted.setdefault(shard, {})[key] = sid
    jobs = _plan_jobs(wanted, infos, str(staging), spec, fingerprint)
    todo = [job for job in jobs if not _stage_done(job)]
    started = time.perf_counter()
    meter = Progress("extract", selected.num_rows, "image", progress)
    meter.advance(sum(len(j.wanted) for j in jobs) - sum(len(j.wanted) for j in todo))
    _run_jobs(todo, cfg.processes_count, meter)
    meter.finish()

    counts, table = _collect(layout, selected, [j.name for j in jobs], cfg,
                             time.perf_counter() - started)
    meta = {DOWNLOADS_META_KEY: json.dumps({"fingerprint": fingerprint, "counts": counts}, sort_keys=True).encode()}
    write_parquet_atomic(layout.downloads, table.replace_schema_metadata(meta))
    return {**counts, "skipped": False}


def _plan_jobs(wanted: dict[str, dict[str, int]], infos: dict[str, tuple[int, str]], staging: str, spec: ImageSpec,
               fingerprint: str) -> list[_ShardJob]:
    """One job per source shard with selected samples, named in ascending id order. Later stages read staging
    shards by name expecting ascending sample ids (curation.staging.iter_staged_images), so shards whose id
    ranges interleave are refused (img2dataset keys are shard * 10^k + row: they never do)."""
    ordered = sorted(wanted.items(), key=lambda kv: min(kv[1].values()))
    for (a, keys_a), (b, keys_b) in itertools.pairwise(ordered):
        if max(keys_a.values()) >= min(keys_b.values()):
            raise ValueError(f"webdataset source: the sample ids of shards {a} and {b} interleave; CC4M needs each "
                             f"shard to hold its own id range (img2dataset keys do)")
    return [_ShardJob(f"{rank:05d}", shard, infos[shard][1], keys, staging, spec, fingerprint)
            for rank, (shard, keys) in enumerate(ordered)]


def _run_jobs(jobs: list[_ShardJob], processes: int, meter: Progress) -> None:
    for rows in _map(_extract_one, jobs, processes):
        meter.advance(rows)


def _collect(layout: BuildLayout, selected: pa.Table, names: list[str], cfg: DownloadConfig,
             seconds: float) -> tuple[dict[str, Any], pa.Table]:
    staging = layout.staging_dir
    staged = [with_stored_hashes(read_parquet(staging / f"{n}.parquet")).append_column(
        "staging_shard", pa.array([n] * pq.read_metadata(staging / f"{n}.parquet").num_rows, pa.string()))
        for n in names]
    rows = pa.concat_tables(staged) if staged else STAGED_SCHEMA.append(pa.field("staging_shard", pa.string()))\
        .empty_table()
    joined = selected.select(["sample_id", "url"]).join(rows, keys="sample_id", join_type="inner").sort_by("sample_id")
    if joined.num_rows != selected.num_rows:
        raise AssertionError(f"extract: {selected.num_rows} selected but {joined.num_rows} staged rows")
    # The download layout's failure class columns: an image that cannot be stored is a permanent failure (reason
    # undecodable or too_many_pixels, from the message), and extraction is one attempt, made now.
    reasons = [None if e is None else reason_of(e) for e in joined["error_message"].to_pylist()]
    now = pa.scalar(datetime.now(UTC), TIMESTAMP)
    attempted_at = pa.array([now.as_py()] * joined.num_rows, TIMESTAMP)
    table = pa.table({
        "sample_id": joined["sample_id"], "url": joined["url"], "status": joined["status"],
        "reason": pa.array(reasons, pa.string()),
        "transient": pa.array([None if r is None else is_transient(r) for r in reasons], pa.bool_()),
        "error_message": joined["error_message"], "width": joined["width"], "height": joined["height"],
        "sha256": joined["sha256"], "attempts": pa.array([1] * joined.num_rows, pa.int32()),
        "first_attempt_at": attempted_at, "last_attempt_at": attempted_at,
        "staging_shard": joined["staging_shard"], "staging_key": joined["key"],
        "stored_sha256": joined["stored_sha256"], "stored_phash": joined["stored_phash"],
    }, schema=DOWNLOADS_SCHEMA)
    statuses = Counter(table["status"].to_pylist())
    by_status = {s: statuses.get(s, 0) for s in STATUSES}
    errors = Counter(e for e in table["error_message"].to_pylist() if e)
    counts = {
        "selected": selected.num_rows, **by_status, "failed": selected.num_rows - by_status["success"],
        "failed_by_reason": dict(sorted(Counter(r for r in reasons if r is not None).items())),
        "failed_by_status": {s: by_status[s] for s in STATUSES[1:]},
        "errors": dict(errors.most_common(50)),
        "staging_shards": [{"shard": n, **{k: v for k, v in read_json(staging / f"{n}_stats.json").items()
                                           if k in ("count", "successes", "failed_to_resize", "source_shard")}}
                           for n in names],
        "download_seconds": round(seconds, 3), "source": "webdataset",
        "settings": {"image_size": cfg.image_size, "resize_mode": cfg.resize_mode,
                     "processes_count": cfg.processes_count},
    }
    return counts, table
