"""Manifest stage: manifest.json (schema: manifests/schema.py) summarising one finished build, and its verification.

Counts are re-read from the build's files (the source of truth), cross-checked against what the stages reported,
and the build's invariants are enforced: a manifest is only written when every count adds up. `verify_manifest`
re-hashes every shard and file and re-counts tar members (`cc4m verify MANIFEST`).
"""
from __future__ import annotations

import argparse
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.history import changes_since_previous
from curation.invariants import INGEST_DONE, check_invariants, shard_members
from curation.io import read_json, read_parquet, sha256_file, write_json_atomic
from curation.reshard import SHARD_META_KEY
from curation.select import selected_counts
from curation.staging import STATUSES
from manifests.layout import BuildLayout, shard_name
from manifests.schema import SCHEMA_VERSION, BuildManifest, count_problems, validate_manifest
from manifests.version import code_version
from manifests.vocabulary import load_vocabulary

if TYPE_CHECKING:
    from curation.config import BuildConfig

MAX_ERROR_KINDS = 50


class ManifestCountError(ValueError):
    """The build's counts do not add up (or disagree with what a stage reported): no manifest is written."""


def _rows(path: Path) -> int:
    return pq.read_metadata(path).num_rows


def _parts_rows(layout: BuildLayout, directory: Path) -> int:
    return sum(_rows(p) for p in layout.parts(directory))


def _kv(path: Path) -> dict[str, str]:
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in meta.items()}


def _versions(layout: BuildLayout, parse_results: Any) -> tuple[str, dict[str, str]]:
    """Vocabulary version and spaCy model (name, version) as recorded by the parse stage in the captions parts'
    metadata (falling back to what parse_part returned)."""
    found: dict[str, Any] = {}
    parts = layout.parts(layout.captions_dir)
    if parts:
        for key, value in _kv(parts[0]).items():
            try:
                value = json.loads(value)
            except ValueError:
                pass
            found[key.lower()] = value
    for result in parse_results or []:
        if isinstance(result, dict):
            for key, value in result.items():
                found.setdefault(key.lower(), value)
    exact = (found.get("cc4m.vocabulary_version"), found.get("cc4m.spacy_model"), found.get("cc4m.spacy_model_version"))
    if all(isinstance(v, str) for v in exact):  # the keys curation.parse writes
        return exact[0], {"name": exact[1], "version": exact[2]}
    vocab = next((v for k, v in found.items() if "vocab" in k and isinstance(v, str)), None)
    name = next((v for k, v in found.items() if "spacy" in k and "name" in k and isinstance(v, str)), None)
    version = next((v for k, v in found.items() if "spacy" in k and "version" in k and isinstance(v, str)), None)
    for k, v in found.items():  # a single "spacy_model" entry: {"name","version"} or "name version"
        if "spacy" in k and isinstance(v, dict):
            name, version = name or v.get("name"), version or v.get("version")
        elif "spacy" in k and isinstance(v, str) and name is None and "version" not in k:
            name, _, rest = v.partition(" ")
            version = version or rest or None
    return vocab or load_vocabulary().version, {"name": str(name or "unknown"), "version": str(version or "unknown")}


def _sum(results: Any, key: str) -> int | None:
    if isinstance(results, dict):
        return results.get(key)
    if isinstance(results, list) and results and all(isinstance(r, dict) and key in r for r in results):
        return sum(r[key] for r in results)
    return None


