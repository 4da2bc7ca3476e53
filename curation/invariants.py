"""The build's invariants, checked on the files themselves: sample ids read from every stage's parquet files and
samples counted in the shard tars, never what a stage said it did.

Both `write_manifest` (a manifest is only written when every invariant holds) and `cc4m verify` (which rereads a
finished build) run `check_invariants`. Each problem starts with the invariant's name, so a failure says which rule
broke, e.g. "dedup: kept + duplicates = successful downloads: ...".
"""
from __future__ import annotations

import tarfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import tario
from curation.ingest import DONE_MARKER
from curation.io import read_json, read_parquet
from curation.sortedsets import setdiff, unique
from curation.staging import STATUSES
from manifests.layout import BuildLayout

INGEST_DONE = Path("ingest") / DONE_MARKER


def _ids(paths: Iterable[Path], column: str = "sample_id") -> np.ndarray:
    arrays = [read_parquet(p, columns=[column])[column].to_numpy(zero_copy_only=False) for p in paths]
    return np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)


def _describe(ids: np.ndarray, limit: int = 5) -> str:
    return f"{len(ids)} id(s), e.g. {sorted(int(i) for i in ids[:limit])}"


def _same_ids(name: str, left: np.ndarray, right: np.ndarray, left_label: str, right_label: str) -> list[str]:
    """Problems if the two id lists differ as sets or either holds an id twice."""
    problems = []
    for label, ids in ((left_label, left), (right_label, right)):
        values, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            problems.append(f"{name}: {label} holds {_describe(values[counts > 1])} more than once")
    only_left = setdiff(left, right)
    only_right = setdiff(right, left)
    if len(only_left):
        problems.append(f"{name}: {_describe(only_left)} in {left_label} but not in {right_label}")
    if len(only_right):
        problems.append(f"{name}: {_describe(only_right)} in {right_label} but not in {left_label}")
    return problems


def shard_members(path: Path) -> dict[str, list[str]]:
    """{sample key: member extensions} of a shard tar, from its headers alone (curation.tario: checksummed)."""
    keys: dict[str, list[str]] = {}
    for name, _, _ in tario.scan(path):
        stem, _, ext = name.rpartition(".")
        keys.setdefault(stem, []).append(ext)
    return keys


def _ingest(layout: BuildLayout) -> tuple[list[str], np.ndarray]:
    ingested = _ids(layout.parts(layout.ingest_dir))
    rejected = _ids(layout.parts(layout.rejects_dir))
    problems = []
    done = layout.root / INGEST_DONE
    if done.exists():  # the source's row count, as ingest counted it while reading the source
        read = int(read_json(done)["result"]["source_rows"])
        if read != len(ingested) + len(rejected):
            problems.append(f"ingest: read = ingested + rejected: the source has {read} rows, the files hold "
                            f"{len(ingested)} ingested + {len(rejected)} rejected")
    else:
        problems.append(f"ingest: read = ingested + rejected: {done} is missing (ingest did not finish)")
    both = np.concatenate([ingested, rejected])
    values, counts = np.unique(both, return_counts=True)
    if (counts > 1).any():
        problems.append(f"ingest: every row once: {_describe(values[counts > 1])} appear more than once "
                        "in ingest/ and rejects/")
    return problems, ingested


def _decisions(layout: BuildLayout, ingested: np.ndarray) -> tuple[list[str], np.ndarray]:
    captions = _ids(layout.parts(layout.captions_dir))
    problems = _same_ids("parse: every ingested row is parsed", captions, ingested, "captions/", "ingest/")
    selected = _ids(layout.parts(layout.selected_dir))
    outside = setdiff(selected, captions)
    if len(outside):
        problems.append(f"select: selected rows are parsed rows: {_describe(outside)} in selected/ only")
    downloads = read_parquet(layout.downloads, columns=["sample_id", "status"])
    unknown = sorted(set(downloads["status"].to_pylist()) - set(STATUSES))
    if unknown:
        problems.append(f"download: every status is known: {unknown} are not among {list(STATUSES)}")
    problems += _same_ids("download: one row per selected sample", downloads["sample_id"].to_numpy(), selected,
                          "downloads.parquet", "selected/")
    success = downloads.filter(pc.equal(downloads["status"], "success"))["sample_id"].to_numpy()
    kept = _ids([layout.kept])
    duplicates = read_parquet(layout.duplicates, columns=["sample_id", "duplicate_of"]) \
        if layout.duplicates.exists() else pa.table({"sample_id": pa.array([], pa.int64()),
                                                     "duplicate_of": pa.array([], pa.int64())})
    removed = duplicates["sample_id"].to_numpy()
    problems += _same_ids("dedup: kept + duplicates = successful downloads", np.concatenate([kept, removed]),
                          success, "kept.parquet + duplicates.parquet", "successful downloads")
    orphans = setdiff(duplicates["duplicate_of"].to_numpy(), kept)
    if len(orphans):
        problems.append(f"dedup: a duplicate points at a kept sample: duplicate_of {_describe(orphans)} not kept")
    return problems, kept


