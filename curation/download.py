"""Download stage: selected/* -> staging/ (img2dataset, in a subprocess) -> downloads.parquet.

Why a subprocess: img2dataset uses a `spawn` multiprocessing pool (workers re-import `__main__`, which breaks under
Prefect's flow loader and hangs scripts without a main guard) and its own heavy imports; running it as
`python -m curation.download <json>` (this module, main-guarded) isolates all of that.

Why our own sample_id: img2dataset's keys depend on the shard size and tar members come in completion order, so
`sample_id` rides along via `save_additional_columns` and every mapping goes through the staging parquets.

downloads.parquet's `sha256` is img2dataset's hash of the ORIGINAL downloaded bytes (provenance; before resizing);
the stored JPEG's hash is dedup's (kept.parquet) and the shards' (meta).

Nothing is lost silently: downloads.parquet has exactly one row per selected sample. Rows img2dataset never reported
(e.g. a shard that failed all its retries) get status "missing" with an error message.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.io import write_parquet_atomic
from curation.layout import BuildLayout

log = logging.getLogger(__name__)

URLS_NAME = "urls.parquet"
LOG_NAME = "img2dataset.log"
DOWNLOADS_META_KEY = b"cc4m.download"
STATUSES = ("success", "failed_to_download", "failed_to_resize", "missing")
RESIZE_MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no")
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
# Arguments the stage itself owns: overriding them through `extra_img2dataset_args` would break the contract.
RESERVED_ARGS = frozenset({
    "url_list", "output_folder", "input_format", "output_format", "url_col", "caption_col", "save_additional_columns",
    "incremental_mode", "enable_wandb", "image_size", "resize_mode", "processes_count", "thread_count", "timeout",
    "retries", "number_sample_per_shard", "encode_quality", "distributor", "encode_format", "compute_hash",
})
REPO_ROOT = Path(__file__).resolve().parent.parent

DOWNLOADS_SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("url", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), ("staging_shard", pa.string()),
    ("staging_key", pa.string()),
])
# The downloads.parquet columns that decide what later stages write (which samples, which bytes, where they are
# staged): their content, not the file's bytes or mtime, is what dedup and reshard fingerprint.
DOWNLOAD_CONTENT_COLUMNS = ["sample_id", "status", "width", "height", "sha256", "staging_shard", "staging_key"]


@dataclass(frozen=True)
class DownloadConfig:
    """img2dataset settings. `http_proxy` (e.g. the embedded sample's local server) goes into the subprocess env;
    `extra_img2dataset_args` are passed through verbatim (e.g. {"min_image_size": 64}), except the RESERVED_ARGS."""

    image_size: int = 256
    resize_mode: str = "border"
    processes_count: int = 1
    thread_count: int = 32
    timeout: int = 10
    retries: int = 0
    number_sample_per_shard: int = 1000
    encode_quality: int = 95
    distributor: str = "multiprocessing"
    http_proxy: str | None = None
    subprocess_timeout_s: float | None = None
    extra_img2dataset_args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = ("image_size", "processes_count", "thread_count", "timeout", "number_sample_per_shard")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DownloadConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"DownloadConfig.retries must be an int >= 0, got {self.retries!r}")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError(f"DownloadConfig.encode_quality must be in 1..100, got {self.encode_quality!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"DownloadConfig.resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.distributor not in DISTRIBUTORS:
            raise ValueError(f"DownloadConfig.distributor must be one of {DISTRIBUTORS}, got {self.distributor!r}")
        if self.http_proxy is not None and not str(self.http_proxy).startswith(("http://", "https://")):
            raise ValueError(f"DownloadConfig.http_proxy must be an http(s):// URL or None, got {self.http_proxy!r}")
        if self.subprocess_timeout_s is not None and self.subprocess_timeout_s <= 0:
            raise ValueError("DownloadConfig.subprocess_timeout_s must be positive or None")
        extra = dict(self.extra_img2dataset_args or {})
        clash = sorted(set(extra) & RESERVED_ARGS)
        if clash:
            raise ValueError(f"DownloadConfig.extra_img2dataset_args may not set {clash}: use the config fields")
        try:
            json.dumps(extra)
        except TypeError as err:
            raise ValueError(f"DownloadConfig.extra_img2dataset_args must be JSON-serialisable: {err}") from None
        object.__setattr__(self, "extra_img2dataset_args", MappingProxyType(extra))

    def __hash__(self) -> int:  # MappingProxyType is unhashable; hash its sorted items instead
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["extra_img2dataset_args"] = dict(self.extra_img2dataset_args)
        return d

    def staging_fingerprint(self) -> dict[str, Any]:
        """Settings that change what lands in staging/ (proxy, parallelism and distributor do not)."""
        return {
            "image_size": self.image_size, "resize_mode": self.resize_mode, "encode_quality": self.encode_quality,
            "number_sample_per_shard": self.number_sample_per_shard, "extra": dict(self.extra_img2dataset_args),
        }

    def img2dataset_kwargs(self, url_list: Path, output_folder: Path) -> dict[str, Any]:
        return {
            "url_list": str(url_list), "output_folder": str(output_folder), "input_format": "parquet",
            "url_col": "url", "caption_col": "caption", "save_additional_columns": ["sample_id"],
            "output_format": "webdataset", "incremental_mode": "incremental", "enable_wandb": False,
            "image_size": self.image_size, "resize_mode": self.resize_mode, "processes_count": self.processes_count,
            "thread_count": self.thread_count, "timeout": self.timeout, "retries": self.retries,
            "number_sample_per_shard": self.number_sample_per_shard, "encode_quality": self.encode_quality,
            "encode_format": "jpg", "compute_hash": "sha256", "distributor": self.distributor,
            **dict(self.extra_img2dataset_args),
        }


# ---------------------------------------------------------------------------------------------------------- helpers
def _table_digest(table: pa.Table) -> str:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def staging_shards(staging_dir: Path) -> list[str]:
    """Names ("00000") of staging shards img2dataset finished: their `_stats.json` is written last."""
    return sorted(p.name[: -len("_stats.json")] for p in Path(staging_dir).glob("*_stats.json"))


def collect_selected(build_dir: str | Path) -> pa.Table:
    """sample_id, url, caption of every selected sample, in sample_id order (sample ids must be unique)."""
    layout = BuildLayout(Path(build_dir))
    parts = layout.parts(layout.selected_dir)
    if not parts:
        raise FileNotFoundError(f"download: no selected parts in {layout.selected_dir} (run select first)")
    table = pa.concat_tables(pq.read_table(p, columns=["sample_id", "url", "caption"]) for p in parts)
    table = table.sort_by("sample_id")
    ids = table["sample_id"].to_numpy()
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
        raise ValueError("download: duplicate sample_id across selected parts")
    return table.cast(pa.schema([("sample_id", pa.int64()), ("url", pa.string()), ("caption", pa.string())]))


def run_img2dataset(kwargs: dict[str, Any], cfg: DownloadConfig, log_path: Path) -> None:
    """Run img2dataset in a fresh interpreter (this module's main guard); raise with the log's tail on failure."""
    env = dict(os.environ)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("WANDB_MODE", "disabled")
    if cfg.http_proxy:
        # urllib reads both spellings; a stray no_proxy could bypass the sample server, so drop it in the child.
        env["http_proxy"] = env["HTTP_PROXY"] = cfg.http_proxy
        for name in ("no_proxy", "NO_PROXY"):
            env.pop(name, None)
    cmd = [sys.executable, "-m", "curation.download", json.dumps(kwargs)]
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd[:3])}\n".encode())
        log_file.flush()
        proc = subprocess.run(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                              timeout=cfg.subprocess_timeout_s, check=False)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"img2dataset subprocess failed with exit code {proc.returncode}; log {log_path}:\n{tail}")


def _read_staging_parquet(path: Path) -> pa.Table:
    wanted = ["sample_id", "key", "status", "error_message", "width", "height", "sha256"]
    table = pq.read_table(path)
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise ValueError(f"download: staging parquet {path} lacks columns {missing}")
    return table.select(wanted)


# -------------------------------------------------------------------------------------------------------- the stage
def download_selected(build_dir: str | Path, cfg: DownloadConfig) -> dict[str, Any]:
    """selected/* -> staging/ -> downloads.parquet (one row per selected sample). Idempotent; resumable (img2dataset's
    incremental mode continues from finished staging shards). Returns counts by status and error."""
    layout = BuildLayout(Path(build_dir))
    staging = layout.staging_dir
    urls = collect_selected(build_dir)
    fingerprint = hashlib.sha256(
        json.dumps({"urls": _table_digest(urls), "staging": cfg.staging_fingerprint()}, sort_keys=True).encode()
    ).hexdigest()

    if layout.downloads.exists():
        meta = (pq.read_schema(layout.downloads).metadata or {}).get(DOWNLOADS_META_KEY)
        recorded = json.loads(meta) if meta else {}
        # "missing" rows mean img2dataset gave up on a shard: a rerun retries just those shards (incremental mode).
        if recorded.get("fingerprint") == fingerprint and recorded["counts"].get("missing", 0) == 0:
            return {**recorded["counts"], "skipped": True}

    urls_path = staging / URLS_NAME
    if urls_path.exists():
        old = (pq.read_schema(urls_path).metadata or {}).get(DOWNLOADS_META_KEY)
        if not old or json.loads(old).get("fingerprint") != fingerprint:
            # Different input or settings: img2dataset's incremental mode would mix old and new shards. Start over.
            log.warning("download: staging input changed, discarding %s", staging)
            shutil.rmtree(staging)
            layout.downloads.unlink(missing_ok=True)
    staging.mkdir(parents=True, exist_ok=True)
    if not urls_path.exists():
        meta = {DOWNLOADS_META_KEY: json.dumps({"fingerprint": fingerprint}).encode()}
        write_parquet_atomic(urls_path, urls.replace_schema_metadata(meta))

    n_expected_shards = -(-urls.num_rows // cfg.number_sample_per_shard)
    done = set(staging_shards(staging))
    started = time.perf_counter()
    if urls.num_rows and len(done) < n_expected_shards:
        log.info("download: %d urls, %d/%d staging shards already done", urls.num_rows, len(done), n_expected_shards)
        run_img2dataset(cfg.img2dataset_kwargs(urls_path, staging), cfg, staging / LOG_NAME)
    download_seconds = time.perf_counter() - started

    counts = _collect(layout, urls, cfg, download_seconds)
    table = counts.pop("_table")
    meta = {DOWNLOADS_META_KEY: json.dumps({"fingerprint": fingerprint, "counts": counts}, sort_keys=True).encode()}
    write_parquet_atomic(layout.downloads, table.replace_schema_metadata(meta))
    return {**counts, "skipped": False}


STAGED_SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), ("staging_shard", pa.string()),
])
MISSING_MESSAGE = "not reported by any finished img2dataset staging shard"


def _collect(layout: BuildLayout, urls: pa.Table, cfg: DownloadConfig, seconds: float) -> dict[str, Any]:
    """Join every finished staging shard's parquet onto the selected urls (vectorised: CC12M-sized inputs)."""
    staging = layout.staging_dir
    tables: list[pa.Table] = []
    per_shard: list[dict[str, Any]] = []
    for shard in staging_shards(staging):
        path = staging / f"{shard}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"download: {shard}_stats.json exists but {path.name} does not")
        table = _read_staging_parquet(path)
        table = table.append_column("staging_shard", pa.array([shard] * table.num_rows, pa.string()))
        table = table.cast(STAGED_SCHEMA)
        statuses = Counter(table["status"].to_pylist())
        per_shard.append({"shard": shard, "rows": table.num_rows, **{s: statuses.get(s, 0) for s in STATUSES[:3]}})
        log.info("download: staging shard %s: %d rows, %s", shard, table.num_rows, dict(statuses))
        tables.append(table)
    staged = pa.concat_tables(tables) if tables else STAGED_SCHEMA.empty_table()

    if len(pc.unique(staged["sample_id"])) != staged.num_rows:
        counts = pc.value_counts(staged["sample_id"])
        dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")[0].as_py()
        raise ValueError(f"download: sample_id {dup} appears more than once in staging")
    unknown = staged.filter(pc.invert(pc.is_in(staged["sample_id"], value_set=urls["sample_id"])))
    if unknown.num_rows:  # staging rows whose sample_id was never selected: the staging folder is not ours
        raise ValueError(f"download: staging holds {unknown.num_rows} unknown sample ids, "
                         f"e.g. {unknown['sample_id'].to_pylist()[:5]}")

    joined = urls.select(["sample_id", "url"]).join(staged, keys="sample_id", join_type="left outer")
    joined = joined.sort_by("sample_id")
    raw_status = joined["status"]
    missing = pc.is_null(raw_status)
    known = pc.is_in(raw_status, value_set=pa.array(STATUSES[:3]))
    status = pc.if_else(missing, "missing", pc.if_else(known, raw_status, "failed_to_download"))
    success = pc.equal(status, "success")
    null_str = pa.scalar(None, pa.string())
    error = pc.if_else(success, null_str, pc.if_else(
        missing, MISSING_MESSAGE, pc.coalesce(joined["error_message"], "img2dataset gave no error message")))
    null_int = pa.scalar(None, pa.int32())
    table = pa.table({
        "sample_id": joined["sample_id"], "url": joined["url"], "status": status, "error_message": error,
        "width": pc.if_else(success, joined["width"], null_int),
        "height": pc.if_else(success, joined["height"], null_int),
        "sha256": pc.if_else(success, joined["sha256"], null_str),
        "staging_shard": joined["staging_shard"], "staging_key": joined["key"],
    }, schema=DOWNLOADS_SCHEMA)

    status_counts = Counter(table["status"].to_pylist())
    errors = Counter(e for e in table["error_message"].to_pylist() if e)
    layout_counts = {s: status_counts.get(s, 0) for s in STATUSES}
    counts = {
        "selected": urls.num_rows,
        **layout_counts,
        "failed_by_reason": {s: layout_counts[s] for s in STATUSES[1:]},
        "errors": dict(errors.most_common(50)),
        "staging_shards": per_shard,
        "download_seconds": round(seconds, 3),
        "settings": {"image_size": cfg.image_size, "resize_mode": cfg.resize_mode,
                     "processes_count": cfg.processes_count, "thread_count": cfg.thread_count},
    }
    if table.num_rows != urls.num_rows or counts["selected"] != sum(layout_counts.values()):
        raise AssertionError(f"download: counts do not add up: {counts}")
    counts["_table"] = table
    return counts


# ----------------------------------------------------------------------------------------------- reading the images
def iter_staged_images(build_dir: str | Path, sample_ids: Iterable[int] | None = None) -> Iterator[tuple[int, bytes]]:
    """(sample_id, jpg bytes) of successful downloads, read from the staging tars, in ascending sample_id order
    (staging shards hold consecutive sample_id ranges because urls.parquet is sorted). `sample_ids` restricts the
    output (staging tars holding none of them are not opened). Raises if a successful sample's image is absent."""
    layout = BuildLayout(Path(build_dir))
    table = pq.read_table(layout.downloads, columns=["sample_id", "status", "staging_shard", "staging_key"])
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
    for shard in sorted(by_shard):
        keys = by_shard[shard]
        images: dict[int, bytes] = {}
        with tarfile.open(layout.staging_dir / f"{shard}.tar") as tar:
            for member in tar:
                stem, _, ext = member.name.rpartition(".")
                if ext == "jpg" and stem in keys:
                    images[keys[stem]] = tar.extractfile(member).read()
        lost = sorted(set(keys.values()) - set(images))
        if lost:
            raise FileNotFoundError(f"staging shard {shard}.tar lacks images of successful samples {lost[:10]}")
        for sid in sorted(images):
            yield sid, images[sid]


def _driver_main(argv: list[str]) -> int:
    """Entry point of the img2dataset subprocess: argv[0] is the JSON of img2dataset.download's kwargs."""
    kwargs = json.loads(argv[0])
    from img2dataset import download  # imported here: the parent process never pays for it

    download(**kwargs)
    return 0


if __name__ == "__main__":  # the spawn-safe guard img2dataset's worker pool needs
    sys.exit(_driver_main(sys.argv[1:]))
