"""Download stage: selected/* -> staging/ (img2dataset, in a subprocess) -> downloads.parquet.

Why a subprocess: img2dataset uses a `spawn` multiprocessing pool (workers re-import `__main__`, which breaks under
Prefect's flow loader and hangs scripts without a main guard) and its own heavy imports; running it as
`python -m curation.download <json>` (this module, main-guarded) isolates all of that.

What runs there is img2dataset with two parts swapped (`curation.download_worker`): the fetch is the guarded fetcher
(`curation.fetch`: http/https only, address guard on every connection and redirect hop, size cap, whole-transfer
deadline) and the decoder is `curation.imaging.to_stored_jpeg` (pixel cap from the header, EXIF-upright, resized).

Why our own sample_id: img2dataset's keys depend on the shard size and tar members come in completion order, so
`sample_id` rides along via `save_additional_columns` and every mapping goes through the staging parquets.

Failures are classified (`curation.fetch`): every failed row has a `reason` (blocked_address, http_404, timeout,
too_large, too_many_pixels, undecodable, ...) and `transient` (timeouts, resets, 408/425/429, 5xx: may pass later).
With `retry_transient`, a rerun of a finished download fetches the transient failures again into a new round
(`staging/retry-NNNN/`), up to `max_attempts` per sample; `attempts`, `first_attempt_at` and `last_attempt_at`
record it (an attempt = one round that fetched the sample; a round makes up to 1 + `retries` requests for a
transient failure). downloads.parquet is always recomputed from staging/ and its rounds, latest round winning.

downloads.parquet's `sha256` is the hash of the ORIGINAL downloaded bytes (provenance; before resizing);
`stored_sha256` / `stored_phash` are the stored JPEG's, made by the workers (dedup uses them; kept.parquet and the
shards' meta carry the stored sha256 on).

Nothing is lost silently: downloads.parquet has exactly one row per selected sample. Rows img2dataset never reported
(e.g. a shard that failed all its retries) get status "missing" with an error message.
"""
from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import tario
from curation.fetch import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_REDIRECTS,
    OWN_FAILURE_REASONS,
    FetchPolicy,
    is_transient,
    parse_networks,
    reason_of,
)
from curation.imagehash import STORED_HASH_FIELDS
from curation.imaging import DEFAULT_MAX_PIXELS, IMAGING_VERSION
from curation.io import fingerprint_of, read_parquet, table_digest, write_parquet_atomic
from curation.layout import BuildLayout
from curation.lifetime import exit_with_parent, group_alive, kill_process_group

log = logging.getLogger(__name__)

