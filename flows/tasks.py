"""Thin Prefect tasks: `stage_task` runs ONE stage of the plan (curation.stages) from the build's config dict and
returns its small dict of counts (Prefect pickles results: never DataFrames).

No Prefect result cache on the stages — why:
    Every stage is content-addressed on files (curation.io unit records, the stages' fingerprints): a unit is skipped
    if and only if its output records the fingerprint of its current inputs. That, not Prefect, decides what a rerun
    does, so a source edited in place, a grown source or a copied build is never served from a stale cache key
    (a key built from file stats or task inputs cannot see a source's content). A rerun of a finished build calls
    each stage, which checks its fingerprints and returns its recorded counts with "skipped": the check is cheap
    (benchmarks/bench_rerun.py measures it) and it is the one source of truth.
"""
from __future__ import annotations

import urllib.request
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from curation import report
from curation.build import prepare_build_dir
from curation.config import BuildConfig
from curation.download_parts import dask_parts
from curation.io import atomic_path
from curation.progress import format_progress
from curation.source import open_source
from curation.stages import StageRun, stage_named


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
    """The source as the build reads it: a local one made absolute, a remote table fetched once into
    <build>/source/ (kept for the manifest); webdataset shards are never fetched whole (they are streamed)."""
    found = open_source(source)
    target = found.remote_copy(build_dir)
    if target is None:
        return found.absolute_location()
    if not target.exists():
        with atomic_path(target) as tmp:
            urllib.request.urlretrieve(source, tmp)
    return str(target)


@task(cache_policy=NO_CACHE)  # run under each stage's name: stage_task.with_options(name=stage.name)
def stage_task(stage: str, build_config: dict[str, Any], part: str | None = None,
               results: dict[str, Any] | None = None, dask: dict[str, Any] | None = None) -> dict[str, Any]:
    """One stage of the plan (curation.stages), for one ingest part when the stage runs per part. `dask`
    ({"address": a scheduler or None, "workers": n}): the download's parts run on Dask workers
    (curation.download_parts.dask_parts; address None: a LocalCluster of n worker processes for the download)."""
    named = stage_named(stage)
    if dask is not None and stage == "download":
        with dask_parts(dask.get("address"), int(dask.get("workers", 2))) as parts:
            return named.run(StageRun(BuildConfig.from_dict(build_config), ArtifactProgress(), results or {}, parts))
    run = StageRun(BuildConfig.from_dict(build_config), ArtifactProgress(), results or {})
    return named.run(run, part) if named.per_part else named.run(run)


# The report is a pure function of the finished build: curation.report redoes it only when manifest.json changed.
@task(name="report-markdown", cache_policy=NO_CACHE)
def report_markdown_task(build_dir: str) -> str:
    return report.report_markdown(build_dir)
