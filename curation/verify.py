"""Verify stage: a quality gate on the download. img2dataset never fails loudly (it returns None and only prints
failed shards), so the build checks its numbers here and stops under a minimum success rate."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from curation.download import STATUSES, staging_shards
from curation.layout import BuildLayout


class BuildQualityError(RuntimeError):
    """The build's data is too poor to continue (e.g. too few images could be downloaded)."""


@dataclass(frozen=True)
class VerifyConfig:
    min_success_rate: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_success_rate <= 1.0:
            raise ValueError(f"VerifyConfig.min_success_rate must be in [0, 1], got {self.min_success_rate!r}")


def verify_downloads(build_dir: str | Path, cfg: VerifyConfig) -> dict[str, Any]:
    """Check downloads.parquet against staging's own `*_stats.json`; raise BuildQualityError under the success rate.
    Returns {"selected", "success", "failed_by_reason", "success_rate", "per_shard": [...], "problems": []}."""
    layout = BuildLayout(Path(build_dir))
    if not layout.downloads.exists():
        raise FileNotFoundError(f"verify: {layout.downloads} does not exist (run download first)")
    table = pq.read_table(layout.downloads, columns=["sample_id", "status", "staging_shard"])
    statuses = Counter(table["status"].to_pylist())
    unknown = sorted(set(statuses) - set(STATUSES))
    if unknown:
        raise BuildQualityError(f"verify: unknown download statuses {unknown} in {layout.downloads}")
    selected = table.num_rows
    counts = {s: statuses.get(s, 0) for s in STATUSES}
    problems: list[str] = []

    # Per staging shard: img2dataset's stats file vs the rows we collected from its parquet.
    by_shard: dict[str, Counter] = {}
    for shard, status in zip(table["staging_shard"].to_pylist(), table["status"].to_pylist()):
        if shard is not None:
            by_shard.setdefault(shard, Counter())[status] += 1
    per_shard = []
    for shard in staging_shards(layout.staging_dir):
        stats = json.loads((layout.staging_dir / f"{shard}_stats.json").read_text())
        ours = by_shard.pop(shard, Counter())
        entry = {"shard": shard, "count": stats.get("count"), "successes": stats.get("successes"),
                 "failed_to_download": stats.get("failed_to_download"),
                 "failed_to_resize": stats.get("failed_to_resize"), "duration_s": stats.get("duration")}
        per_shard.append(entry)
        for theirs, mine in (("count", sum(ours.values())), ("successes", ours["success"]),
                             ("failed_to_download", ours["failed_to_download"]),
                             ("failed_to_resize", ours["failed_to_resize"])):
            if stats.get(theirs) is not None and stats[theirs] != mine:
                problems.append(f"staging shard {shard}: stats say {theirs}={stats[theirs]}, downloads.parquet {mine}")
    for shard in sorted(by_shard):
        problems.append(f"downloads.parquet refers to staging shard {shard} which has no _stats.json")

    if selected != sum(counts.values()):
        problems.append(f"selected={selected} != sum of statuses {counts}")
    rate = counts["success"] / selected if selected else 0.0
    result = {
        "selected": selected, "success": counts["success"],
        "failed_by_reason": {s: counts[s] for s in STATUSES[1:]},
        "success_rate": round(rate, 6), "min_success_rate": cfg.min_success_rate,
        "per_shard": per_shard, "problems": problems,
    }
    if problems:
        raise BuildQualityError("verify: download records are inconsistent:\n  " + "\n  ".join(problems))
    if rate < cfg.min_success_rate:
        raise BuildQualityError(
            f"verify: download success rate {rate:.1%} ({counts['success']}/{selected} selected samples) is below the "
            f"minimum {cfg.min_success_rate:.1%}; failures: {result['failed_by_reason']}. Check the network/proxy, or "
            f"lower VerifyConfig.min_success_rate."
        )
    return result