URLS_NAME = "urls.parquet"
LOG_NAME = "img2dataset.log"
RETRY_PREFIX = "retry-"
DOWNLOADS_META_KEY = b"cc4m.download"
STATUSES = ("success", "failed_to_download", "failed_to_resize", "missing")
RESIZE_MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no")
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
# The embedded sample's reserved host (curation.sample.SAMPLE_HOST): the only host `http_proxy` serves by default.
SAMPLE_PROXY_HOSTS = ("cc4m-sample.invalid",)
# Arguments the stage itself owns: overriding them through `extra_img2dataset_args` would break the contract.
RESERVED_ARGS = frozenset({
    "url_list", "output_folder", "input_format", "output_format", "url_col", "caption_col", "save_additional_columns",
    "incremental_mode", "enable_wandb", "image_size", "resize_mode", "processes_count", "thread_count", "timeout",
    "retries", "number_sample_per_shard", "encode_quality", "distributor", "encode_format", "compute_hash",
})
# img2dataset's cv2 resizer options that curation.imaging (the one decoder of every route) does not implement.
UNSUPPORTED_ARGS = frozenset({
    "resize_only_if_bigger", "upscale_interpolation", "downscale_interpolation", "skip_reencode",
    "disable_all_reencoding", "bbox_col",
})
REPO_ROOT = Path(__file__).resolve().parent.parent

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

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class DownloadConfig:
    """img2dataset settings plus the guard and caps (curation.fetch).

    `allowed_networks`: CIDRs the address guard lets through (default none: only globally routable addresses).
    `max_bytes`: response size cap; `max_pixels`: decoded pixel cap, read from the header; `max_seconds`: deadline of
    one whole fetch, redirects included; `timeout`: per socket operation.
    `http_proxy` (the embedded sample's local server) serves only `proxy_hosts`, reserved `.invalid` names.
    `retry_transient`: a rerun of a finished download fetches the transient failures again, while a sample has had
    fewer than `max_attempts` rounds. `extra_img2dataset_args` are passed through verbatim (e.g.
    {"min_image_size": 64}), except the RESERVED_ARGS and UNSUPPORTED_ARGS."""

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
    proxy_hosts: tuple[str, ...] = SAMPLE_PROXY_HOSTS
    allowed_networks: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_seconds: float = 60.0
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    retry_transient: bool = False
    max_attempts: int = 3
    subprocess_timeout_s: float | None = None
    stall_timeout_s: float = 1800.0
    progress_interval_s: float = 5.0
    extra_img2dataset_args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = ("image_size", "processes_count", "thread_count", "timeout", "number_sample_per_shard",
                    "max_bytes", "max_pixels", "max_attempts")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DownloadConfig.{name} must be a positive int, got {value!r}")
        for name in ("retries", "max_redirects"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DownloadConfig.{name} must be an int >= 0, got {value!r}")
        for name in ("max_seconds", "progress_interval_s", "stall_timeout_s"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ValueError(f"DownloadConfig.{name} must be a positive number, got {getattr(self, name)!r}")
        if not isinstance(self.retry_transient, bool):
            raise ValueError(  # noqa: TRY004 - the team contract: every config error is a ValueError
                f"DownloadConfig.retry_transient must be true or false, got {self.retry_transient!r}")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError(f"DownloadConfig.encode_quality must be in 1..100, got {self.encode_quality!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"DownloadConfig.resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.distributor not in DISTRIBUTORS:
            raise ValueError(f"DownloadConfig.distributor must be one of {DISTRIBUTORS}, got {self.distributor!r}")
        if self.http_proxy is not None and not str(self.http_proxy).startswith("http://"):
            raise ValueError(f"DownloadConfig.http_proxy must be an http://host:port URL or None, got "
                             f"{self.http_proxy!r}")
        if self.subprocess_timeout_s is not None and self.subprocess_timeout_s <= 0:
            raise ValueError("DownloadConfig.subprocess_timeout_s must be positive or None")
        for name in ("allowed_networks", "proxy_hosts"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ValueError(f"DownloadConfig.{name} must be a list of strings, got {value!r}")  # noqa: TRY004
            object.__setattr__(self, name, tuple(value))
        parse_networks(self.allowed_networks)  # a typo fails here, before any work
        self.fetch_policy()  # validates proxy and proxy_hosts
        extra = dict(self.extra_img2dataset_args or {})
        clash = sorted(set(extra) & RESERVED_ARGS)
        if clash:
            raise ValueError(f"DownloadConfig.extra_img2dataset_args may not set {clash}: use the config fields")
        unsupported = sorted(set(extra) & UNSUPPORTED_ARGS)
        if unsupported:
            raise ValueError(f"DownloadConfig.extra_img2dataset_args: {unsupported} are img2dataset resizer options "
                             "that cc4m's decoder (curation.imaging) does not implement")
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
        d["allowed_networks"] = list(self.allowed_networks)
        d["proxy_hosts"] = list(self.proxy_hosts)
        return d

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(allowed_networks=self.allowed_networks, max_bytes=self.max_bytes, timeout=self.timeout,
                           max_seconds=self.max_seconds, max_redirects=self.max_redirects, proxy=self.http_proxy,
                           proxy_hosts=self.proxy_hosts)

    def staging_fingerprint(self) -> dict[str, Any]:
        """Settings that change what lands in staging/ (proxy, parallelism, distributor and retries do not)."""
        return {
            "imaging": IMAGING_VERSION, "image_size": self.image_size, "resize_mode": self.resize_mode,
            "encode_quality": self.encode_quality,
            "number_sample_per_shard": self.number_sample_per_shard, "extra": dict(self.extra_img2dataset_args),
            "guard": {"allowed_networks": list(self.allowed_networks), "max_bytes": self.max_bytes,
                      "max_pixels": self.max_pixels, "max_seconds": self.max_seconds,
                      "max_redirects": self.max_redirects, "proxy_hosts": list(self.proxy_hosts)},
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


def collect_selected(build_dir: str | Path) -> pa.Table:
    """sample_id, url, caption of every selected sample, in sample_id order (sample ids must be unique)."""
    layout = BuildLayout(Path(build_dir))
    parts = layout.parts(layout.selected_dir)
    if not parts:
        raise FileNotFoundError(f"download: no selected parts in {layout.selected_dir} (run select first)")
    table = pa.concat_tables(read_parquet(p, columns=["sample_id", "url", "caption"]) for p in parts)
    table = table.sort_by("sample_id")
    ids = table["sample_id"].to_numpy()
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
        raise ValueError("download: duplicate sample_id across selected parts")
    return table.cast(pa.schema([("sample_id", pa.int64()), ("url", pa.string()), ("caption", pa.string())]))


def _stats_progress(output_folder: Path, total: int, done_before: int, started: float) -> dict[str, Any]:
    done = successes = 0
    for path in Path(output_folder).glob("*_stats.json"):
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):  # being written: counted at the next poll
            continue
        done += int(stats.get("count", 0))
        successes += int(stats.get("successes", 0))
    elapsed = max(time.monotonic() - started, 1e-6)
    rate = (done - done_before) / elapsed
    eta = (total - done) / rate if rate > 0 else None
    return {"stage": "download", "done": done, "total": total, "unit": "images", "rate": round(rate, 3),
            "eta_s": None if eta is None else round(eta, 1), "successes": successes}


def run_img2dataset(payload: dict[str, Any], cfg: DownloadConfig, log_path: Path, total: int,
                    progress: Progress | None = None) -> None:
    """Run img2dataset in a fresh interpreter (this module's main guard); raise with the log's tail on failure.
    While it runs, its finished shards' `*_stats.json` give the progress (logged, and passed to `progress`)."""
    env = dict(os.environ)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("WANDB_MODE", "disabled")
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        env.pop(name, None)  # the guarded fetcher takes its proxy from the config only
    output = Path(payload["img2dataset"]["output_folder"])
    cmd = [sys.executable, "-m", "curation.download", json.dumps({**payload, "parent_pid": os.getpid()})]
    started = time.monotonic()
    done_before = _stats_progress(output, total, 0, started)["done"]
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd[:3])}\n".encode())
        log_file.flush()
        # Its own session: img2dataset's spawned workers join its group, so one killpg stops them all (lifetime).
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                start_new_session=True)
        stall = _StallWatch(output, cfg.stall_timeout_s)
        try:
            while True:
                try:
                    proc.wait(timeout=cfg.progress_interval_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if cfg.subprocess_timeout_s is not None and time.monotonic() - started > cfg.subprocess_timeout_s:
                    raise DownloadStalled(f"download: img2dataset ran past subprocess_timeout_s="
                                          f"{cfg.subprocess_timeout_s:g}s; it and its workers were stopped (log "
                                          f"{log_path})")
                stall.check(log_path)
                _report(_stats_progress(output, total, done_before, started), progress)
        finally:
            if proc.poll() is None or group_alive(proc.pid):
                kill_process_group(proc)
    _report(_stats_progress(output, total, done_before, started), progress)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"img2dataset subprocess failed with exit code {proc.returncode}; log {log_path}:\n{tail}")


class DownloadStalled(RuntimeError):
    """img2dataset ran past its time limit, or made no progress for stall_timeout_s (disk full, hung worker)."""


class _StallWatch:
    """No byte written under the staging round (tars, parquets, img2dataset's _tmp) and no new stats file for
    `timeout_s`: the download is stuck, e.g. on a full disk, where img2dataset waits forever."""

    def __init__(self, folder: Path, timeout_s: float) -> None:
        self.folder, self.timeout_s = folder, timeout_s
        self.last_state: tuple[int, int] | None = None
        self.last_change = time.monotonic()

    def _state(self) -> tuple[int, int]:
        size = files = 0
        for path in self.folder.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file():
                    size += path.stat().st_size
                    files += 1
        return size, files

    def check(self, log_path: Path) -> None:
        state = self._state()
        now = time.monotonic()
        if state != self.last_state:
            self.last_state, self.last_change = state, now
        elif now - self.last_change > self.timeout_s:
            raise DownloadStalled(
                f"download: no progress for {self.timeout_s:g}s (nothing written under {self.folder}): a full disk "
                f"or a hung worker? img2dataset and its workers were stopped; free space and rerun (finished shards "
                f"are kept). Log: {log_path}")


def _report(state: dict[str, Any], progress: Progress | None) -> None:
    eta = "?" if state["eta_s"] is None else f"{state['eta_s']:.0f}s"
    log.info("download: %d/%d images done, %d successes, %.1f images/s, ETA %s", state["done"], state["total"],
             state["successes"], state["rate"], eta)
    if progress is not None:
        progress({k: state[k] for k in ("stage", "done", "total", "unit", "rate", "eta_s")})


def _read_staging_parquet(path: Path) -> pa.Table:
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


def _payload(cfg: DownloadConfig, urls_path: Path, output: Path) -> dict[str, Any]:
    policy = cfg.fetch_policy()
    return {"img2dataset": cfg.img2dataset_kwargs(urls_path, output), "max_pixels": cfg.max_pixels,
            "policy": {"allowed_networks": list(policy.allowed_networks), "max_bytes": policy.max_bytes,
                       "timeout": policy.timeout, "max_seconds": policy.max_seconds,
                       "max_redirects": policy.max_redirects, "proxy": policy.proxy,
                       "proxy_hosts": list(policy.proxy_hosts)}}


def _write_round_urls(path: Path, urls: pa.Table, cfg: DownloadConfig) -> None:
    meta = {DOWNLOADS_META_KEY: json.dumps({"staging": cfg.staging_fingerprint()}, sort_keys=True).encode()}
    write_parquet_atomic(path, urls.replace_schema_metadata(meta))


def _round_staging(path: Path) -> Any:
    old = (pq.read_schema(path).metadata or {}).get(DOWNLOADS_META_KEY)
    return json.loads(old).get("staging") if old else None


def _round_folders(staging: Path) -> list[Path]:
    """Every round that was started (its urls.parquet written), in order."""
    return [staging / r for r in staging_rounds(staging) if (staging / r / URLS_NAME).exists()]


def _round_done(folder: Path, cfg: DownloadConfig) -> bool:
    rows = pq.read_metadata(folder / URLS_NAME).num_rows
    return len(staging_shards(folder)) >= -(-rows // cfg.number_sample_per_shard)


def _run_round(folder: Path, urls: pa.Table, cfg: DownloadConfig, log_path: Path,
               progress: Progress | None) -> None:
    """img2dataset over urls (written to folder/urls.parquet already) unless every shard of the round is done."""
    if urls.num_rows and not _round_done(folder, cfg):
        log.info("download: %d urls in %s, %d staging shards already done", urls.num_rows, folder,
                 len(staging_shards(folder)))
        run_img2dataset(_payload(cfg, folder / URLS_NAME, folder), cfg, log_path, urls.num_rows, progress)


def _resume_unfinished(staging: Path, cfg: DownloadConfig, progress: Progress | None) -> bool:
    """Finish every round a killed build left unfinished (img2dataset's incremental mode); True if any ran."""
    ran = False
    for folder in _round_folders(staging):
        if not _round_done(folder, cfg):
            _run_round(folder, read_parquet(folder / URLS_NAME), cfg, staging / LOG_NAME, progress)
            ran = True
    return ran


def _not_yet_fetched(staging: Path, urls: pa.Table) -> pa.Table:
    """Selected (sample_id, url) pairs no round has asked for: the rows a grown or edited source added. A sample
    whose url changed counts as new; samples no longer selected are simply not asked for again."""
    folders = _round_folders(staging)
    if not folders:
        return urls
    asked = pa.concat_tables(read_parquet(f / URLS_NAME, columns=["sample_id", "url"]) for f in folders)
    return urls.join(asked, keys=["sample_id", "url"], join_type="left anti").sort_by("sample_id")


def _new_round(staging: Path, rows: pa.Table, cfg: DownloadConfig, progress: Progress | None, why: str) -> None:
    folder = staging if not (staging / URLS_NAME).exists() else \
        staging / f"{RETRY_PREFIX}{len(staging_rounds(staging)):04d}"
    folder.mkdir(parents=True, exist_ok=True)
    _write_round_urls(folder / URLS_NAME, rows, cfg)
    log.info("download: %d %s in %s", rows.num_rows, why, folder.name)
    _run_round(folder, rows, cfg, staging / LOG_NAME, progress)


def _discard_other_settings(layout: BuildLayout, cfg: DownloadConfig) -> None:
    """Rounds fetched with other image settings would mix two kinds of staged image: start over."""
    first = layout.staging_dir / URLS_NAME
    if first.exists() and _round_staging(first) != cfg.staging_fingerprint():
        log.warning("download: image settings changed, discarding %s", layout.staging_dir)
        shutil.rmtree(layout.staging_dir)
        layout.downloads.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------------------- the stage
def download_selected(build_dir: str | Path, cfg: DownloadConfig, progress: Progress | None = None) -> dict[str, Any]:
    """selected/* -> staging/ -> downloads.parquet (one row per selected sample). Idempotent, resumable
    (img2dataset's incremental mode continues a round from its finished staging shards) and incremental: selected
    rows that no round has asked for yet (a grown source) are fetched in a new round, and only they. With
    cfg.retry_transient, a finished download fetches its transient failures again (a new round). `progress` is
    called with {"stage": "download", "done", "total", "unit": "images", "rate", "eta_s"} while img2dataset runs.
    Returns counts by status and reason."""
    layout = BuildLayout(Path(build_dir))
    staging = layout.staging_dir
    urls = collect_selected(build_dir)
    fingerprint = fingerprint_of({"urls": table_digest(urls), "staging": cfg.staging_fingerprint()})

    if layout.downloads.exists():
        meta = (pq.read_schema(layout.downloads).metadata or {}).get(DOWNLOADS_META_KEY)
        recorded = json.loads(meta) if meta else {}
        # "missing" rows mean img2dataset gave up on a shard: a rerun retries just those shards (incremental mode).
        if recorded.get("fingerprint") == fingerprint and recorded["counts"].get("missing", 0) == 0:
            retry = _retry_candidates(layout, cfg)
            if retry.num_rows == 0:
                return {**recorded["counts"], "skipped": True}
            return _retry_round(layout, urls, retry, cfg, fingerprint, progress)

    _discard_other_settings(layout, cfg)
    staging.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _resume_unfinished(staging, cfg, progress)
    new = _not_yet_fetched(staging, urls)
    if new.num_rows or not (staging / URLS_NAME).exists():
        _new_round(staging, new, cfg, progress, "selected rows not fetched yet")
    result = _finish(layout, urls, cfg, fingerprint, time.perf_counter() - started)
    # Shards a killed build finished while its proxy was already gone: fetch their rows again now, once.
    own = _retry_candidates(layout, replace(cfg, retry_transient=False))
    if own.num_rows:
        return _retry_round(layout, urls, own, cfg, fingerprint, progress)
    return result


def _finish(layout: BuildLayout, urls: pa.Table, cfg: DownloadConfig, fingerprint: str,
            seconds: float) -> dict[str, Any]:
    counts = _collect(layout, urls, cfg, seconds)
    table = counts.pop("_table")
    meta = {DOWNLOADS_META_KEY: json.dumps({"fingerprint": fingerprint, "counts": counts}, sort_keys=True).encode()}
    write_parquet_atomic(layout.downloads, table.replace_schema_metadata(meta))
    return {**counts, "skipped": False}


def _retry_candidates(layout: BuildLayout, cfg: DownloadConfig) -> pa.Table:
    """Failures to fetch again: the build's own (proxy_unreachable) always; with retry_transient, the transient ones
    while a sample has had fewer than max_attempts rounds."""
    table = read_parquet(layout.downloads, columns=["sample_id", "status", "reason", "transient", "attempts"])
    failed = pc.not_equal(table["status"], "success")
    own = pc.is_in(table["reason"], value_set=pa.array(sorted(OWN_FAILURE_REASONS)))
    mask = pc.and_(failed, pc.fill_null(own, False))
    if cfg.retry_transient:
        transient = pc.and_(pc.fill_null(table["transient"], False), pc.less(table["attempts"], cfg.max_attempts))
        mask = pc.or_(mask, pc.and_(failed, transient))
    return table.filter(mask).select(["sample_id"])


def _retry_round(layout: BuildLayout, urls: pa.Table, retry: pa.Table, cfg: DownloadConfig, fingerprint: str,
                 progress: Progress | None) -> dict[str, Any]:
    """Fetch the transient failures again in a new round staging/retry-NNNN/ (an unfinished round is resumed
    first, and then counts as this run's round)."""
    started = time.perf_counter()
    if not _resume_unfinished(layout.staging_dir, cfg, progress):
        subset = urls.filter(pc.is_in(urls["sample_id"], value_set=retry["sample_id"]))
        _new_round(layout.staging_dir, subset, cfg, progress, "transient failures to retry")
    return _finish(layout, urls, cfg, fingerprint, time.perf_counter() - started)


STAGED_SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), *STORED_HASH_FIELDS,
    ("staging_shard", pa.string()), ("attempt_at", TIMESTAMP),
])
MISSING_MESSAGE = "missing: not reported by any finished img2dataset staging shard"


