"""The download's staging folder, read: its layout (rounds and finished shards), its schemas, and the readers that
verify, dedup, reshard, the manifest and the invariants use.

    staging/                      the first round: img2dataset's (or the webdataset extraction's) output
      urls.parquet                the rows this round asked for (sample_id, url, caption), sorted by sample_id
      NNNNN.tar / .parquet        one finished shard: images (<key>.jpg ...) and one meta row per asked row
      NNNNN_stats.json            written last: the shard is finished
      retry-0001/ ...             later rounds (transient failures fetched again, rows a grown source added)

downloads.parquet (DOWNLOADS_SCHEMA) is always recomputed from these rounds, the latest round winning
(`merge_rounds`); `iter_staged_images` reads the images back in sample_id order.
"""
from __future__ import annotations

import heapq
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curation import tario
from curation.imagehash import STORED_HASH_FIELDS
from curation.io import read_parquet
from manifests.layout import BuildLayout

log = logging.getLogger(__name__)

URLS_NAME = "urls.parquet"

LOG_NAME = "img2dataset.log"

RETRY_PREFIX = "retry-"

DOWNLOADS_META_KEY = b"cc4m.download"

STATUSES = ("success", "failed_to_download", "failed_to_resize", "missing")

TIMESTAMP = pa.timestamp("ms", tz="UTC")

DOWNLOADS_SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("url", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("transient", pa.bool_()), ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("sha256", pa.string()), ("attempts", pa.int32()), ("first_attempt_at", TIMESTAMP),
    ("last_attempt_at", TIMESTAMP), ("staging_shard", pa.string()), ("staging_key", pa.string()),
    # sha256 and pHash of the STORED JPEG (curation.imagehash), made where it was encoded; null for failures and for
    # images staged without them (dedup then hashes those itself).
    *STORED_HASH_FIELDS,
])

STORED_HASH_COLUMNS = [f.name for f in STORED_HASH_FIELDS]

# The downloads.parquet columns that decide what later stages write (which samples, which original bytes): their
# content, not the file's bytes or mtime, is what dedup and reshard fingerprint. Where an image is staged is left
# out on purpose: a grown build fetches its new rows in a later round than a fresh build would, and must still end
# with the same outputs (and the same stored JPEG follows from the same original bytes and image settings).
DOWNLOAD_CONTENT_COLUMNS = ["sample_id", "status", "width", "height", "sha256"]

STAGED_SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), *STORED_HASH_FIELDS,
    ("staging_shard", pa.string()), ("attempt_at", TIMESTAMP),
])

MISSING_MESSAGE = "missing: not reported by any finished img2dataset staging shard"


def staging_shards(staging_dir: Path) -> list[str]:
    """Names ("00000") of staging shards img2dataset finished: their `_stats.json` is written last."""
    return sorted(p.name[: -len("_stats.json")] for p in Path(staging_dir).glob("*_stats.json"))


def staging_rounds(staging_dir: Path) -> list[str]:
    """"" (the first round, staging/ itself) and the retry rounds ("retry-0001", ...), in order."""
    retries = sorted(p.name for p in Path(staging_dir).glob(f"{RETRY_PREFIX}*") if p.is_dir())
    return ["", *retries]


def round_shards(staging_dir: Path) -> list[str]:
    """Finished staging shards of every round, as staging_shard values ("00000", "retry-0001/00000", ...)."""
    return [f"{r}/{s}" if r else s for r in staging_rounds(staging_dir) for s in staging_shards(staging_dir / r)]


def read_staging_parquet(path: Path) -> pa.Table:
    wanted = ["sample_id", "key", "status", "error_message", "width", "height", "sha256"]
    table = read_parquet(path)
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise ValueError(f"download: staging parquet {path} lacks columns {missing}")
    return with_stored_hashes(table).select(wanted + STORED_HASH_COLUMNS)


def with_stored_hashes(table: pa.Table) -> pa.Table:
    """`table` with the stored-image hash columns, null where the staging round was written without them."""
    for column in STORED_HASH_FIELDS:
        if column.name not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table


def _read_round(folder: Path, prefix: str, per_shard: list[dict[str, Any]]) -> pa.Table:
    """Every finished shard of one round, with its staging_shard name and its start time."""
    tables = []
    for shard in staging_shards(folder):
        path = folder / f"{shard}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"download: {shard}_stats.json exists but {path} does not")
        stats = json.loads((folder / f"{shard}_stats.json").read_text())
        table = read_staging_parquet(path)
        name = f"{prefix}/{shard}" if prefix else shard
        table = table.append_column("staging_shard", pa.array([name] * table.num_rows, pa.string()))
        started_ms = int(float(stats.get("start_time") or 0) * 1000)
        table = table.append_column("attempt_at", pa.array([started_ms] * table.num_rows, pa.int64()).cast(TIMESTAMP))
        table = table.cast(STAGED_SCHEMA)
        statuses = Counter(table["status"].to_pylist())
        per_shard.append({"shard": name, "rows": table.num_rows, **{s: statuses.get(s, 0) for s in STATUSES[:3]}})
        log.info("download: staging shard %s: %d rows, %s", name, table.num_rows, dict(statuses))
        tables.append(table)
    staged = pa.concat_tables(tables) if tables else STAGED_SCHEMA.empty_table()
    if len(pc.unique(staged["sample_id"])) != staged.num_rows:
        counts = pc.value_counts(staged["sample_id"])
        dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")[0].as_py()
        raise ValueError(f"download: sample_id {dup} appears more than once in staging round {prefix or 'first'}")
    return staged


