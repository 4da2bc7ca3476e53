"""The order in which reshard lays samples out in shards: by growth round, and within a round in a seeded
permutation of the sample ids (not in source-row order).

Why: crawled sources (CC12M) are grouped by site, so rows that are neighbours in the source share classes. Written in
sample_id order, every shard held a few sites' worth of classes, and a rank's batches stayed far from a uniform draw
even with 16 shards in flight (class-mix distance 0.43 against 0.28, benchmarks/bench_loader.py). The release draws
a global permutation per epoch over a map-style dataset; webdataset shards cannot, so the build permutes once.

Growth rounds: the ids present at a build's first reshard form round 0; ids above every earlier round's bound, added
when the source grew, form the next round, recorded in history/layout_rounds.json. A round's samples are laid out
after the previous round's, so growing a source rewrites exactly what it did with the id order: the old partial
last shard (filled up with new samples) and new shards; every full old shard keeps its bytes. Trade-off (see
docs/training.md): a grown build is no longer byte-identical to a fresh build of the grown source (same samples,
same per-sample bytes, another shard layout), and each round's own mix is only as wide as the round; rebuilding the
same history is byte-identical.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from curation.io import read_json, write_json_atomic

ROUNDS_FILE = "layout_rounds.json"
ORDER_SEED = 0x5EED_CC4A  # fixed: the layout is part of the build's contract, not a run-time choice
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix_ids(ids: np.ndarray, seed: int = ORDER_SEED) -> np.ndarray:
    """A 64-bit hash of each id (splitmix64 finaliser): sorting by it is a seeded permutation that does not depend
    on which other ids are present."""
    with np.errstate(over="ignore"):
        x = ids.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & _MASK


def rounds_path(build_root: Path) -> Path:
    return Path(build_root) / "history" / ROUNDS_FILE


def growth_rounds(build_root: Path, ids: np.ndarray) -> list[int]:
    """The rounds' exclusive upper id bounds, ascending; a new round is recorded when `ids` go beyond the last."""
    path = rounds_path(build_root)
    bounds = [int(b) for b in read_json(path)["bounds"]] if path.exists() else []
    top = int(ids.max()) + 1 if len(ids) else 0
    if top and (not bounds or top > bounds[-1]):
        bounds.append(top)
        write_json_atomic(path, {"bounds": bounds, "seed": ORDER_SEED})
    return bounds


def layout_order(build_root: Path, ids: np.ndarray) -> np.ndarray:
    """Indices into `ids` (the kept sample ids) in shard layout order: by round, then by `mix_ids`."""
    ids = np.asarray(ids, dtype=np.int64)
    bounds = growth_rounds(build_root, ids)
    round_of = np.searchsorted(np.asarray(bounds, dtype=np.int64), ids, side="right")
    return np.lexsort((ids, mix_ids(ids), round_of))
