"""The stage plan: every build stage (declared in manifests.stages) bound to the function that runs it.

`curation.build` runs the plan in this process and `flows.build` runs it as Prefect tasks; both loop over
`STAGE_PLAN`, so the order, the per-part fan-out and what each stage is given are written here once. A stage function
takes a `StageRun` (and, for a per-part stage, the part's name) and returns the stage's small dict of counts.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.config import BuildConfig
from curation.dedup import deduplicate
from curation.download_parts import PartRunner
from curation.index import build_index
from curation.manifest import write_manifest
from curation.parse import parse_part
from curation.progress import ProgressCallback
from curation.report import write_report
from curation.reshard import reshard
from curation.select import select_part
from curation.source import Source, open_source
from curation.verify import verify_downloads
from manifests.layout import BuildLayout
from manifests.stages import BUILD_STAGES, StageSpec


@dataclass(frozen=True)
class StageRun:
    """What every stage is given: the build's config, where to report progress, and the results of the stages
    before it (the manifest cross-checks them against the files)."""

    cfg: BuildConfig
    progress: ProgressCallback | None = None
    results: Mapping[str, Any] = field(default_factory=dict)
    download_parts: PartRunner | None = None  # the download's parts on Dask workers (curation.download_parts)

    @property
    def build_dir(self) -> Path:
        return Path(self.cfg.build_dir)

    @property
    def source(self) -> Source:
        return open_source(self.cfg.source)


@dataclass(frozen=True)
class Stage:
    """A declared stage and its function: `run(StageRun)`, or `run(StageRun, part)` for a per-part stage."""

    spec: StageSpec
    run: Callable[..., dict[str, Any]]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def per_part(self) -> bool:
        return self.spec.per_part

    def outputs(self, layout: BuildLayout) -> list[Path]:
        return [getattr(layout, name) for name in self.spec.outputs]


def ingest_parts(results: Mapping[str, Any]) -> list[str]:
    """The ingest parts a per-part stage runs over."""
    return list(results["ingest"]["parts"])


def _ingest(run: StageRun) -> dict[str, Any]:
    # For a webdataset source reading shards is the download, so it uses the download's process count.
    return run.source.ingest(run.build_dir, run.cfg.ingest, run.progress, run.cfg.download.processes_count)


def _parse(run: StageRun, part: str) -> dict[str, Any]:
    return parse_part(run.build_dir, part, run.cfg.parse, run.progress)


def _select(run: StageRun, part: str) -> dict[str, Any]:
    return select_part(run.build_dir, part, run.cfg.select)


def _download(run: StageRun) -> dict[str, Any]:
    return run.source.materialize(run.build_dir, run.cfg.download, run.progress, run.download_parts)


def _verify(run: StageRun) -> dict[str, Any]:
    return verify_downloads(run.build_dir, run.cfg.verify)


def _dedup(run: StageRun) -> dict[str, Any]:
    return deduplicate(run.build_dir, run.cfg.dedup, progress=run.progress)


def _index(run: StageRun) -> dict[str, Any]:
    return build_index(run.build_dir, run.cfg.index)


def _reshard(run: StageRun) -> dict[str, Any]:
    return reshard(run.build_dir, run.cfg.shard, run.progress)


def _manifest(run: StageRun) -> dict[str, Any]:
    return {"path": str(write_manifest(run.build_dir, run.cfg, dict(run.results)))}


def _report(run: StageRun) -> dict[str, Any]:
    return {"path": str(write_report(run.build_dir))}


_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "ingest": _ingest, "parse": _parse, "select": _select, "download": _download, "verify": _verify,
    "dedup": _dedup, "index": _index, "reshard": _reshard, "manifest": _manifest, "report": _report,
}
STAGE_PLAN: tuple[Stage, ...] = tuple(Stage(spec, _FUNCTIONS[spec.name]) for spec in BUILD_STAGES)


def build_stage_plan() -> tuple[Stage, ...]:
    """The stages of a build, in order."""
    return STAGE_PLAN


def stage_named(name: str) -> Stage:
    for stage in STAGE_PLAN:
        if stage.name == name:
            return stage
    raise KeyError(f"no build stage {name!r}")


def run_stage(stage: Stage, run: StageRun) -> Any:
    """One stage over the whole build: a per-part stage runs over every ingest part (a list of per-part results)."""
    if stage.per_part:
        return [stage.run(run, part) for part in ingest_parts(run.results)]
    return stage.run(run)