def collect_counts(layout: BuildLayout, stage_results: dict[str, Any], samples_per_shard: int) -> dict[str, Any]:
    """Per-stage counts, from the build's files."""
    rejected_by_reason: Counter[str] = Counter()
    for part in layout.parts(layout.rejects_dir):
        rejected_by_reason.update(read_parquet(part, columns=["reason"])["reason"].to_pylist())
    ingested = _parts_rows(layout, layout.ingest_dir)
    rejected = sum(rejected_by_reason.values())
    done = layout.root / INGEST_DONE
    # The source's rows as ingest counted them while reading it; never derived from the parts it wrote.
    read = int(read_json(done)["result"]["source_rows"]) if done.exists() else None

    parsed = _parts_rows(layout, layout.captions_dir)
    # Parse keeps every row; captions parts missing rows show up as ingested != parsed, never as "failed".
    parse_failed = 0

    dropped_by_reason = selected_counts(layout.root)["dropped_by_reason"]  # why: select's own record
    selected = _parts_rows(layout, layout.selected_dir)  # how many: the parts themselves
    sel = {"parsed": parsed, "selected": selected, "dropped": parsed - selected,
           "dropped_by_reason": dropped_by_reason}

    downloads = read_parquet(layout.downloads)
    statuses = Counter(downloads["status"].to_pylist())
    errors = Counter(e for e in downloads["error_message"].to_pylist() if e)
    success = statuses.pop("success", 0)
    # Only rows with a known status count, as failures by status and by class (curation.fetch: blocked_address,
    # http_404, too_large, ...; a row without a class, from an older build, under its status). An unknown status
    # is then in neither success nor failed, and breaks selected = success + failed.
    failed_by_status = {s: statuses.get(s, 0) for s in STATUSES if s != "success"}
    status_list = downloads["status"].to_pylist()
    reasons = downloads["reason"].to_pylist() if "reason" in downloads.column_names else [None] * len(status_list)
    transient = downloads["transient"].to_pylist() if "transient" in downloads.column_names else [None] * len(reasons)
    failed_by_reason = Counter(reason or status for reason, status in zip(reasons, status_list)
                               if status != "success" and status in STATUSES)

    kept = _rows(layout.kept)
    removed_by_kind: dict[str, int] = {"exact": 0, "near": 0}
    if layout.duplicates.exists():
        removed_by_kind.update(Counter(read_parquet(layout.duplicates, columns=["kind"])["kind"].to_pylist()))
    dedup_input = kept + sum(removed_by_kind.values())  # what dedup decided on, from its own two files

    partners = read_parquet(layout.partners, columns=["sample_id"])
    with_partners = len(pc.unique(partners["sample_id"])) if partners.num_rows else 0
    per_sample = pc.value_counts(partners["sample_id"]).field("counts").to_pylist() if partners.num_rows else []
    classes = _rows(layout.entity_index) if layout.entity_index.exists() else 0

    meta_rows = _parts_rows(layout, layout.meta_dir)
    return {
        "ingest": {"read": ingested + rejected if read is None else read, "ingested": ingested, "rejected": rejected,
                   "rejected_by_reason": dict(sorted(rejected_by_reason.items()))},
        "parse": {"ingested": ingested, "parsed": parsed, "failed": parse_failed},
        "select": sel,
        "download": {"selected": downloads.num_rows, "success": success, "failed": sum(failed_by_reason.values()),
                     "failed_by_reason": dict(sorted(failed_by_reason.items())), "failed_by_status": failed_by_status,
                     "failed_transient": sum(1 for t in transient if t),
                     "errors": dict(errors.most_common(MAX_ERROR_KINDS))},
        "dedup": {"success": dedup_input, "removed_duplicate": sum(removed_by_kind.values()),
                  "removed_by_kind": removed_by_kind, "kept": kept},
        "index": {"kept": kept, "partner_rows": partners.num_rows, "samples_with_partners": with_partners,
                  "samples_without_partners": kept - with_partners, "classes": classes,
                  "max_partners": max(per_sample, default=0),
                  "mean_partners": round(partners.num_rows / kept, 4) if kept else 0.0},
        "reshard": {"written": meta_rows, "shards": len(layout.parts(layout.meta_dir)),
                    "samples_per_shard": samples_per_shard},
    }


# What a stage reported vs. what the files say: (stage, key in its result, path into the counts).
_CROSS_CHECKS = (
    ("ingest", "read", ("ingest", "read")), ("ingest", "ingested", ("ingest", "ingested")),
    ("ingest", "rejected", ("ingest", "rejected")),
    ("select", "selected", ("select", "selected")), ("select", "parsed", ("select", "parsed")),
    ("download", "selected", ("download", "selected")), ("download", "success", ("download", "success")),
    ("verify", "success", ("download", "success")),
    ("dedup", "kept", ("dedup", "kept")),
    ("reshard", "written", ("reshard", "written")), ("reshard", "shards", ("reshard", "shards")),
)


def _cross_check(counts: dict[str, Any], stage_results: dict[str, Any]) -> list[str]:
    problems = []
    for stage, key, (c_stage, c_key) in _CROSS_CHECKS:
        reported = _sum(stage_results.get(stage), key)
        if reported is not None and reported != counts[c_stage][c_key]:
            problems.append(f"{stage} reported {key}={reported}, but the build's files give {counts[c_stage][c_key]}")
    return problems


