"""Dedup stage: exact (sha256 of the stored JPEG bytes) and near (64-bit DCT perceptual hash within a Hamming radius,
searched with a faiss binary index) duplicates among the successful downloads -> duplicates.parquet + kept.parquet.

Rule (deterministic, independent of iteration order): a successful sample is REMOVED iff some KEPT sample with a
smaller sample_id is a duplicate of it (same bytes, or pHash within `max_hamming`); it then points to the smallest such
kept sample. Processing candidates in ascending sample_id order ("leader clustering") realises exactly that rule, so
every `duplicate_of` is itself kept and every removed image lies within the radius of its keeper (no chaining through
removed images, unlike connected components, which could drag an image far from its keeper).

Why our own sha256 and not img2dataset's `sha256` column: img2dataset hashes the ORIGINAL downloaded bytes, before
resizing and re-encoding; the shards store the re-encoded JPEG. We hash the bytes we will actually write, so the hash
in kept.parquet matches the shard member. (Byte-identical sources give byte-identical stored JPEGs, so nothing that
img2dataset's hash would catch is missed.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.imagehash import (
    PHASH_VERSION,
    STAGED_HASH_SIZE,
    STAGED_HIGHFREQ_FACTOR,
    hamming,
    phash_bytes,
)
from curation.io import parquet_digest, read_parquet, write_parquet_atomic
from curation.progress import Progress, ProgressCallback
from curation.sortedsets import unique
from curation.staging import DOWNLOAD_CONTENT_COLUMNS, STORED_HASH_COLUMNS, iter_staged_images, with_stored_hashes
from manifests.layout import BuildLayout
from manifests.version import code_version

DUPLICATES_SCHEMA = pa.schema(
    [("sample_id", pa.int64()), ("duplicate_of", pa.int64()), ("kind", pa.string()), ("distance", pa.int32())]
)
KEPT_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("entities", pa.list_(pa.string())),
        ("phash", pa.uint64()),  # null when dedup is disabled or the image could not be decoded
        ("sha256", pa.string()),  # of the stored JPEG bytes; null when dedup is disabled
    ]
)
# Above this many distinct hashes the exhaustive IndexBinaryFlat (O(n^2)) gives way to multi-index hashing.
FLAT_SEARCH_LIMIT = 20_000
PHASH_BATCH = 4096


@dataclass(frozen=True)
class DedupConfig:
    enabled: bool = True
    exact: bool = True  # identical stored JPEG bytes
    near: bool = True  # perceptual hash within max_hamming bits
    hash_size: int = 8  # pHash side: hash_size**2 bits (8 -> 64-bit hash)
    highfreq_factor: int = 4  # the image is reduced to (hash_size * highfreq_factor)^2 pixels before the DCT
    max_hamming: int = 4  # inclusive Hamming radius for "near duplicate"
    workers: int = 1  # processes that decode and hash images (1 = in this process)

    def __post_init__(self) -> None:
        if self.hash_size != 8:
            # The hash is stored as one uint64 (kept.parquet `phash`), so only 64-bit hashes are supported.
            raise ValueError(f"DedupConfig.hash_size must be 8 (a 64-bit pHash), got {self.hash_size}")
        if self.highfreq_factor < 1:
            raise ValueError(f"DedupConfig.highfreq_factor must be >= 1, got {self.highfreq_factor}")
        if self.workers < 1:
            raise ValueError(f"DedupConfig.workers must be >= 1, got {self.workers}")
        if not 0 <= self.max_hamming < self.hash_size**2 // 2:
            raise ValueError(
                f"DedupConfig.max_hamming must be in [0, {self.hash_size**2 // 2}), got {self.max_hamming}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------ near search
def _codes(hashes: np.ndarray) -> np.ndarray:
    """uint64 hashes -> (n, 8) uint8 faiss binary codes (byte order is irrelevant to the Hamming distance)."""
    return np.ascontiguousarray(hashes.astype(">u8")).view(np.uint8).reshape(-1, 8)


def near_pairs(hashes: np.ndarray, max_hamming: int, force_multihash: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i, j), i != j, of positions whose 64-bit hashes are within `max_hamming` (inclusive).

    Small inputs use the exhaustive IndexBinaryFlat. Larger ones use multi-index hashing (IndexBinaryMultiHash):
    the code is cut into nhash = r // 2 + 1 disjoint substrings and each query probes its own bucket plus the buckets
    one bit flip away (nflip = 1). Two codes within r bits differ in at most floor(r / nhash) <= 1 bits on at least
    one substring (pigeonhole), so the search stays exact while touching only a few small buckets; the candidates are
    then checked with the full 64-bit distance. (nflip = 0 with r + 1 short substrings is also exact but its 12-bit
    buckets hold ~1000 codes each at 4M images: measured 2.5x slower at 200k and quadratic beyond.)
    """
    import faiss

    n = len(hashes)
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    codes = _codes(hashes)
    if n <= FLAT_SEARCH_LIMIT and not force_multihash:
        index = faiss.IndexBinaryFlat(64)
    else:
        nhash = max_hamming // 2 + 1
        index = faiss.IndexBinaryMultiHash(64, nhash, min(64 // nhash, 32))
        index.nflip = 1
    index.add(codes)
    # faiss keeps distances strictly below the radius.
    lims, _dist, ids = index.range_search(codes, max_hamming + 1)
    query = np.repeat(np.arange(n, dtype=np.int64), np.diff(lims.astype(np.int64)))
    ids = ids.astype(np.int64)
    not_self = query != ids
    return query[not_self], ids[not_self]


# -------------------------------------------------------------------------------------------------------- the stage
def _read_successes(layout: BuildLayout) -> pa.Table:
    if not layout.downloads.exists():
        raise FileNotFoundError(f"dedup needs {layout.downloads} (run the download stage first)")
    # sha256 (of the original download) keys the hash cache; a hand-made downloads.parquet may lack it
    names = set(pq.read_schema(layout.downloads).names)
    columns = ("sample_id", "status", "sha256", *STORED_HASH_COLUMNS)
    downloads = read_parquet(layout.downloads, columns=[c for c in columns if c in names])
    if "sha256" not in names:
        downloads = downloads.append_column("sha256", pa.nulls(downloads.num_rows, pa.string()))
    downloads = with_stored_hashes(downloads)
    ok = downloads.filter(pc.equal(downloads["status"], "success")).select(["sample_id", "sha256",
                                                                            *STORED_HASH_COLUMNS])
    ids = ok["sample_id"].to_numpy()
    if len(unique(ids)) != len(ids):
        raise ValueError(f"{layout.downloads}: duplicate sample_id rows among successful downloads")
    return ok.sort_by("sample_id")


def _read_entities(layout: BuildLayout, sample_ids: np.ndarray) -> pa.Array:
    """entities of `sample_ids` (sorted) from the selected/ parts, in the same order."""
    parts = layout.parts(layout.selected_dir)
    if not parts:
        raise FileNotFoundError(f"dedup needs selected parts in {layout.selected_dir}")
    selected = pa.concat_tables([read_parquet(p, columns=["sample_id", "entities"]) for p in parts])
    selected = selected.cast(pa.schema([("sample_id", pa.int64()), ("entities", pa.list_(pa.string()))]))
    pos = pc.index_in(pa.array(sample_ids, pa.int64()), value_set=selected["sample_id"])
    missing = int(pos.null_count)
    if missing:
        first = sample_ids[np.asarray(pc.is_null(pos))][:5].tolist()
        raise ValueError(f"{missing} successful downloads have no row in selected/ (e.g. sample_id {first})")
    return selected["entities"].combine_chunks().take(pos)


def hash_batch(
    items: list[tuple[int, bytes]], hash_size: int, highfreq_factor: int, near: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sample_ids, sha256 digests (b, 32), phash (b,), phash_ok (b,)) of one batch. Module-level so that worker
    processes can import it."""
    ids = np.array([sid for sid, _ in items], np.int64)
    sha = np.array([np.frombuffer(hashlib.sha256(jpg).digest(), np.uint8) for _, jpg in items], np.uint8)
    sha = sha.reshape(len(items), 32)
    phash = np.zeros(len(items), np.uint64)
    ok = np.zeros(len(items), bool)
    if near:
        for j, (_, jpg) in enumerate(items):
            # One image at a time, through the same function as the download workers: a batched DCT could round
            # differently, and a blank image's bits are decided by that rounding.
            try:
                phash[j] = phash_bytes(jpg, hash_size, highfreq_factor)
            except ValueError:  # undecodable: counted by the caller, kept out of the near search
                continue
            ok[j] = True
    return ids, sha, phash, ok


def _batches(
    images: Iterable[tuple[int, bytes]], sample_ids: np.ndarray, counts: dict[str, int], seen: np.ndarray
) -> Iterator[list[tuple[int, bytes]]]:
    """Batches of the images we need, each sample once; the others are counted, not silently ignored."""
    n = len(sample_ids)
    batch: list[tuple[int, bytes]] = []
    for sample_id, jpg in images:
        i = int(np.searchsorted(sample_ids, sample_id))
        if i >= n or sample_ids[i] != sample_id:
            counts["images_not_selected"] += 1  # a staged image of a failed/unknown sample: not ours to keep
            continue
        if seen[i]:
            counts["images_repeated"] += 1
            continue
        seen[i] = True
        batch.append((sample_id, jpg))
        if len(batch) >= PHASH_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _hash_images(
    images: Iterable[tuple[int, bytes]], sample_ids: np.ndarray, cfg: DedupConfig, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """sha256 digests (n, 32) uint8, phash (n,) uint64, phash_ok (n,) bool for `sample_ids`, plus counts.

    With cfg.workers > 1, batches are hashed in spawned worker processes (decoding dominates: ~0.5 ms per 256 px
    JPEG and core); at most 2 batches per worker are in flight, so memory stays bounded whatever the build size.
    """
    n = len(sample_ids)
    sha = np.zeros((n, 32), np.uint8)
    phash = np.zeros(n, np.uint64)
    phash_ok = np.zeros(n, bool)
    seen = np.zeros(n, bool)
    counts = {"images_not_selected": 0, "images_repeated": 0, "phash_failed": 0}
    args = (cfg.hash_size, cfg.highfreq_factor, cfg.near)

    def store(result: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
        ids, batch_sha, batch_phash, batch_ok = result
        pos = np.searchsorted(sample_ids, ids)
        sha[pos], phash[pos], phash_ok[pos] = batch_sha, batch_phash, batch_ok
        if cfg.near:
            counts["phash_failed"] += int((~batch_ok).sum())
        if progress is not None:
            progress.advance(len(ids))

    batches = _batches(images, sample_ids, counts, seen)
    if cfg.workers == 1:
        for batch in batches:
            store(hash_batch(batch, *args))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may be a threaded Prefect worker
        with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending = []
            for batch in batches:
                pending.append(pool.submit(hash_batch, batch, *args))
                if len(pending) >= 2 * cfg.workers:
                    store(pending.pop(0).result())  # in submission order: the counts do not depend on timing
            for future in pending:
                store(future.result())
    if not seen.all():
        absent = sample_ids[~seen]
        raise ValueError(
            f"{len(absent)} successful downloads have no staged image (e.g. sample_id {absent[:5].tolist()}); "
            "staging and downloads.parquet disagree"
        )
    return sha, phash, phash_ok, counts


def find_duplicates(
    sample_ids: np.ndarray,
    sha: np.ndarray | None,
    phash: np.ndarray | None,
    phash_ok: np.ndarray | None,
    cfg: DedupConfig,
    force_multihash: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Apply the module rule to samples sorted by id. Returns (removed positions, keeper positions, kind_is_exact,
    distance), sorted by removed position.

    Samples are first grouped into "units" of mutual duplicates at distance 0 (same pHash; or, without a usable pHash,
    same bytes): blank or placeholder images share one hash and would otherwise explode the pair count. Only the
    distinct hashes are searched; leader clustering runs over units, and a unit's other members follow its head.
    """
    n = len(sample_ids)
    use_near = cfg.near and phash is not None and phash_ok is not None
    use_exact = cfg.exact and sha is not None
    ok = np.asarray(phash_ok, bool) if use_near else np.zeros(n, bool)
    unit = np.empty(n, np.int64)
    uniq_codes, code_unit = np.unique(phash[ok], return_inverse=True) if use_near else (np.empty(0, np.uint64), None)
    if use_near:
        unit[ok] = code_unit
    rest = np.flatnonzero(~ok)
    if use_exact:
        _, sha_unit = np.unique(sha[rest].view(np.dtype((np.void, 32))).ravel(), return_inverse=True)
        unit[rest] = len(uniq_codes) + sha_unit.ravel()
    else:
        unit[rest] = len(uniq_codes) + np.arange(len(rest))
    n_units = int(unit.max()) + 1 if n else 0
    head = np.full(n_units, n, np.int64)
    np.minimum.at(head, unit, np.arange(n))  # positions are in id order: the smallest position is the smallest id

    unit_keeper = np.full(n_units, -1, np.int64)  # head position of the kept unit that removes this unit's head
    if use_near and len(uniq_codes) > 1:
        qi, qj = near_pairs(uniq_codes, cfg.max_hamming, force_multihash=force_multihash)
        hi, hj = head[qi], head[qj]
        fwd = hi < hj
        src, dst = hi[fwd], hj[fwd]
        order = np.lexsort((dst, src))
        src, dst = src[order], dst[order]
        keeper_of_head = np.full(n, -1, np.int64)
        # Leader clustering in ascending id order; the loop runs only over units that have a larger neighbour.
        starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]]) if len(src) else np.empty(0, np.int64)
        ends = np.append(starts[1:], len(src))
        for s, e in zip(starts.tolist(), ends.tolist()):
            leader = src[s]
            if keeper_of_head[leader] >= 0:
                continue  # a removed image removes nothing
            targets = dst[s:e]
            keeper_of_head[targets[keeper_of_head[targets] < 0]] = leader
        unit_keeper = keeper_of_head[head]
    keeper = np.where(unit_keeper[unit] >= 0, unit_keeper[unit], head[unit])
    keeper[keeper == np.arange(n)] = -1
    removed = np.flatnonzero(keeper >= 0)
    keepers = keeper[removed]
    if use_exact:
        is_exact = np.all(sha[removed] == sha[keepers], axis=1)
    else:
        is_exact = np.zeros(len(removed), bool)
    if use_near:
        both_hashed = ok[removed] & ok[keepers]
        distance = np.where(both_hashed & ~is_exact, hamming(phash[removed], phash[keepers]), 0).astype(np.int32)
    else:
        distance = np.zeros(len(removed), np.int32)
    return removed, keepers, is_exact, distance


