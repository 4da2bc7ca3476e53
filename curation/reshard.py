"""Reshard stage: the final set (kept.parquet) + staged JPEGs + captions + partners -> CC4M webdataset shards.

    shards/cc4m-NNNNNN.tar   per sample, in layout order (curation.shard_order: by growth round, then a seeded
                             permutation of the ids): <12-digit id>.jpg, .txt (caption), .json
    meta/part-NNNNN.parquet  one per shard: sample_id, shard, position, caption, entities, entity_words, width,
                             height, sha256; its parquet metadata is the shard's done record (sha256, bytes, inputs)
    index/locator.parquet    sample_id, shard, position, offset, size: byte range of each .jpg member's data

Deterministic: tar headers carry no time, owner or host (mtime 0, uid/gid 0, empty names, mode 0644, USTAR), JSON is
written with sorted keys, so the same inputs give byte-identical shards on any machine. Atomic and resumable: each
shard is written under a temporary name and renamed, then its meta part (the done record) is written; a shard whose
record matches the current inputs is skipped on a rerun.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import tario
from curation.history import snapshot_written
from curation.io import atomic_path, fingerprint_of, read_parquet, sha256_file, table_digest, write_parquet_atomic
from curation.progress import Progress, ProgressCallback
from curation.shard_order import layout_order
from curation.staging import iter_staged_images
from manifests.layout import PART_GLOB, SHARD_GLOB, BuildLayout, part_name, sample_key, shard_for_rank, shard_name

log = logging.getLogger(__name__)

SHARD_META_KEY = b"cc4m.shard"
ENTITY_WORD = pa.struct([("word", pa.string()), ("class", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
META_SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("shard", pa.string()), ("position", pa.int32()), ("caption", pa.string()),
    ("entities", pa.list_(pa.string())), ("entity_words", pa.list_(ENTITY_WORD)), ("width", pa.int32()),
    ("height", pa.int32()), ("sha256", pa.string()),
])
LOCATOR_SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("shard", pa.string()), ("position", pa.int32()), ("offset", pa.int64()),
    ("size", pa.int64()),
])


@dataclass(frozen=True)
class ShardConfig:
    """samples_per_shard: samples per tar (the last one may hold fewer).
    rehash_existing: on resume, re-hash finished shards against their done record (default: size check only)."""

    samples_per_shard: int = 1000
    rehash_existing: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.samples_per_shard, int) or self.samples_per_shard <= 0:
            raise ValueError(f"ShardConfig.samples_per_shard must be a positive int, got {self.samples_per_shard!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shard_fingerprint(samples: pa.Table, partners: _Partners, lo: int, hi: int, cfg: ShardConfig) -> str:
    """Everything that decides one shard's bytes, by content: its rows (captions, entities, sizes, the stored and
    the original image's sha256) and their partners. A shard the other samples' changes do not touch (a grown
    source adds samples at the end) keeps its fingerprint and is not rewritten."""
    rows = samples.slice(lo, hi - lo)
    return fingerprint_of({"stage": "reshard", "samples_per_shard": cfg.samples_per_shard, "rows": table_digest(rows),
                           "partners": table_digest(partners.rows_for(rows["sample_id"].to_numpy()))})


def _record(meta_path: Path) -> dict[str, Any] | None:
    if not meta_path.exists():
        return None
    raw = (pq.read_schema(meta_path).metadata or {}).get(SHARD_META_KEY)
    return json.loads(raw) if raw else None


def _is_done(layout: BuildLayout, index: int, n_samples: int, fingerprint: str, cfg: ShardConfig) -> bool:
    record = _record(layout.meta_dir / part_name(index))
    shard = layout.shards_dir / shard_name(index)
    if record is None or not shard.exists():
        return False
    if record.get("fingerprint") != fingerprint or record.get("samples") != n_samples:
        return False
    if shard.stat().st_size != record.get("bytes"):
        return False
    return not cfg.rehash_existing or sha256_file(shard) == record.get("sha256")


class _Partners:
    """partners.parquet sorted by (sample_id, rank), validated in bulk, sliced per shard (never one dict per row of a
    40M-row table)."""

    def __init__(self, path: Path, kept: pa.ChunkedArray) -> None:
        table = read_parquet(path, columns=["sample_id", "rank", "partner_id", "shared_class"])
        table = table.sort_by([("sample_id", "ascending"), ("rank", "ascending")])
        bad = pc.or_(pc.or_(pc.invert(pc.is_in(table["sample_id"], value_set=kept)),
                            pc.invert(pc.is_in(table["partner_id"], value_set=kept))),
                     pc.equal(table["sample_id"], table["partner_id"]))
        n_bad = pc.sum(bad).as_py() or 0
        if n_bad:
            example = table.filter(bad).slice(0, 1).to_pylist()[0]
            raise ValueError(f"reshard: {n_bad} bad partner rows (both must be kept samples, never the same one), "
                             f"e.g. {example}")
        self.table = table
        self.ids = table["sample_id"].to_numpy()

    def rows_for(self, sample_ids: np.ndarray) -> pa.Table:
        """The partner rows of `sample_ids` (one shard's, any order), by ascending sample id and rank."""
        wanted = np.sort(np.asarray(sample_ids, dtype=np.int64))
        lo = np.searchsorted(self.ids, wanted, side="left")
        hi = np.searchsorted(self.ids, wanted, side="right")
        take = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]) if len(wanted) else np.zeros(0, np.int64)
        return self.table.take(pa.array(take.astype(np.int64)))

    def for_ids(self, sample_ids: np.ndarray) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        chunk = self.rows_for(sample_ids)
        for sid, pid, cls in zip(*(chunk[c].to_pylist() for c in ("sample_id", "partner_id", "shared_class"))):
            out.setdefault(sid, []).append({"partner_id": pid, "shared_class": cls})
        return out