def _shard_entries(layout: BuildLayout, n_shards: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Shard list from reshard's done records (so a manifest rewrite needs no re-hash of the tars)."""
    shards, problems = [], []
    for i in range(n_shards):
        meta = layout.meta_dir / f"part-{i:05d}.parquet"
        record = json.loads((pq.read_schema(meta).metadata or {}).get(SHARD_META_KEY, b"{}"))
        path = layout.shards_dir / shard_name(i)
        if not path.exists() or record.get("shard") != path.name:
            problems.append(f"shard {path.name} is missing or has no done record")
            continue
        if path.stat().st_size != record.get("bytes"):
            problems.append(f"shard {path.name} has {path.stat().st_size} bytes, its record says {record.get('bytes')}")
        shards.append({"name": path.name, "bytes": record["bytes"], "samples": record["samples"],
                       "sha256": record["sha256"]})
    extra = {p.name for p in layout.shards()} - {s["name"] for s in shards}
    problems += [f"unexpected shard {name} not produced by reshard" for name in sorted(extra)]
    return shards, problems


def manifest_files(layout: BuildLayout) -> list[Path]:
    """The non-shard files a manifest checksums: the stage inputs and decisions (ingest, rejects, captions, selected
    parts, kept, duplicates), the index and the meta parts, so an edited caption or decision fails verification.

    downloads.parquet is not among them: it records how the web answered this run (wall times, attempt times), which
    differs between two builds of the same inputs. Its content is still checked, by the recounts and invariants
    (one row per selected sample, known statuses, kept + duplicates = successes)."""
    files: list[Path] = []
    for folder in (layout.ingest_dir, layout.rejects_dir, layout.captions_dir, layout.selected_dir):
        files += layout.parts(folder)
    files += [p for p in (layout.kept, layout.duplicates) if p.exists()]
    files += [p for p in (layout.entity_index, layout.partners, layout.cooccurrence, layout.locator) if p.exists()]
    return files + layout.parts(layout.meta_dir)


def _file_entry(layout: BuildLayout, path: Path) -> dict[str, Any]:
    return {"path": path.relative_to(layout.root).as_posix(), "bytes": path.stat().st_size,
            "sha256": sha256_file(path), "rows": _rows(path) if path.suffix == ".parquet" else None}


def write_manifest(build_dir: str | Path, cfg: BuildConfig, stage_results: dict[str, Any]) -> Path:
    """Write manifest.json for a finished build; raise ManifestCountError if the counts do not add up. A rerun on an
    unchanged build leaves the existing manifest untouched (same content apart from created_at)."""
    layout = BuildLayout(Path(build_dir))
    stage_results = stage_results or {}
    counts = collect_counts(layout, stage_results, cfg.shard.samples_per_shard)
    shards, problems = _shard_entries(layout, counts["reshard"]["shards"])
    problems += _cross_check(counts, stage_results) + count_problems(counts, shards)
    problems += check_invariants(layout.root)
    if problems:
        raise ManifestCountError(f"build {layout.root}: counts do not add up:\n  " + "\n  ".join(problems))

    ingest_result = stage_results.get("ingest") or {}
    source_sha = ingest_result.get("source_sha256") or sha256_file(cfg.source)
    vocab, spacy_model = _versions(layout, stage_results.get("parse"))
    manifest = BuildManifest.from_dict({
        "schema_version": SCHEMA_VERSION,
        "code_version": code_version(),
        "inputs": {"source": source_name(cfg.source), "sha256": source_sha,
                   "rows": int(ingest_result.get("source_rows", counts["ingest"]["read"]))},
        "vocabulary_version": vocab,
        "spacy_model": spacy_model,
        "config": content_config(cfg),
        "counts": counts,
        "shards": shards,
        "files": [_file_entry(layout, p) for p in manifest_files(layout)],
    }).to_dict()

    # The same build again (a rerun, a copy): keep the manifest as it is, with the changes it recorded.
    existing = _read_or_none(layout.manifest) if layout.manifest.exists() else None
    unchanged = isinstance(existing, dict) and {**existing, "changes": {}} == manifest
    if not unchanged:
        manifest["changes"] = changes_since_previous(layout)
        write_json_atomic(layout.manifest, manifest)
    if not unchanged or not layout.run_record.exists():
        write_json_atomic(layout.run_record, {
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "build_dir": str(layout.root.resolve()),
            "source": str(cfg.source), "config": cfg.to_dict(), "code_version": code_version(),
            "manifest_sha256": sha256_file(layout.manifest),
            # Who downloaded each part when the parts ran on Dask workers (curation.download_parts): run-time facts,
            # kept out of the manifest, whose bytes do not depend on where the download ran.
            "download_workers": list((stage_results.get("download") or {}).get("download_workers") or []),
        })
    return layout.manifest


def _read_or_none(path: Path) -> Any:
    try:
        return read_json(path)
    except ValueError:
        return None


def source_name(source: str) -> str:
    """The source's file name (a URL's last path segment): its folder is a run-time detail, its sha256 the identity."""
    return PurePosixPath(urlsplit(str(source)).path).name or str(source)


def content_config(cfg: BuildConfig) -> dict[str, Any]:
    """The settings that decide what a build holds: BuildConfig.identity() without the source path (identified by
    its sha256) and without the run-time settings (ports, process counts, paths)."""
    identity = cfg.identity()
    identity.pop("source", None)
    return identity


# ------------------------------------------------------------------------------------------------------ verification
def _diff_counts(where: str, recorded: Any, recounted: Any, out: list[str]) -> None:
    if isinstance(recorded, dict) and isinstance(recounted, dict):
        for key in sorted(set(recorded) | set(recounted), key=str):
            _diff_counts(f"{where}.{key}", recorded.get(key), recounted.get(key), out)
    elif recorded != recounted:
        out.append(f"count {where}: the manifest says {recorded!r}, the build's files give {recounted!r}")


def recount_problems(layout: BuildLayout, recorded: dict[str, Any]) -> list[str]:
    """Every count of the manifest, recounted from the build's files now; one problem per count that differs."""
    try:
        recounted = collect_counts(layout, {}, recorded["reshard"]["samples_per_shard"])
    except (OSError, KeyError, ValueError, TypeError) as err:
        return [f"count: the build's files cannot be recounted ({type(err).__name__}: {err})"]
    problems: list[str] = []
    _diff_counts("counts", recorded, recounted, problems)
    return problems


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    shards_checked: int = 0
    files_checked: int = 0
    samples_checked: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "shards_checked": self.shards_checked,
                "files_checked": self.files_checked, "samples_checked": self.samples_checked}


