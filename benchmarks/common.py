"""What every benchmark shares: the result stamp, where a result is written, and paired-ratio summaries.

Naming: a run writes `benchmarks/results/<bench>-<UTC time>.json` unless `--out` names a file, so a plain rerun never
overwrites a kept result. `benchmarks/results/README.md` names the current file of each benchmark; superseded runs
move to `benchmarks/results/archive/`.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def stamp() -> dict[str, str]:
    """`code_version` (commit, plus a content hash of uncommitted changes) and `created_at` (UTC, ISO 8601)."""
    from manifests.version import code_version

    return {"code_version": code_version(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def default_output(bench: str, folder: Path = RESULTS) -> Path:
    """A new file per run: `<folder>/<bench>-<YYYYmmddTHHMMSSZ>.json`, a later second if that name is taken."""
    now = int(time.time())
    while True:
        path = folder / f"{bench}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}.json"
        if not path.exists() and not (folder / "archive" / path.name).exists():
            return path
        now += 1


def write_result(bench: str, payload: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write `payload` with the stamp first, to `out` or a new default file; returns the path."""
    path = Path(out) if out else default_output(bench)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": bench, **stamp(), **payload}
    path.write_text(json.dumps(body, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def paired_summary(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Ratios a[i] / b[i] of paired repetitions: their median, min, max and the ratios themselves."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need paired, non-empty repetitions, got {len(a)} and {len(b)}")
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {"median_ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "ratios": [round(r, 4) for r in ratios], "pairs": len(ratios)}