def _load_inputs(layout: BuildLayout) -> tuple[pa.Table, _Partners]:
    """One table of kept samples in layout order (curation.shard_order; caption, entities, entity_words, width,
    height, expected sha256) and their partners."""
    for path in (layout.kept, layout.partners, layout.downloads):
        if not path.exists():
            raise FileNotFoundError(f"reshard: missing input {path}")
    kept_table = read_parquet(layout.kept)
    kept = kept_table["sample_id"].cast(pa.int64())
    ids = kept.to_numpy()
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
        raise ValueError(f"reshard: {layout.kept} must hold unique sample ids in ascending order")

    selected = pa.concat_tables(
        read_parquet(p, columns=["sample_id", "caption", "entities", "entity_words"])
        for p in layout.parts(layout.selected_dir)
    )
    selected = selected.filter(pc.is_in(selected["sample_id"], value_set=kept)).sort_by("sample_id")
    downloads = read_parquet(layout.downloads, columns=["sample_id", "status", "width", "height", "sha256"])
    downloads = downloads.filter(pc.is_in(downloads["sample_id"], value_set=kept)).sort_by("sample_id")
    for name, table in (("selected parts", selected), ("downloads.parquet", downloads)):
        if table.num_rows != len(ids) or not pc.all(pc.equal(table["sample_id"], kept)).as_py():
            raise ValueError(f"reshard: {name} do not hold exactly the kept samples ({table.num_rows} vs {len(ids)})")
    bad = pc.sum(pc.not_equal(downloads["status"], "success")).as_py() or 0
    if bad:
        raise ValueError(f"reshard: {bad} kept samples are not successful downloads")

    samples = pa.table({
        "sample_id": kept, "caption": selected["caption"], "entities": selected["entities"],
        "entity_words": selected["entity_words"].cast(pa.list_(ENTITY_WORD)), "width": downloads["width"],
        "height": downloads["height"],
        # dedup's hash of the stored JPEG (img2dataset's own sha256 is of the original download, before resizing);
        # null when dedup did not hash, then the shard's bytes are only hashed, not checked.
        "expected_sha256": (kept_table["sha256"].cast(pa.string()) if "sha256" in kept_table.column_names
                            else pa.nulls(len(ids), pa.string())),
        # img2dataset's hash of the original download: pins the image in the shard's fingerprint even when dedup
        # did not hash the stored bytes.
        "download_sha256": downloads["sha256"].cast(pa.string()),
    })

    return samples.take(pa.array(layout_order(layout.root, ids))), _Partners(layout.partners, kept)


