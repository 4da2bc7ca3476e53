"""Model registry as plain files: which checkpoints exist, what they were trained on, and which one is champion.

    <registry>/
      registry.jsonl    one JSON object per checkpoint (RegistryEntry fields), rewritten atomically on every change
      decisions.jsonl   every promotion decision (promoted or refused, with the reason), rewritten atomically

Checkpoints are referenced by path (and sha256), not copied: the registry is a ledger, not a store. Both files are
DuckDB-queryable, e.g.
    SELECT entry_id, preset, steps, metrics.val_mIoU, is_champion FROM read_json_auto('<registry>/registry.jsonl')

The promotion rule is the plain function `decide_promotion`, so it can be tested without any files or Prefect.
This module imports neither curation, ovseg_core nor Prefect (manifests is the shared contract).
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from manifests.fileio import sha256_file, write_text_atomic
from manifests.version import REPO_ROOT
from manifests.version import code_version as current_code_version

REGISTRY_FILE = "registry.jsonl"
DECISIONS_FILE = "decisions.jsonl"
DEFAULT_REGISTRY = REPO_ROOT / ".cc4m-runs" / "registry"


def default_registry_dir() -> Path:
    return Path(os.environ.get("CC4M_REGISTRY", DEFAULT_REGISTRY))


@dataclass(frozen=True)
class RegistryEntry:
    """One registered checkpoint and its lineage."""

    entry_id: str
    checkpoint: str                      # absolute path of the checkpoint file
    checkpoint_sha256: str
    build_manifest_sha256: str | None    # sha256 of the build's manifest.json it was trained on
    code_version: str
    preset: str
    stage: int
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)   # e.g. {"val_mIoU": ..., "eval_mIoU": ...}
    parent_id: str | None = None         # registry entry it was fine-tuned/resumed from
    parent_checkpoint: str | None = None
    created_at: str = ""
    is_champion: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.entry_id:
            raise ValueError("entry_id must not be empty")
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegistryEntry:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str
    candidate_score: float | None
    champion_score: float | None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def decide_promotion(candidate_score: float | None, champion_score: float | None, *, higher_is_better: bool = True,
                     min_improvement: float = 0.0, has_champion: bool | None = None) -> PromotionDecision:
    """Promote only a strictly better candidate: worse, equal or unmeasured candidates are refused.

    `has_champion` defaults to "champion_score is not None"; pass True when a champion exists but lacks the metric,
    which refuses (a metric we cannot compare must not silently replace a model that is serving).
    """
    if has_champion is None:
        has_champion = champion_score is not None
    if not _is_number(candidate_score):
        return PromotionDecision(False, f"candidate has no finite score ({candidate_score!r})", None, champion_score)
    if not has_champion:
        return PromotionDecision(True, "no champion yet", candidate_score, None)
    if not _is_number(champion_score):
        return PromotionDecision(False, "champion has no comparable score for this metric", candidate_score, None)
    gain = candidate_score - champion_score if higher_is_better else champion_score - candidate_score
    if gain > min_improvement:
        return PromotionDecision(True, f"better by {gain:.6g} (> {min_improvement:g})", candidate_score,
                                 champion_score)
    word = "equal" if gain == 0 else ("not better enough" if gain > 0 else "worse")
    return PromotionDecision(False, f"{word}: gain {gain:.6g} <= {min_improvement:g}", candidate_score, champion_score)


def decide_with_evidence(evidence: dict[str, Any], has_champion: bool) -> PromotionDecision:
    """The retrain's gate: promote only when the candidate beats every comparator in `evidence["comparisons"]`
    ({name: {"low", "high", "delta", "mIoU", ...}}, paired bootstrap intervals of candidate - other) with a lower
    bound above 0. The untrained baseline must be there, and the champion too when one exists; the all-background
    baseline whenever the validation set has a background class."""
    comparisons = evidence.get("comparisons") or {}
    required = ["untrained"] + (["champion"] if has_champion else [])
    missing = [name for name in required if name not in comparisons]
    candidate, champion = evidence.get("candidate_mIoU"), (comparisons.get("champion") or {}).get("mIoU")
    if missing:
        return PromotionDecision(False, f"no evidence against {', '.join(missing)}", candidate, champion)
    failed = [f"{name} (delta {c['delta']:+.4f}, interval [{c['low']:+.4f}, {c['high']:+.4f}])"
              for name, c in comparisons.items() if not (_is_number(c.get("low")) and c["low"] > 0)]
    if failed:
        return PromotionDecision(False, "not shown better than " + "; ".join(failed), candidate, champion)
    lows = ", ".join(f"{name} > {c['low']:+.4f}" for name, c in comparisons.items())
    return PromotionDecision(True, f"better than every comparator, lower bounds: {lows}", candidate, champion)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ModelRegistry:
    """File-backed registry; every read-modify-write holds an exclusive lock on <root>/.lock."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def registry_path(self) -> Path:
        return self.root / REGISTRY_FILE

    @property
    def decisions_path(self) -> Path:
        return self.root / DECISIONS_FILE

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _read_jsonl(path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    @staticmethod
    def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
        write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def list(self) -> list[RegistryEntry]:
        return [RegistryEntry.from_dict(r) for r in self._read_jsonl(self.registry_path)]

    def get(self, entry_id: str) -> RegistryEntry:
        for entry in self.list():
            if entry.entry_id == entry_id:
                return entry
        raise KeyError(f"no registry entry {entry_id!r} in {self.registry_path}")

    def champion(self) -> RegistryEntry | None:
        return next((e for e in self.list() if e.is_champion), None)

    def decisions(self) -> list[dict[str, Any]]:
        return self._read_jsonl(self.decisions_path)

    def register(self, checkpoint: str | os.PathLike, *, preset: str, stage: int, steps: int,
                 build_manifest_sha256: str | None = None, metrics: dict[str, float] | None = None,
                 parent_id: str | None = None, parent_checkpoint: str | None = None,
                 code_version: str | None = None, notes: str = "") -> RegistryEntry:
        checkpoint = Path(checkpoint).resolve()
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        sha = sha256_file(checkpoint)
        with self._locked():
            rows = self._read_jsonl(self.registry_path)
            if parent_id is not None and not any(r["entry_id"] == parent_id for r in rows):
                raise KeyError(f"parent {parent_id!r} is not in the registry")
            # Ids are sequential (readable) plus a short checkpoint hash (unique across registries merged by hand).
            entry = RegistryEntry(
                entry_id=f"m{len(rows) + 1:04d}-{sha[:8]}", checkpoint=str(checkpoint), checkpoint_sha256=sha,
                build_manifest_sha256=build_manifest_sha256, code_version=code_version or current_code_version(),
                preset=preset, stage=int(stage), steps=int(steps), metrics=dict(metrics or {}),
                parent_id=parent_id, parent_checkpoint=parent_checkpoint, created_at=_now(), notes=notes,
            )
            rows.append(entry.to_dict())
            self._write_jsonl(self.registry_path, rows)
        return entry

    def update_metrics(self, entry_id: str, metrics: dict[str, float]) -> RegistryEntry:
        """Merge metrics into an entry (e.g. the evaluation mIoU measured after registration)."""
        with self._locked():
            rows = self._read_jsonl(self.registry_path)
            for row in rows:
                if row["entry_id"] == entry_id:
                    row["metrics"] = {**row.get("metrics", {}), **metrics}
                    self._write_jsonl(self.registry_path, rows)
                    return RegistryEntry.from_dict(row)
        raise KeyError(f"no registry entry {entry_id!r}")

    def promote_with_evidence(self, entry_id: str, evidence: dict[str, Any], metric: str = "val_mIoU") -> bool:
        """Make `entry_id` champion iff `decide_with_evidence` says so; the decision, the numbers and the intervals
        are recorded in the decision log, and the candidate's `metric` (evidence["candidate_mIoU"]) on its entry."""
        with self._locked():
            rows = self._read_jsonl(self.registry_path)
            candidate, champion = _candidate_and_champion(rows, entry_id)
            if champion is not None and champion["entry_id"] == entry_id:
                raise ValueError(f"{entry_id} is already the champion: there is nothing to compare it with")
            decision = decide_with_evidence(evidence, has_champion=champion is not None)
            candidate["metrics"] = {**candidate.get("metrics", {}), metric: evidence.get("candidate_mIoU")}
            for row in rows:
                row["is_champion"] = row["entry_id"] == entry_id if decision.promote else row.get("is_champion", False)
            self._write_jsonl(self.registry_path, rows)
            _record_decision(self, entry_id, champion, metric, decision, rule="paired-bootstrap-lower-bound>0",
                             evidence=evidence)
        return decision.promote

    def promote_if_better(self, entry_id: str, metric: str, higher_is_better: bool = True,
                          min_improvement: float = 0.0) -> bool:
        """Make `entry_id` champion iff its `metric` strictly beats the champion's; the decision is recorded."""
        with self._locked():
            rows = self._read_jsonl(self.registry_path)
            candidate, champion = _candidate_and_champion(rows, entry_id)
            if champion is not None and champion["entry_id"] == entry_id:
                decision = PromotionDecision(False, "already champion", candidate["metrics"].get(metric),
                                             champion["metrics"].get(metric))
            else:
                decision = decide_promotion(
                    candidate["metrics"].get(metric), None if champion is None else champion["metrics"].get(metric),
                    higher_is_better=higher_is_better, min_improvement=min_improvement,
                    has_champion=champion is not None,
                )
            if decision.promote:
                for row in rows:
                    row["is_champion"] = row["entry_id"] == entry_id
                self._write_jsonl(self.registry_path, rows)
            _record_decision(self, entry_id, champion, metric, decision, higher_is_better=higher_is_better)
        return decision.promote


def _candidate_and_champion(rows: list[dict[str, Any]], entry_id: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The registry row of `entry_id` (KeyError when absent) and the current champion's row (None when none)."""
    candidate = next((r for r in rows if r["entry_id"] == entry_id), None)
    if candidate is None:
        raise KeyError(f"no registry entry {entry_id!r}")
    return candidate, next((r for r in rows if r.get("is_champion")), None)


def _record_decision(self: ModelRegistry, entry_id: str, champion: dict[str, Any] | None, metric: str,
                     decision: PromotionDecision, **extra: Any) -> None:
    log = self._read_jsonl(self.decisions_path)
    log.append({"decided_at": _now(), "candidate_id": entry_id,
                "champion_id": None if champion is None else champion["entry_id"], "metric": metric,
                **dataclasses.asdict(decision), **extra})
    self._write_jsonl(self.decisions_path, log)


def format_table(entries: list[RegistryEntry]) -> str:
    """Plain-text table, champion marked with '*'."""
    metric_names = sorted({k for e in entries for k in e.metrics})
    header = ["", "entry_id", "preset", "stage", "steps", *metric_names, "parent", "created_at", "checkpoint"]
    rows = [header]
    for e in entries:
        metric_cells = [f"{e.metrics[m]:.4f}" if _is_number(e.metrics.get(m)) else "-" for m in metric_names]
        rows.append(["*" if e.is_champion else "", e.entry_id, e.preset, str(e.stage), str(e.steps), *metric_cells,
                     e.parent_id or "-", e.created_at, e.checkpoint])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", type=Path, default=None,
                   help=f"registry folder (default: $CC4M_REGISTRY or {DEFAULT_REGISTRY})")
    p.add_argument("--json", action="store_true", help="print the entries as JSON lines instead of a table")


def cli_models(args: argparse.Namespace) -> int:
    registry = ModelRegistry(args.registry or default_registry_dir())
    entries = registry.list()
    if args.json:
        for entry in entries:
            print(json.dumps(entry.to_dict(), sort_keys=True))
        return 0
    if not entries:
        print(f"no models registered in {registry.root}")
        return 0
    print(format_table(entries))
    champion = registry.champion()
    print(f"\nchampion: {champion.entry_id if champion else 'none'}   (registry: {registry.root})")
    return 0