def _read_round(folder: Path, prefix: str, per_shard: list[dict[str, Any]]) -> pa.Table:
    """Every finished shard of one round, with its staging_shard name and its start time."""
    tables = []
    for shard in staging_shards(folder):
        path = folder / f"{shard}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"download: {shard}_stats.json exists but {path} does not")
        stats = json.loads((folder / f"{shard}_stats.json").read_text())
        table = _read_staging_parquet(path)
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


def _merge_rounds(layout: BuildLayout, urls: pa.Table, per_shard: list[dict[str, Any]]) -> pa.Table:
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


def _collect(layout: BuildLayout, urls: pa.Table, cfg: DownloadConfig, seconds: float) -> dict[str, Any]:
    """Join every finished staging shard of every round onto the selected urls (vectorised: CC12M-sized inputs)."""
    per_shard: list[dict[str, Any]] = []
    joined = _merge_rounds(layout, urls, per_shard)
    raw_status = joined["status"]
    missing = pc.is_null(raw_status)
    known = pc.is_in(raw_status, value_set=pa.array(STATUSES[:3]))
    status = pc.if_else(missing, "missing", pc.if_else(known, raw_status, "failed_to_download"))
    success = pc.equal(status, "success")
    null_str = pa.scalar(None, pa.string())
    error = pc.if_else(success, null_str, pc.if_else(
        missing, MISSING_MESSAGE, pc.coalesce(joined["error_message"], "other: img2dataset gave no error message")))
    reasons = [None if e is None else reason_of(e) for e in error.to_pylist()]
    reason = pa.array(reasons, pa.string())
    transient = pa.array([None if r is None else is_transient(r) for r in reasons], pa.bool_())
    null_int = pa.scalar(None, pa.int32())
    table = pa.table({
        "sample_id": joined["sample_id"], "url": joined["url"], "status": status, "reason": reason,
        "transient": transient, "error_message": error,
        "width": pc.if_else(success, joined["width"], null_int),
        "height": pc.if_else(success, joined["height"], null_int),
        "sha256": pc.if_else(success, joined["sha256"], null_str),
        "attempts": joined["attempts"], "first_attempt_at": joined["first_attempt_at"],
        "last_attempt_at": joined["attempt_at"],
        "staging_shard": joined["staging_shard"], "staging_key": joined["key"],
        **{name: pc.if_else(success, joined[name], pa.scalar(None, DOWNLOADS_SCHEMA.field(name).type))
           for name in STORED_HASH_COLUMNS},
    }, schema=DOWNLOADS_SCHEMA)

    status_counts = Counter(table["status"].to_pylist())
    reason_counts = Counter(r for r in reasons if r is not None)
    errors = Counter(e for e in table["error_message"].to_pylist() if e)
    layout_counts = {s: status_counts.get(s, 0) for s in STATUSES}
    counts = {
        "selected": urls.num_rows,
        **layout_counts,
        "failed": urls.num_rows - layout_counts["success"],
        "failed_by_reason": dict(sorted(reason_counts.items())),
        "failed_by_status": {s: layout_counts[s] for s in STATUSES[1:]},
        "transient": sum(1 for r in reasons if r is not None and is_transient(r)),
        "errors": dict(errors.most_common(50)),
        "rounds": len(staging_rounds(layout.staging_dir)),
        "staging_shards": per_shard,
        "download_seconds": round(seconds, 3),
        "settings": {"image_size": cfg.image_size, "resize_mode": cfg.resize_mode,
                     "processes_count": cfg.processes_count, "thread_count": cfg.thread_count},
    }
    if table.num_rows != urls.num_rows or counts["selected"] != sum(layout_counts.values()) \
            or counts["failed"] != sum(reason_counts.values()):
        raise AssertionError(f"download: counts do not add up: {counts}")
    counts["_table"] = table
    return counts


