"""Thin Prefect tasks: each calls ONE curation stage function with paths + a config dict and returns its small dict
of counts (Prefect pickles results: never DataFrames).

Caching (resume) — why it is built this way:
    The stage functions are idempotent on files (a unit whose output exists is skipped), and that is what makes a
    resumed build correct. Prefect's cache is only a shortcut on top: the default policy includes the flow-run id
    (no reuse across runs), so the side-effect stages use `stage_cache(...)` = INPUTS + TASK_SOURCE + StageFiles:
    the task's inputs, its source, the code version (manifests.code_version) and a stat fingerprint (path, size,
    mtime_ns) of the files the stage WRITES. Consequences:
      - outputs deleted or rewritten -> different key (missing outputs give a never-seen key) -> the task runs and
        the stage recreates them: a side effect is never skipped because of a stale cache entry;
      - a finished build rerun -> the stage is called at most once more (it skips its units: no work), then the
        key is stable and later runs come straight from the cache (task state "Cached");
      - new code (commit) or another config -> new key.
    The key is computed before the task runs, so it cannot describe the outputs the run is about to write: that is
    why the first rerun of a fresh build calls the (idempotent) stage once instead of hitting the cache.
"""
from __future__ import annotations

import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from curation import dedup, index, manifest, parse, reshard, select, verify
from curation.build import download_any, ingest_any, prepare_build_dir
from curation.config import STAGE_CONFIGS, BuildConfig
from curation.io import atomic_path
from curation.progress import format_progress
from curation.wds_source import is_wds_source
from manifests.version import code_version


@dataclass
class StageFiles(CachePolicy):
    """Cache-key part: code version + (path, size, mtime_ns) of the stage's input and output files.

    Patterns are globs relative to the task's `build_dir` input, formatted with the task's inputs (e.g.
    "captions/{part}"). An output pattern with no match yields a random key, so the task always runs; inputs are
    fingerprinted as found (a rewritten upstream file changes the key of everything downstream).
    """

    outputs: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        build_dir = Path(inputs["build_dir"])
        fingerprint: list[Any] = [code_version()]
        for role, patterns in (("out", self.outputs), ("in", self.inputs)):
            for pattern in patterns:
                matches = sorted(build_dir.glob(pattern.format(**inputs)))
                if role == "out" and not matches:
                    return uuid.uuid4().hex
                for path in matches:
                    stat = path.stat()
                    fingerprint.append((role, str(path.relative_to(build_dir)), stat.st_size, stat.st_mtime_ns))
        return hash_objects(*fingerprint)


def stage_cache(outputs: tuple[str, ...], inputs: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> CachePolicy:
    """INPUTS (minus `exclude`) + TASK_SOURCE + StageFiles(outputs, inputs)."""
    task_inputs = INPUTS
    for name in exclude:
        task_inputs = task_inputs - name
    return task_inputs + TASK_SOURCE + StageFiles(outputs=outputs, inputs=inputs)


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


# `processes` (download.processes_count) only speeds up reading webdataset shards: not in the cache key.
@task(name="ingest", cache_policy=stage_cache(("ingest/ingest-done.json",), exclude=("processes",)))
def ingest_task(source: str, build_dir: str, cfg: dict[str, Any], processes: int = 1) -> dict[str, Any]:
    return ingest_any(source, build_dir, stage_config("ingest", cfg), ArtifactProgress(), processes)


@task(name="parse", cache_policy=stage_cache(("captions/{part}",), ("ingest/{part}",)))
def parse_task(build_dir: str, part: str, cfg: dict[str, Any]) -> dict[str, Any]:
    return parse.parse_part(build_dir, part, stage_config("parse", cfg), ArtifactProgress())


@task(name="select", cache_policy=stage_cache(("selected/{part}",), ("captions/{part}",)))
def select_task(build_dir: str, part: str, cfg: dict[str, Any]) -> dict[str, Any]:
    return select.select_part(build_dir, part, stage_config("select", cfg))


# The proxy (the sample server's port changes every run) does not change what is downloaded: not in the key.
# `source`: a webdataset source is extracted from its shards instead (curation.build.download_any).
@task(name="download",
      cache_policy=stage_cache(("downloads.parquet",), ("selected/part-*.parquet",), exclude=("http_proxy",)))
def download_task(build_dir: str, cfg: dict[str, Any], http_proxy: str | None = None,
                  source: str | None = None) -> dict[str, Any]:
    return download_any(source, build_dir, stage_config("download", {**cfg, "http_proxy": http_proxy}),
                        ArtifactProgress())


@task(name="verify", cache_policy=None)  # a cheap gate: always re-checked
def verify_task(build_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    return verify.verify_downloads(build_dir, stage_config("verify", cfg))


@task(name="dedup", cache_policy=stage_cache(("kept.parquet", "duplicates.parquet"), ("downloads.parquet",)))
def dedup_task(build_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    return dedup.deduplicate(build_dir, stage_config("dedup", cfg), progress=ArtifactProgress())


@task(name="index", cache_policy=stage_cache(
    ("index/entity_index.parquet", "index/partners.parquet", "index/cooccurrence.parquet"), ("kept.parquet",)))
def index_task(build_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    return index.build_index(build_dir, stage_config("index", cfg))


@task(name="reshard", cache_policy=stage_cache(
    ("shards/cc4m-*.tar", "meta/part-*.parquet", "index/locator.parquet"), ("kept.parquet", "index/partners.parquet")))
def reshard_task(build_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    return reshard.reshard(build_dir, stage_config("shard", cfg), ArtifactProgress())


@task(name="manifest", cache_policy=None)  # cheap, and it must reflect this run's stage results
def manifest_task(build_dir: str, build_config: dict[str, Any], stage_results: dict[str, Any]) -> str:
    return str(manifest.write_manifest(build_dir, BuildConfig.from_dict(build_config), stage_results))


# The report is a pure function of the finished build: redone only when manifest.json changed or it is missing.
@task(name="report", cache_policy=stage_cache(("report/index.html", "report/report.md"), ("manifest.json",)))
def report_task(build_dir: str) -> dict[str, str]:
    from curation import report  # not written yet by its owner at the time of writing: imported late

    path = report.write_report(build_dir)
    return {"path": str(path), "markdown": report.report_markdown(build_dir)}
