"""What changed since the previous build of a folder, for the manifest (and the weekly `retrain` flow's record).

The shards' sample ids before a rebuild are snapshotted by the reshard stage just before it rewrites anything
(`snapshot_written`), tagged with the sha256 of the manifest they belong to; the manifest stage diffs them with the
ids written now (`changes_since_previous`). The source's side (rows before and added, parts touched) is what the
last ingest that changed anything recorded in ingest-done.json. Both are files, so a build killed between the two
stages still reports the right change when it is rerun.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curation.ingest import DONE_MARKER
from curation.io import read_json, read_parquet, sha256_file, write_json_atomic, write_parquet_atomic
from curation.sortedsets import setdiff
from manifests.layout import BuildLayout

PREVIOUS_IDS = "previous_written.parquet"
PREVIOUS_RECORD = "previous.json"


def history_dir(layout: BuildLayout) -> Path:
    return layout.root / "history"


def written_ids(layout: BuildLayout) -> np.ndarray:
    parts = layout.parts(layout.meta_dir) if layout.meta_dir.exists() else []
    arrays = [read_parquet(p, columns=["sample_id"])["sample_id"].to_numpy() for p in parts]
    return np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)


def _snapshot_of(layout: BuildLayout, manifest_sha: str) -> bool:
    """Whether the snapshot in history/ holds the ids of the build whose manifest has this sha256."""
    record = history_dir(layout) / PREVIOUS_RECORD
    return record.exists() and read_json(record).get("manifest_sha256") == manifest_sha


def snapshot_written(layout: BuildLayout) -> None:
    """Before the shards of a finished build are rewritten: keep its written ids, tagged with its manifest's
    sha256. Taken once per manifest (a rerun after a crash keeps the first snapshot)."""
    if not layout.manifest.exists():
        return
    manifest_sha = sha256_file(layout.manifest)
    if _snapshot_of(layout, manifest_sha):
        return
    write_parquet_atomic(history_dir(layout) / PREVIOUS_IDS, pa.table({"sample_id": written_ids(layout)}))
    write_json_atomic(history_dir(layout) / PREVIOUS_RECORD, {"manifest_sha256": manifest_sha})


def changes_since_previous(layout: BuildLayout) -> dict[str, Any]:
    """{"previous_manifest_sha256", "source", "samples_added", "samples_removed"} for the manifest being written.
    No previous manifest: every written sample is added."""
    now = written_ids(layout)
    done = layout.ingest_dir / DONE_MARKER
    source = read_json(done).get("changes") if done.exists() else None
    if not layout.manifest.exists():
        return {"previous_manifest_sha256": None, "source": source, "samples_added": len(now), "samples_removed": 0}
    manifest_sha = sha256_file(layout.manifest)
    if _snapshot_of(layout, manifest_sha):
        before = read_parquet(history_dir(layout) / PREVIOUS_IDS)["sample_id"].to_numpy()
    else:  # the shards were not rewritten since that manifest: the same ids
        before = now
    return {"previous_manifest_sha256": manifest_sha, "source": source,
            "samples_added": int(setdiff(now, before).size),
            "samples_removed": int(setdiff(before, now).size)}
