"""Verify stage: a quality gate on the download. img2dataset never fails loudly (it returns None and only prints
failed shards), so the build checks its numbers here and stops under a minimum success rate: img2dataset's stats
against its own shard parquets (every round, retry rounds included), downloads.parquet against those, and every
failure's reason and transient flag."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curation.fetch import is_transient
from curation.io import read_parquet
from curation.staging import STATUSES, round_shards
from manifests.layout import BuildLayout


class BuildQualityError(RuntimeError):
    """The build's data is too poor to continue (e.g. too few images could be downloaded)."""


class EmptyBuild(BuildQualityError):
    """Not one selected sample was downloaded: an empty build is refused, whatever min_success_rate allows."""


@dataclass(frozen=True)
class VerifyConfig:
    min_success_rate: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_success_rate <= 1.0:
            raise ValueError(f"VerifyConfig.min_success_rate must be in [0, 1], got {self.min_success_rate!r}")


def _shard_problems(layout: BuildLayout, shard: str, stats: dict[str, Any], pointing: dict[str, str]) -> list[str]:
    """img2dataset's stats vs its own shard parquet, and the downloads rows that point at this shard vs that parquet."""
    staged = read_parquet(layout.staging_dir / f"{shard}.parquet", columns=["key", "status"])
    statuses = Counter(staged["status"].to_pylist())
    problems = []
    for theirs, mine in (("count", staged.num_rows), ("successes", statuses["success"]),
                         ("failed_to_download", statuses["failed_to_download"]),
                         ("failed_to_resize", statuses["failed_to_resize"])):
        if stats.get(theirs) is not None and stats[theirs] != mine:
            problems.append(f"staging shard {shard}: stats say {theirs}={stats[theirs]}, its parquet {mine}")
    by_key = dict(zip(staged["key"].to_pylist(), staged["status"].to_pylist()))
    wrong = [k for k, status in pointing.items() if by_key.get(k) != status]
    if wrong:
        problems.append(f"staging shard {shard}: {len(wrong)} downloads.parquet rows disagree with it (e.g. key "
                        f"{wrong[0]}: {pointing[wrong[0]]} vs {by_key.get(wrong[0])})")
    return problems


def verify_downloads(build_dir: str | Path, cfg: VerifyConfig) -> dict[str, Any]:
    """Check downloads.parquet against staging's own `*_stats.json` and parquets (every round); raise
    BuildQualityError under the success rate. Returns {"selected", "success", "failed_by_reason", "success_rate",
    "per_shard": [...], "problems": []}."""
    layout = BuildLayout(Path(build_dir))
    if not layout.downloads.exists():
        raise FileNotFoundError(f"verify: {layout.downloads} does not exist (run download first)")
    table = read_parquet(layout.downloads,
                         columns=["sample_id", "status", "reason", "transient", "staging_shard", "staging_key"])
    rows = {c: table[c].to_pylist() for c in table.column_names}
    statuses = Counter(rows["status"])
    unknown = sorted(set(statuses) - set(STATUSES))
    if unknown:
        raise BuildQualityError(f"verify: unknown download statuses {unknown} in {layout.downloads}")
    selected = table.num_rows
    counts = {s: statuses.get(s, 0) for s in STATUSES}
    problems: list[str] = []
    reasons: Counter[str] = Counter()
    for sid, status, reason, transient in zip(rows["sample_id"], rows["status"], rows["reason"], rows["transient"]):
        if status == "success":
            continue
        reasons[reason or status] += 1
        if reason is None or transient != is_transient(reason):
            problems.append(f"sample {sid}: failed without a consistent reason ({reason!r}, transient={transient})")
            break

    pointing: dict[str, dict[str, str]] = {}
    for shard, key, status in zip(rows["staging_shard"], rows["staging_key"], rows["status"]):
        if shard is not None:
            pointing.setdefault(shard, {})[key] = status
    per_shard = []
    for shard in round_shards(layout.staging_dir):
        stats = json.loads((layout.staging_dir / f"{shard}_stats.json").read_text())
        per_shard.append({"shard": shard, "count": stats.get("count"), "successes": stats.get("successes"),
                          "failed_to_download": stats.get("failed_to_download"),
                          "failed_to_resize": stats.get("failed_to_resize"), "duration_s": stats.get("duration")})
        problems += _shard_problems(layout, shard, stats, pointing.pop(shard, {}))
    for shard in sorted(pointing):
        problems.append(f"downloads.parquet refers to staging shard {shard} which has no _stats.json")

    if selected != sum(counts.values()):
        problems.append(f"selected={selected} != sum of statuses {counts}")
    rate = counts["success"] / selected if selected else 0.0
    result = {
        "selected": selected, "success": counts["success"],
        "failed_by_reason": dict(sorted(reasons.items())),
        "failed_by_status": {s: counts[s] for s in STATUSES[1:]},
        "success_rate": round(rate, 6), "min_success_rate": cfg.min_success_rate,
        "per_shard": per_shard, "problems": problems,
    }
    _gate(result, cfg)
    return result


def _gate(result: dict[str, Any], cfg: VerifyConfig) -> None:
    """Raise BuildQualityError for inconsistent records, EmptyBuild when nothing was downloaded, and
    BuildQualityError under the minimum success rate."""
    if result["problems"]:
        raise BuildQualityError("verify: download records are inconsistent:\n  " + "\n  ".join(result["problems"]))
    if result["success"] == 0:
        raise EmptyBuild(
            f"verify: no image was downloaded ({result['selected']} selected samples; failures: "
            f"{result['failed_by_reason']}), so there is nothing to build. Check the URL list and the network/proxy "
            f"(blocked_address: an internal mirror needs download.allowed_networks)")
    rate = result["success"] / result["selected"] if result["selected"] else 0.0
    if rate < cfg.min_success_rate:
        raise BuildQualityError(
            f"verify: download success rate {rate:.1%} ({result['success']}/{result['selected']} selected samples) is "
            f"below the minimum {cfg.min_success_rate:.1%}; failures: {result['failed_by_reason']}. Check the network/proxy "
            f"(blocked_address: an internal mirror needs download.allowed_networks), or lower "
            f"VerifyConfig.min_success_rate."
        )
