"""Thin Prefect tasks: each calls ONE curation stage function with paths + a config dict and returns its small dict
of counts (Prefect pickles results: never DataFrames).

No Prefect result cache on the stages — why:
    Every stage is content-addressed on files (curation.io unit records, the stages' fingerprints): a unit is skipped
    if and only if its output records the fingerprint of its current inputs. That, not Prefect, decides what a rerun
    does, so a source edited in place, a grown source or a copied build is never served from a stale cache key
    (a key built from file stats or task inputs cannot see a source's content). A rerun of a finished build calls
    each stage, which checks its fingerprints and returns its recorded counts with "skipped": the check is cheap
    (benchmarks/bench_rerun.py measures it) and it is the one source of truth.
"""
from __future__ import annotations

import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from curation import dedup, index, manifest, parse, reshard, select, verify
from curation.build import download_any, ingest_any, prepare_build_dir
from curation.config import STAGE_CONFIGS, BuildConfig
from curation.download_parts import dask_parts
from curation.io import atomic_path
from curation.progress import format_progress
from curation.wds_source import is_wds_source


def stage_config(stage: str, cfg: dict[str, Any]) -> Any:
    """A stage's frozen config from its BuildConfig.to_dict() section (JSON lists back to tuples)."""
    return STAGE_CONFIGS[stage](**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


class ArtifactProgress:
    """A curation.progress callback that shows a stage's progress in the Prefect UI: one progress artifact per
    stage unit (percent done, with rate and ETA in its description) and a run-log line every `log_step` percent.
    Progress is a view: a failing API call is logged once and never fails the stage."""

    def __init__(self, log_step: float = 10.0):
        self.log_step = log_step
        self.artifact_id: Any = None
        self.logged = -log_step
        self.broken = False

    def __call__(self, state: dict[str, Any]) -> None:
        if self.broken or not state["total"]:
            return
        percent = min(100.0, 100.0 * state["done"] / state["total"])
        text = format_progress(state)
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(progress=percent, description=text)
            else:
                update_progress_artifact(self.artifact_id, progress=percent, description=text)
            if percent - self.logged >= self.log_step or (percent >= 100.0 > self.logged):
                self.logged = percent
                get_run_logger().info("%s", text)
        except Exception as err:  # noqa: BLE001 - the stage's work matters more than its progress bar
            self.broken = True
            get_run_logger().warning("progress artifact disabled: %s", err)


# ------------------------------------------------------------------------------------------------------------ tasks
@task(name="prepare-build-dir", cache_policy=None)
def prepare_task(build_config: dict[str, Any]) -> str:
    """Writes config.json; refuses a build folder made with another config (curation.build.prepare_build_dir)."""
    return str(prepare_build_dir(BuildConfig.from_dict(build_config)).root)


@task(name="fetch-source", retries=2, retry_delay_seconds=5)
def fetch_source(source: str, build_dir: str) -> str:
    """A local path is used as is; an http(s) URL is fetched once into <build>/source/ (kept for the manifest).
    Webdataset shards are never fetched here: ingest and extraction stream them (curation.wds_source)."""
    if is_wds_source(source):
        return source if source.startswith(("http://", "https://")) else str(Path(source).absolute())
    if not source.startswith(("http://", "https://")):
        return str(Path(source).resolve())
    target = Path(build_dir) / "source" / (Path(urllib.parse.urlparse(source).path).name or "source.tsv")
    if not target.exists():
        with atomic_path(target) as tmp:
            urllib.request.urlretrieve(source, tmp)
    return str(target)


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_task(source: str, build_dir: str, cfg: dict[str, Any], processes: int = 1) -> dict[str, Any]:
    return ingest_any(source, build_dir, stage_config("ingest", cfg), ArtifactProgress(), processes)


@task(name="parse", cache_policy=NO_CACHE)
def parse_task(build_dir: str, part: str, cfg: dict[str, Any]) -> dict[str, Any]:
    return parse.parse_part(build_dir, part, stage_config("parse", cfg), ArtifactProgress())


@task(name="select", cache_policy=NO_CACHE)
def select_task(build_dir: str, part: str, cfg: dict[str, Any]) -> dict[str, Any]:
    return select.select_part(build_dir, part, stage_config("select", cfg))


# `source`: a webdataset source is extracted from its shards instead (curation.build.download_any).
@task(name="download", cache_policy=NO_CACHE)
def download_task(build_dir: str, cfg: dict[str, Any], http_proxy: str | None = None, source: str | None = None,
                  dask: dict[str, Any] | None = None) -> dict[str, Any]:
    """`dask` ({"address": scheduler or None, "workers": n}): the download's parts run on Dask workers
    (curation.download_parts.dask_parts; None address: a LocalCluster for the download)."""
    download_cfg = stage_config("download", {**cfg, "http_proxy": http_proxy})
    if dask is None:
        return download_any(source, build_dir, download_cfg, ArtifactProgress())
    with dask_parts(dask.get("address"), int(dask.get("workers", 2))) as parts:
        return download_any(source, build_dir, download_cfg, ArtifactProgress(), parts)


@task(name="verify", cache_policy=None)  # a cheap gate: always re-checked
def verify_task(build_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    return verify.verify_downloads(build_dir, stage_config("verify", cfg))


@task(name="dedup", cache_policy=NO_CACHE)
def dedup_task(build_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    return dedup.deduplicate(build_dir, stage_config("dedup", cfg), progress=ArtifactProgress())


@task(name="index", cache_policy=NO_CACHE)
def index_task(build_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    return index.build_index(build_dir, stage_config("index", cfg))


@task(name="reshard", cache_policy=NO_CACHE)
def reshard_task(build_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    return reshard.reshard(build_dir, stage_config("shard", cfg), ArtifactProgress())


@task(name="manifest", cache_policy=None)  # cheap, and it must reflect this run's stage results
def manifest_task(build_dir: str, build_config: dict[str, Any], stage_results: dict[str, Any]) -> str:
    return str(manifest.write_manifest(build_dir, BuildConfig.from_dict(build_config), stage_results))


# The report is a pure function of the finished build: curation.report redoes it only when manifest.json changed.
@task(name="report", cache_policy=NO_CACHE)
def report_task(build_dir: str) -> dict[str, str]:
    from curation import report  # DuckDB views and plots: imported only when a report is made

    path = report.write_report(build_dir)
    return {"path": str(path), "markdown": report.report_markdown(build_dir)}