def _count_samples(path: Path) -> tuple[int, list[str]]:
    """Samples in a shard (distinct keys), and problems: members not in jpg/txt/json triples."""
    keys = shard_members(path)
    bad = [k for k, exts in keys.items() if sorted(exts) != ["jpg", "json", "txt"]]
    return len(keys), [f"shard {path.name}: sample {k} has members {sorted(keys[k])}" for k in bad[:5]]


def verify_manifest(manifest_path: str | Path) -> VerifyReport:
    """Re-check a build against its manifest: schema, count invariants, every shard's bytes/sha256/sample count,
    every listed file's bytes/sha256/rows, and no unlisted shards."""
    path = Path(manifest_path)
    report = VerifyReport(ok=False)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        report.problems.append(f"cannot read manifest {path}: {err}")
        return report
    report.problems += validate_manifest(manifest)
    if report.problems:
        return report
    report.problems += count_problems(manifest["counts"], manifest["shards"])
    layout = BuildLayout(path.parent)
    report.problems += recount_problems(layout, manifest["counts"])
    report.problems += check_invariants(layout.root)

    for entry in manifest["shards"]:
        shard = layout.shards_dir / entry["name"]
        if not shard.exists():
            report.problems.append(f"shard {entry['name']} is missing")
            continue
        report.shards_checked += 1
        if shard.stat().st_size != entry["bytes"]:
            report.problems.append(f"shard {entry['name']}: {shard.stat().st_size} bytes, manifest {entry['bytes']}")
        if sha256_file(shard) != entry["sha256"]:
            report.problems.append(f"shard {entry['name']}: sha256 differs from the manifest")
        try:
            samples, member_problems = _count_samples(shard)
        except (tarfile.TarError, ValueError) as err:  # ValueError: a header field that is not a number
            report.problems.append(f"shard {entry['name']}: unreadable tar ({err})")
            continue
        report.samples_checked += samples
        report.problems += member_problems
        if samples != entry["samples"]:
            report.problems.append(f"shard {entry['name']}: {samples} samples, manifest {entry['samples']}")
    unlisted = {p.name for p in layout.shards()} - {e["name"] for e in manifest["shards"]}
    report.problems += [f"shard {name} is not in the manifest" for name in sorted(unlisted)]

    for entry in manifest["files"]:
        file = layout.root / entry["path"]
        if not file.exists():
            report.problems.append(f"file {entry['path']} is missing")
            continue
        report.files_checked += 1
        if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            report.problems.append(f"file {entry['path']}: size or sha256 differs from the manifest")
        elif entry["rows"] is not None and _rows(file) != entry["rows"]:
            report.problems.append(f"file {entry['path']}: {_rows(file)} rows, manifest {entry['rows']}")
    report.ok = not report.problems
    return report


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    """`cc4m verify MANIFEST`: re-hash a build's shards and files against its manifest."""
    p.add_argument("manifest", help="path to a build's manifest.json (or the build folder)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cli_verify)


def cli_verify(args: argparse.Namespace) -> int:
    path = Path(args.manifest)
    if path.is_dir():
        path = BuildLayout(path).manifest
    report = verify_manifest(path)
    if getattr(args, "json", False):
        print(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        print(f"OK {path}: {report.shards_checked} shards, {report.samples_checked} samples, "
              f"{report.files_checked} files match the manifest")
    else:
        print(f"MISMATCH {path}: {len(report.problems)} problem(s)")
        for problem in report.problems:
            print(f"  - {problem}")
    return 0 if report.ok else 1