def _write_shard(layout: BuildLayout, index: int, rows: list[dict], images: dict[int, bytes],
                 all_partners: _Partners, fingerprint: str) -> None:
    name = shard_name(index)
    partners = all_partners.for_ids(np.array([r["sample_id"] for r in rows], dtype=np.int64))
    final = layout.shards_dir / name
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        tar = tario.ShardWriter(fh)
        for row in rows:
            sid = row["sample_id"]
            key = sample_key(sid)
            jpg = images[sid]
            row["sha256"] = hashlib.sha256(jpg).hexdigest()
            if row["expected_sha256"] is not None and row["sha256"] != row["expected_sha256"]:
                raise ValueError(f"reshard: staged image of sample {sid} does not match kept.parquet's sha256")
            doc = {
                "sample_id": sid, "entities": row["entities"], "entity_words": row["entity_words"],
                "partners": partners.get(sid, []), "width": row["width"], "height": row["height"],
            }
            for ext, data in (("jpg", jpg), ("txt", row["caption"].encode("utf-8")),
                              ("json", json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8"))):
                tar.add(f"{key}.{ext}", data)
        tar.close()
    meta = pa.Table.from_pylist(
        [{"sample_id": r["sample_id"], "shard": name, "position": pos, "caption": r["caption"],
          "entities": r["entities"], "entity_words": r["entity_words"], "width": r["width"], "height": r["height"],
          "sha256": r["sha256"]} for pos, r in enumerate(rows)],
        schema=META_SCHEMA,
    )
    record = {"fingerprint": fingerprint, "shard": name, "samples": len(rows), "bytes": final.stat().st_size,
              "sha256": sha256_file(final)}
    write_parquet_atomic(layout.meta_dir / part_name(index),
                         meta.replace_schema_metadata({SHARD_META_KEY: json.dumps(record, sort_keys=True).encode()}))
    log.info("reshard: wrote %s (%d samples, %d bytes)", name, len(rows), record["bytes"])


def _write_shards(layout: BuildLayout, samples: pa.Table, partners: _Partners, bounds: list[tuple[int, int]],
                  fingerprints: list[str], todo: list[int], cfg: ShardConfig,
                  progress: ProgressCallback | None) -> None:
    """Write the `todo` shards. Staged images arrive in ascending sample_id order, but a shard holds ids from all
    over its round: each image is spilled to its shard's file in a scratch folder, and a shard is written (and its
    spill removed) as soon as all its images are there. Memory: one shard's images."""
    layout.shards_dir.mkdir(parents=True, exist_ok=True)
    ids = samples["sample_id"].to_pylist()
    shard_of = {sid: shard_for_rank(rank, cfg.samples_per_shard)[0] for rank, sid in enumerate(ids)}
    wanted = {sid for i in todo for sid in ids[bounds[i][0]:bounds[i][1]]}
    spill_dir = layout.staging_dir / "_reshard_spill"
    shutil.rmtree(spill_dir, ignore_errors=True)  # a killed run's leftovers
    spill_dir.mkdir(parents=True)
    arrived = dict.fromkeys(todo, 0)
    meter = Progress("reshard", len(wanted), "sample", progress)
    for sid, jpg in iter_staged_images(layout.root, sample_ids=sorted(wanted)):
        index = shard_of[sid]
        with open(spill_dir / f"{index}.bin", "ab") as fh:
            fh.write(sid.to_bytes(8, "little") + len(jpg).to_bytes(8, "little") + jpg)
        arrived[index] += 1
        lo, hi = bounds[index]
        if arrived[index] == hi - lo:
            images = _read_spill(spill_dir / f"{index}.bin")
            _write_shard(layout, index, samples.slice(lo, hi - lo).to_pylist(), images, partners, fingerprints[index])
            (spill_dir / f"{index}.bin").unlink()
            meter.advance(hi - lo)
    missing = sorted(i for i in todo if arrived[i] != bounds[i][1] - bounds[i][0])
    shutil.rmtree(spill_dir, ignore_errors=True)
    if missing:
        raise ValueError(f"reshard: staged images missing for shards {missing}")
    meter.finish()


def _read_spill(path: Path) -> dict[int, bytes]:
    data, images, pos = path.read_bytes(), {}, 0
    while pos < len(data):
        sid, size = int.from_bytes(data[pos:pos + 8], "little"), int.from_bytes(data[pos + 8:pos + 16], "little")
        images[sid] = data[pos + 16:pos + 16 + size]
        pos += 16 + size
    return images


def shard_locator(path: Path) -> list[tuple[int, int, int]]:
    """(sample_id, offset, size) of every .jpg member's data in one shard, in member order (reads headers only)."""
    return [(int(name[: -len(".jpg")]), offset, size) for name, offset, size in tario.scan(path)
            if name.endswith(".jpg")]


def reshard(build_dir: str | Path, cfg: ShardConfig, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """kept + staging + partners -> shards/, meta/, index/locator.parquet. Returns {"written", "shards",
    "shards_written", "shards_skipped", "samples_per_shard", "skipped"}."""
    layout = BuildLayout(Path(build_dir))
    samples, partners = _load_inputs(layout)
    n = samples.num_rows
    n_shards = -(-n // cfg.samples_per_shard)
    bounds = [(i * cfg.samples_per_shard, min(n, (i + 1) * cfg.samples_per_shard)) for i in range(n_shards)]
    fingerprints = [_shard_fingerprint(samples, partners, lo, hi, cfg) for lo, hi in bounds]
    fingerprint = fingerprint_of(fingerprints)  # the locator's: all shards
    todo = [i for i, (lo, hi) in enumerate(bounds) if not _is_done(layout, i, hi - lo, fingerprints[i], cfg)]

    # Outputs of an older, larger plan must not linger: they would be read as part of this build.
    stale = [path for directory, pattern, namer in ((layout.shards_dir, SHARD_GLOB, shard_name),
                                                    (layout.meta_dir, PART_GLOB, part_name))
             for path in (sorted(directory.glob(pattern)) if directory.exists() else ())
             if path.name not in {namer(i) for i in range(n_shards)}]

    if todo or stale:
        snapshot_written(layout)  # the finished build's ids, before anything of it is rewritten (curation.history)
    for path in stale:
        log.warning("reshard: removing stale %s", path)
        path.unlink()
    if todo:
        _write_shards(layout, samples, partners, bounds, fingerprints, todo, cfg, progress)

    locator_meta = (pq.read_schema(layout.locator).metadata or {}) if layout.locator.exists() else {}
    if todo or json.loads(locator_meta.get(SHARD_META_KEY, b"{}")).get("fingerprint") != fingerprint:
        rows: dict[str, list] = {name: [] for name in LOCATOR_SCHEMA.names}
        for i in range(n_shards):
            name = shard_name(i)
            for pos, (sid, offset, size) in enumerate(shard_locator(layout.shards_dir / name)):
                for col, value in zip(LOCATOR_SCHEMA.names, (sid, name, pos, offset, size)):
                    rows[col].append(value)
        if rows["sample_id"] != samples["sample_id"].to_pylist():
            raise ValueError("reshard: shards do not hold exactly the kept samples in layout order")
        locator = pa.table(rows, schema=LOCATOR_SCHEMA).replace_schema_metadata(
            {SHARD_META_KEY: json.dumps({"fingerprint": fingerprint}).encode()})
        write_parquet_atomic(layout.locator, locator)

    return {"written": n, "shards": n_shards, "shards_written": len(todo), "shards_skipped": n_shards - len(todo),
            "samples_per_shard": cfg.samples_per_shard, "skipped": not todo}
