"""The download stage's settings: img2dataset's options plus the guard and caps, validated when the config is read.

Its own module so that the stage and the modules it drives (driver, rounds, parts) all import it from below.
"""
from __future__ import annotations

import json
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from curation.fetch import DEFAULT_MAX_BYTES, DEFAULT_MAX_REDIRECTS, FetchPolicy, parse_networks
from curation.imaging import DEFAULT_MAX_PIXELS, IMAGING_VERSION

# The download driver's exit code when a write of the driver or of a worker failed with ENOSPC/EDQUOT: the worker
# signals the driver (DISK_FULL_SIGNAL, pid in DRIVER_PID_ENV), which exits with DISK_FULL_EXIT at once; the parent
# says so in one line (curation.diskspace).
DISK_FULL_EXIT = 28
DISK_FULL_SIGNAL = signal.SIGUSR1
DRIVER_PID_ENV = "CC4M_DOWNLOAD_DRIVER_PID"

RESIZE_MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no")
DISTRIBUTORS = ("multiprocessing",)
# img2dataset's other distributors: neither package is installed nor tested here. Refused when the config is read.
CLUSTER_DISTRIBUTORS = ("pyspark", "ray")
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
    shards_per_part: int = 4
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
                    "max_bytes", "max_pixels", "max_attempts", "shards_per_part")
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
        if self.distributor in CLUSTER_DISTRIBUTORS:
            raise ValueError(f"DownloadConfig.distributor {self.distributor!r} is not supported (not installed, not "
                             f"tested); to download on a cluster, run the build flow with task_runner='dask' "
                             f"(dask_address=tcp://scheduler:8786): each download part runs on a Dask worker")
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