def _index(layout: BuildLayout, kept: np.ndarray) -> list[str]:
    problems = []
    if layout.entity_index.exists():
        lists = read_parquet(layout.entity_index, columns=["sample_ids"])["sample_ids"]
        indexed = unique(pc.list_flatten(lists).to_numpy(zero_copy_only=False)).astype(np.int64)
        problems += _same_ids("index: entity_index covers the kept samples", indexed, unique(kept),
                              "index/entity_index.parquet", "kept.parquet")
    partners = read_parquet(layout.partners, columns=["sample_id", "partner_id"])
    strays = setdiff(np.concatenate([partners["sample_id"].to_numpy(), partners["partner_id"].to_numpy()]),
                          kept)
    if len(strays):
        problems.append(f"index: partners are kept samples: {_describe(strays)} are not kept")
    if pc.any(pc.equal(partners["sample_id"], partners["partner_id"])).as_py():
        problems.append("index: partners are kept samples: a sample is its own partner")
    return problems


def _shards(layout: BuildLayout, kept: np.ndarray) -> list[str]:
    # One file at a time: a list of paths goes through pyarrow.dataset, whose import (pandas) alone costs 0.4 s.
    parts = [read_parquet(p, columns=["sample_id", "shard"]) for p in layout.parts(layout.meta_dir)]
    meta = pa.concat_tables(parts) if parts else pa.table({"sample_id": pa.array([], pa.int64()),
                                                           "shard": pa.array([], pa.string())})
    problems = _same_ids("reshard: meta holds the kept samples", meta["sample_id"].to_numpy(), kept, "meta/",
                         "kept.parquet")
    per_shard = Counter(meta["shard"].to_pylist())
    for path in layout.shards():
        try:
            members = {key: len(exts) for key, exts in shard_members(path).items()}
        except (tarfile.TarError, OSError, ValueError) as err:
            problems.append(f"reshard: shard samples = meta rows: {path.name} is unreadable ({err})")
            continue
        incomplete = [key for key, n in members.items() if n != 3]
        if incomplete:
            problems.append(f"reshard: every sample has jpg, txt and json: {path.name} sample(s) {incomplete[:5]}")
        expected = per_shard.pop(path.name, 0)
        if len(members) != expected:
            problems.append(f"reshard: shard samples = meta rows: {path.name} holds {len(members)} samples, "
                            f"meta lists {expected}")
    for name in sorted(per_shard):
        problems.append(f"reshard: shard samples = meta rows: meta lists {per_shard[name]} samples in {name}, "
                        "which does not exist")
    if layout.locator.exists():
        located = _ids([layout.locator])
        problems += _same_ids("reshard: the locator covers the written samples", located, meta["sample_id"].to_numpy(),
                              "index/locator.parquet", "meta/")
    return problems


def check_invariants(build_dir: str | Path) -> list[str]:
    """Every invariant of a finished build, checked on its files; [] when all hold."""
    layout = BuildLayout(Path(build_dir))
    try:
        problems, ingested = _ingest(layout)
        decision_problems, kept = _decisions(layout, ingested)
        problems += decision_problems
        problems += _index(layout, kept)
        problems += _shards(layout, kept)
    except (OSError, KeyError, ValueError, pa.ArrowException) as err:
        return [f"build files unreadable: {type(err).__name__}: {err}"]
    return problems
