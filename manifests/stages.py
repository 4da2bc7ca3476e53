"""The stages of a CC4M build, in order: the one declaration of their names, order and outputs.

The contract side of the stage plan: `curation.stages` binds each stage to the function that runs it, the in-process
build (`curation.build`) and the Prefect flow (`flows.build`) both loop over that plan, and the manifest's stage
names (`manifests.schema.STAGES`) come from here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    """One step of a build.

    Attributes:
        name: the stage's name (log lines, task names, results keys).
        config_field: the BuildConfig field holding its settings; None for a stage without settings.
        per_part: it runs once per ingest part (parse, select) rather than once per build.
        outputs: the BuildLayout attributes of what it owns: removed when its settings change and the caller allows
            it (staging/ is not listed: the download stage manages it itself).
        counted: it has a section in the manifest's counts.
    """

    name: str
    config_field: str | None
    per_part: bool
    outputs: tuple[str, ...]
    counted: bool


BUILD_STAGES: tuple[StageSpec, ...] = (
    StageSpec("ingest", "ingest", False, ("ingest_dir", "rejects_dir"), counted=True),
    StageSpec("parse", "parse", True, ("captions_dir",), counted=True),
    StageSpec("select", "select", True, ("selected_dir",), counted=True),
    StageSpec("download", "download", False, ("downloads",), counted=True),
    StageSpec("verify", "verify", False, (), counted=False),  # a gate: its figures are download's
    StageSpec("dedup", "dedup", False, ("duplicates", "kept"), counted=True),
    StageSpec("index", "index", False, ("entity_index", "partners", "cooccurrence"), counted=True),
    StageSpec("reshard", "shard", False, ("shards_dir", "meta_dir", "locator"), counted=True),
    StageSpec("manifest", None, False, ("manifest",), counted=False),
    StageSpec("report", None, False, ("report_dir",), counted=False),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in BUILD_STAGES)
COUNTED_STAGES: tuple[str, ...] = tuple(s.name for s in BUILD_STAGES if s.counted)


def stage_spec(name: str) -> StageSpec:
    for spec in BUILD_STAGES:
        if spec.name == name:
            return spec
    raise KeyError(f"no build stage {name!r}; the stages are {', '.join(STAGE_NAMES)}")