def merge_rounds(layout: BuildLayout, urls: pa.Table, per_shard: list[dict[str, Any]]) -> pa.Table:
    """One row per selected sample: its latest round's result, attempts = rounds that reported it."""
    base = urls.select(["sample_id", "url"])
    n = base.num_rows
    merged: dict[str, pa.Array] = {name: pa.nulls(n, STAGED_SCHEMA.field(name).type)
                                   for name in STAGED_SCHEMA.names if name != "sample_id"}
    merged["first_attempt_at"] = pa.nulls(n, TIMESTAMP)
    attempts = pa.array([0] * n, pa.int32())
    for prefix in staging_rounds(layout.staging_dir):
        folder = layout.staging_dir / prefix
        staged = _read_round(folder, prefix, per_shard)
        asked = (read_parquet(folder / URLS_NAME, columns=["sample_id", "url"]) if (folder / URLS_NAME).exists()
                 else base.slice(0, 0))
        unknown = staged.filter(pc.invert(pc.is_in(staged["sample_id"], value_set=asked["sample_id"])))
        if unknown.num_rows:  # staging rows this round never asked for: the staging folder is not ours
            raise ValueError(f"download: staging round {prefix or 'first'} holds {unknown.num_rows} sample ids it "
                             f"never asked for, e.g. {unknown['sample_id'].to_pylist()[:5]}")
        # A result counts for a sample only if it was fetched from the sample's current url (an edited source row
        # keeps its sample_id but not its image); results of samples no longer selected are left out.
        staged = staged.join(asked, keys="sample_id", join_type="inner")
        joined = base.join(staged, keys=["sample_id", "url"], join_type="left outer").sort_by("sample_id")
        hit = pc.is_valid(joined["status"])
        for name, previous in merged.items():
            if name != "first_attempt_at":
                merged[name] = pc.if_else(hit, joined[name], previous)
        merged["first_attempt_at"] = pc.coalesce(merged["first_attempt_at"], joined["attempt_at"])
        attempts = pc.add(attempts, pc.cast(hit, pa.int32()))
    merged["attempts"] = attempts
    return pa.table({"sample_id": base["sample_id"], "url": base["url"], **merged})


def _shard_images(staging: Path, shard: str, keys: dict[str, int]) -> Iterator[tuple[int, bytes]]:
    images = {keys[name[:-len(".jpg")]]: data
              for name, data in tario.read_members(staging / f"{shard}.tar", {f"{k}.jpg" for k in keys})}
    lost = sorted(set(keys.values()) - set(images))
    if lost:
        raise FileNotFoundError(f"staging shard {shard}.tar lacks images of successful samples {lost[:10]}")
    for sid in sorted(images):
        yield sid, images[sid]


def iter_staged_images(build_dir: str | Path, sample_ids: Iterable[int] | None = None) -> Iterator[tuple[int, bytes]]:
    """(sample_id, jpg bytes) of successful downloads, read from the staging tars, in ascending sample_id order.
    `sample_ids` restricts the output (staging tars holding none of them are not opened). Raises if a successful
    sample's image is absent.

    Each staging shard holds ascending sample ids (every round's urls.parquet is sorted); shards of the first round
    cover consecutive ranges, retry rounds' shards interleave with them. A shard is opened only when its smallest
    wanted id is next, so about one shard per round is held in memory."""
    layout = BuildLayout(Path(build_dir))
    table = read_parquet(layout.downloads, columns=["sample_id", "status", "staging_shard", "staging_key"])
    wanted = None if sample_ids is None else {int(s) for s in sample_ids}
    by_shard: dict[str, dict[str, int]] = {}
    for sid, status, shard, key in zip(*(table[c].to_pylist() for c in table.column_names)):
        if status != "success" or (wanted is not None and sid not in wanted):
            continue
        by_shard.setdefault(shard, {})[key] = sid
    if wanted is not None:
        unknown = wanted - {sid for keys in by_shard.values() for sid in keys.values()}
        if unknown:
            raise KeyError(f"iter_staged_images: not successful downloads: {sorted(unknown)[:10]}")
    pending = sorted((min(keys.values()), shard) for shard, keys in by_shard.items())
    active: list[tuple[int, int, bytes, Iterator[tuple[int, bytes]]]] = []
    order = 0
    while pending or active:
        while pending and (not active or pending[0][0] <= active[0][0]):
            _, shard = pending.pop(0)
            images = _shard_images(layout.staging_dir, shard, by_shard[shard])
            sid, data = next(images)
            order += 1
            heapq.heappush(active, (sid, order, data, images))
        sid, rank, data, images = heapq.heappop(active)
        yield sid, data
        nxt = next(images, None)
        if nxt is not None:
            heapq.heappush(active, (nxt[0], rank, nxt[1], images))
