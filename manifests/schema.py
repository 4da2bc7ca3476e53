"""The build manifest: what one CC4M build holds and how it was made. Written by `curation.manifest`, read by training
(`ovseg_core` records the manifest's checksum in its checkpoints) and by `cc4m verify`.

The JSON Schema lives in manifests/schemas/build-manifest.v2.json; `validate_manifest` checks a manifest dict against
it with a small built-in interpreter of the keywords that file uses, so no jsonschema package is needed at run time.
The frozen dataclasses below give typed access (`BuildManifest.from_dict(json.load(f))`).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from manifests.stages import COUNTED_STAGES, STAGE_NAMES

SCHEMA_VERSION = "cc4m-build-manifest/2"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "build-manifest.v2.json"
STAGES = STAGE_NAMES  # every stage of a build, in order (manifests.stages); COUNTED_STAGES have counts


@dataclass(frozen=True)
class InputInfo:
    source: str
    sha256: str
    rows: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str


@dataclass(frozen=True)
class ShardEntry:
    name: str
    bytes: int
    samples: int
    sha256: str


@dataclass(frozen=True)
class FileEntry:
    """A checksummed file of the build, `path` relative to the build folder; `rows` for parquet files."""

    path: str
    bytes: int
    sha256: str
    rows: int | None = None


@dataclass(frozen=True)
class BuildManifest:
    schema_version: str
    code_version: str
    inputs: InputInfo
    vocabulary_version: str
    spacy_model: ModelInfo
    config: dict[str, Any]
    counts: dict[str, dict[str, Any]]
    shards: tuple[ShardEntry, ...] = ()
    files: tuple[FileEntry, ...] = ()
    # What changed since the build this folder held before (curation.history): the source's rows and parts, and
    # samples added and removed. Not part of what makes two builds the same build (see curation.manifest).
    changes: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form (e.g. stage timings); not validated

    def __post_init__(self) -> None:
        problems = validate_manifest(self.to_dict())
        if problems:
            raise ValueError("invalid build manifest:\n  " + "\n  ".join(problems))

    @property
    def written(self) -> int:
        return int(self.counts["reshard"]["written"])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shards"] = [dict(s) for s in d["shards"]]
        d["files"] = [dict(f) for f in d["files"]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildManifest:
        problems = validate_manifest(d)
        if problems:
            raise ValueError("invalid build manifest:\n  " + "\n  ".join(problems))
        return cls(
            schema_version=d["schema_version"], code_version=d["code_version"],
            inputs=InputInfo(**d["inputs"]), vocabulary_version=d["vocabulary_version"],
            spacy_model=ModelInfo(**d["spacy_model"]), config=d["config"], counts=d["counts"],
            shards=tuple(ShardEntry(**s) for s in d["shards"]), files=tuple(FileEntry(**f) for f in d["files"]),
            changes=d.get("changes", {}), extra=d.get("extra", {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> BuildManifest:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


_TYPES: dict[str, Any] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}


def _is_type(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):  # bool is an int in Python, not in JSON
        return False
    return isinstance(value, _TYPES[name])


def _check(value: Any, schema: dict[str, Any], where: str, problems: list[str]) -> None:
    if "const" in schema and value != schema["const"]:
        problems.append(f"{where}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not one of {schema['enum']}")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, n) for n in names):
            problems.append(f"{where}: expected {' or '.join(names)}, got {type(value).__name__}")
            return
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < schema.get("minimum", value):
        problems.append(f"{where}: {value} < minimum {schema['minimum']}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        problems.append(f"{where}: {value!r} does not match {schema['pattern']!r}")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                problems.append(f"{where}: missing required field {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, sub in value.items():
            if key in props:
                _check(sub, props[key], f"{where}.{key}", problems)
            elif extra is False:
                problems.append(f"{where}: unexpected field {key!r}")
            elif isinstance(extra, dict):
                _check(sub, extra, f"{where}.{key}", problems)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{where}[{i}]", problems)


def validate_manifest(manifest: dict[str, Any]) -> list[str]:
    """Problems of a manifest dict against the JSON schema (required fields, types, patterns); [] when valid."""
    problems: list[str] = []
    _check(manifest, load_schema(), "manifest", problems)
    return problems


def count_problems(counts: dict[str, dict[str, Any]], shards: list[dict[str, Any]] | None = None) -> list[str]:
    """The build's count invariants; [] when every count adds up.

    read = ingested + rejected; parsed = selected + dropped; selected = success + failed (by reason);
    success = kept + removed_duplicate; written = kept; hence selected = written + failed + removed_duplicate;
    and the shards' samples sum to written.
    """
    p: list[str] = []

    def eq(label: str, left: int, right: int) -> None:
        if left != right:
            p.append(f"{label}: {left} != {right}")

    try:
        ing, par, sel, dl, ded, idx, rs = (counts[s] for s in COUNTED_STAGES)
        eq("ingest: read = ingested + rejected", ing["read"], ing["ingested"] + ing["rejected"])
        eq("ingest: rejected = sum(rejected_by_reason)", ing["rejected"], sum(ing["rejected_by_reason"].values()))
        eq("parse: ingested = ingest.ingested", par["ingested"], ing["ingested"])
        eq("parse: parsed = ingested - failed", par["parsed"], par["ingested"] - par.get("failed", 0))
        eq("select: parsed = parse.parsed", sel["parsed"], par["parsed"])
        eq("select: parsed = selected + dropped", sel["parsed"], sel["selected"] + sel["dropped"])
        eq("select: dropped = sum(dropped_by_reason)", sel["dropped"], sum(sel["dropped_by_reason"].values()))
        eq("download: selected = select.selected", dl["selected"], sel["selected"])
        eq("download: failed = sum(failed_by_reason)", dl["failed"], sum(dl["failed_by_reason"].values()))
        eq("download: selected = success + failed", dl["selected"], dl["success"] + dl["failed"])
        eq("dedup: success = download.success", ded["success"], dl["success"])
        eq("dedup: success = kept + removed_duplicate", ded["success"], ded["kept"] + ded["removed_duplicate"])
        eq("dedup: removed_duplicate = sum(removed_by_kind)", ded["removed_duplicate"],
           sum(ded["removed_by_kind"].values()))
        eq("index: kept = dedup.kept", idx["kept"], ded["kept"])
        eq("index: kept = with + without partners", idx["kept"],
           idx["samples_with_partners"] + idx["samples_without_partners"])
        eq("reshard: written = dedup.kept", rs["written"], ded["kept"])
        eq("selected = written + failed_download + removed_duplicate", sel["selected"],
           rs["written"] + dl["failed"] + ded["removed_duplicate"])
        if shards is not None:
            eq("reshard: shards = len(shard list)", rs["shards"], len(shards))
            eq("sum(shard samples) = written", sum(s["samples"] for s in shards), rs["written"])
    except (KeyError, TypeError, AttributeError) as err:
        p.append(f"counts are incomplete: missing {err}")
    return p