# ----------------------------------------------------------------------------------------------- reading the images
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


def _driver_main(argv: list[str]) -> int:
    """Entry point of the img2dataset subprocess: argv[0] is the JSON payload (img2dataset kwargs, fetch policy,
    pixel cap)."""
    payload = json.loads(argv[0])
    # First, before the heavy imports: an orphaned img2dataset must never write into the folder of a build that died.
    exit_with_parent(payload.get("parent_pid"))
    _leave_unused_packages_unloaded()
    from curation import download_worker  # imported here: the parent process never pays for img2dataset
    policy = FetchPolicy(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload["policy"].items()})
    download_worker.run(payload["img2dataset"], policy, int(payload["max_pixels"]))
    return 0


# img2dataset imports these at module level for things the download stage never does: webdataset (and through it
# torch) for its webdataset writer, which `curation.download_worker.StagingSampleWriter` replaces; wandb for W&B
# logging (enable_wandb is always False); albumentations for its resizer and bounding-box blurring (replaced, and
# refused by DownloadConfig). Loading them cost ~2.8 s of CPU in the driver, in each worker and in img2dataset's
# logger process: more than the image work of a 2,000-image round on two cores.
UNUSED_BY_THE_DOWNLOAD = ("webdataset", "wandb", "albumentations")


class _Unloaded(ModuleType):
    """Stands in for a package img2dataset imports but the download processes never use: any use fails loudly."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"{self.__name__}.{name}: {self.__name__} is not loaded in cc4m's download processes "
                             f"(curation.download.UNUSED_BY_THE_DOWNLOAD); this img2dataset feature is not supported")


def _leave_unused_packages_unloaded() -> None:
    """Only in the img2dataset driver and the processes it spawns (never in a process that may need them)."""
    for name in UNUSED_BY_THE_DOWNLOAD:
        sys.modules.setdefault(name, _Unloaded(name))


if __name__ == "__mp_main__":  # a process img2dataset's driver spawned (its workers, its logger) re-imports us so
    _leave_unused_packages_unloaded()

if __name__ == "__main__":  # the spawn-safe guard img2dataset's worker pool needs
    sys.exit(_driver_main(sys.argv[1:]))