def _fingerprint(layout: BuildLayout, cfg: DedupConfig) -> str:
    # `workers` changes how fast, not what: a rerun with another worker count is still "done"
    result_config = {k: v for k, v in cfg.to_dict().items() if k != "workers"}
    # The downloads' content that decides dedup (which samples, which original bytes), never the file's mtime: a
    # copied build is still done, and a re-downloaded image changes its sha256 and so the fingerprint.
    downloads = parquet_digest(layout.downloads, DOWNLOAD_CONTENT_COLUMNS)
    return json.dumps({"config": result_config, "downloads": downloads}, sort_keys=True)


def _counts_from_outputs(layout: BuildLayout) -> dict[str, Any]:
    dups = read_parquet(layout.duplicates, columns=["kind"])
    kinds = dups["kind"].to_pylist()
    kept = pq.read_metadata(layout.kept).num_rows
    meta = pq.read_schema(layout.kept).metadata or {}
    extra = json.loads(meta.get(b"cc4m.dedup.counts", b"{}"))
    counts = {
        "checked": kept + len(kinds),
        "exact_removed": kinds.count("exact"),
        "near_removed": kinds.count("near"),
        "kept": kept,
    }
    return {**extra, **counts}


def deduplicate(
    build_dir: str | Path,
    cfg: DedupConfig = DedupConfig(),
    images: Iterable[tuple[int, bytes]] | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """downloads.parquet (+ staged images) -> duplicates.parquet, kept.parquet. Skipped when both exist and were made
    with the same config from the same downloads.parquet.

    `images` yields (sample_id, stored JPEG bytes); by default the staged images of the download stage
    (`curation.staging.iter_staged_images`). Returns counts: checked, exact_removed, near_removed, kept, ...
    """
    layout = BuildLayout(Path(build_dir))
    if layout.kept.exists() and layout.duplicates.exists() and layout.downloads.exists():
        meta = pq.read_schema(layout.kept).metadata or {}
        if meta.get(b"cc4m.dedup.fingerprint", b"").decode() == _fingerprint(layout, cfg):
            return {**_counts_from_outputs(layout), "skipped": True}

    ok = _read_successes(layout)
    sample_ids = ok["sample_id"].to_numpy().astype(np.int64)
    entities = _read_entities(layout, sample_ids)
    n = len(sample_ids)
    extra: dict[str, int] = {}
    sha_hex: pa.Array = pa.nulls(n, pa.string())
    phash_col: pa.Array = pa.nulls(n, pa.uint64())
    reuse: dict[str, int] = {}
    if cfg.enabled and n:
        originals = ok["sha256"].cast(pa.string()) if images is None else pa.nulls(n, pa.string())
        staged = _staged_hashes(ok, cfg) if images is None else HASHES_SCHEMA.empty_table()
        sha, phash, phash_ok, extra, reuse = _hashes(layout, sample_ids, originals, staged, cfg, images, progress)
        removed, keepers, is_exact, distance = find_duplicates(
            sample_ids, sha, phash if cfg.near else None, phash_ok, cfg
        )
        sha_hex = pa.array([bytes(row).hex() for row in sha], pa.string())
        if cfg.near:
            phash_col = pa.array(phash, pa.uint64(), mask=~phash_ok)
    else:
        removed = keepers = np.empty(0, np.int64)
        is_exact = np.empty(0, bool)
        distance = np.empty(0, np.int32)

    duplicates = pa.table(
        {
            "sample_id": pa.array(sample_ids[removed], pa.int64()),
            "duplicate_of": pa.array(sample_ids[keepers], pa.int64()),
            "kind": pa.array(np.where(is_exact, "exact", "near").tolist(), pa.string()),
            "distance": pa.array(distance, pa.int32()),
        },
        schema=DUPLICATES_SCHEMA,
    )
    keep_mask = np.ones(n, bool)
    keep_mask[removed] = False
    keep = pa.array(keep_mask)
    kept = pa.table(
        {"sample_id": ok["sample_id"], "entities": entities, "phash": phash_col, "sha256": sha_hex}, schema=KEPT_SCHEMA
    ).filter(keep)
    counts = {
        "checked": n,
        "exact_removed": int(is_exact.sum()),
        "near_removed": int((~is_exact).sum()),
        "kept": kept.num_rows,
    }
    assert counts["checked"] == counts["kept"] + counts["exact_removed"] + counts["near_removed"]
    metadata = {
        "cc4m.dedup.config": json.dumps(cfg.to_dict(), sort_keys=True),
        "cc4m.dedup.counts": json.dumps(extra, sort_keys=True),
        "cc4m.dedup.fingerprint": _fingerprint(layout, cfg),
        "cc4m.code_version": code_version(),
    }
    # duplicates first, kept last: kept.parquet is the "stage done" marker the next stages look for.
    write_parquet_atomic(layout.duplicates, duplicates.replace_schema_metadata(metadata))
    write_parquet_atomic(layout.kept, kept.replace_schema_metadata(metadata))
    return {**extra, **counts, **reuse, "skipped": False}


HASHES_SCHEMA = pa.schema([("sample_id", pa.int64()), ("download_sha256", pa.string()),
                           ("sha256", pa.binary(32)), ("phash", pa.uint64()), ("phash_ok", pa.bool_())])


def _hash_settings(cfg: DedupConfig) -> bytes:
    return json.dumps({"hash_size": cfg.hash_size, "highfreq_factor": cfg.highfreq_factor, "near": cfg.near,
                       "phash_version": PHASH_VERSION},
                      sort_keys=True).encode()


def _cached_hashes(layout: BuildLayout, sample_ids: np.ndarray, originals: pa.Array, cfg: DedupConfig) -> pa.Table:
    """The cached hash rows still valid: a row is reused only when the same sample still has the same original bytes
    (img2dataset's sha256 of the download) and the hash settings are the same."""
    path = layout.dedup_hashes
    if not path.exists() or (pq.read_schema(path).metadata or {}).get(b"cc4m.dedup.hash") != _hash_settings(cfg):
        return HASHES_SCHEMA.empty_table()
    cache = read_parquet(path).cast(HASHES_SCHEMA)
    want = pa.table({"sample_id": pa.array(sample_ids, pa.int64()), "download_sha256": originals})
    return cache.join(want, keys=["sample_id", "download_sha256"], join_type="inner")


def _staged_hashes(ok: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Hash rows made by the download workers (downloads.parquet's stored_* columns), when they were made with this
    config's settings: the same function on the same bytes, so the same bits as hashing here."""
    if (cfg.hash_size, cfg.highfreq_factor) != (STAGED_HASH_SIZE, STAGED_HIGHFREQ_FACTOR):
        return HASHES_SCHEMA.empty_table()
    rows = ok.filter(pc.and_(pc.is_valid(ok["stored_sha256"]), pc.is_valid(ok["stored_phash"])))
    digests = [bytes.fromhex(h) for h in rows["stored_sha256"].to_pylist()]
    return pa.table({"sample_id": rows["sample_id"].cast(pa.int64()), "download_sha256": rows["sha256"].cast(pa.string()),
                     "sha256": pa.array(digests, pa.binary(32)), "phash": rows["stored_phash"].cast(pa.uint64()),
                     "phash_ok": pa.array(np.ones(rows.num_rows, bool))}, schema=HASHES_SCHEMA)


def _hashes(layout: BuildLayout, sample_ids: np.ndarray, originals: pa.Array, staged: pa.Table, cfg: DedupConfig,
            images: Iterable[tuple[int, bytes]] | None, progress: ProgressCallback | None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int], dict[str, int]]:
    """sha256, pHash, pHash ok of every sample: as the download workers hashed them (`staged`), else from the cache
    where the image is unchanged, else hashed now (only those images are read); the cache is then rewritten for all
    of them. Injected `images` use neither."""
    cached = _cached_hashes(layout, sample_ids, originals, cfg) if images is None else HASHES_SCHEMA.empty_table()
    cached = cached.filter(pc.invert(pc.is_in(cached["sample_id"], value_set=staged["sample_id"])))
    from_download = len(staged)
    cached = pa.concat_tables([staged, cached.select(HASHES_SCHEMA.names).cast(HASHES_SCHEMA)])
    have = np.isin(sample_ids, cached["sample_id"].to_numpy())
    todo = sample_ids[~have]
    if images is None and not len(todo):
        images = ()  # every image was hashed by the download workers or is cached: none is read
    elif images is None:
        images = iter_staged_images(layout.root, sample_ids=set(todo.tolist()))
    # Progress over every image checked, not only those hashed here: with the download workers' hashes there is
    # often nothing to hash, and the stage should still show that it ran to 100 %.
    meter = Progress("dedup", len(sample_ids), "image", progress)
    meter.advance(int(have.sum()))
    new_sha, new_phash, new_ok, extra = _hash_images(_checked(images), todo, cfg, meter)
    meter.finish()
    n = len(sample_ids)
    sha, phash, phash_ok = np.zeros((n, 32), np.uint8), np.zeros(n, np.uint64), np.zeros(n, bool)
    sha[~have], phash[~have], phash_ok[~have] = new_sha, new_phash, new_ok
    if len(cached):
        cached = cached.sort_by("sample_id")
        pos = np.searchsorted(sample_ids, cached["sample_id"].to_numpy())
        sha[pos] = np.frombuffer(b"".join(cached["sha256"].to_pylist()), np.uint8).reshape(-1, 32)
        phash[pos] = cached["phash"].to_numpy()
        phash_ok[pos] = cached["phash_ok"].to_numpy(zero_copy_only=False)
    if cfg.near:  # over every image, as a fresh build counts it
        extra["phash_failed"] = int((~phash_ok).sum())
    table = pa.table({"sample_id": pa.array(sample_ids, pa.int64()), "download_sha256": originals,
                      "sha256": pa.array([bytes(r) for r in sha], pa.binary(32)), "phash": pa.array(phash, pa.uint64()),
                      "phash_ok": pa.array(phash_ok)}, schema=HASHES_SCHEMA)
    write_parquet_atomic(layout.dedup_hashes, table.replace_schema_metadata({b"cc4m.dedup.hash": _hash_settings(cfg)}))
    return sha, phash, phash_ok, extra, {"images_hashed": len(todo), "hashes_from_download": from_download,
                                         "hashes_reused": int(have.sum()) - from_download}


def _checked(images: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    for item in images:
        sample_id, data = item
        yield int(sample_id), bytes(data)
