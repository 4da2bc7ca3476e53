"""Set operations on id arrays that stay O(n log n) at CC12M sizes.

numpy 2.4's `np.unique(a)` without return_counts/return_inverse takes a hash-based path that is ~75x slower than a
sort for 2M int64 ids and grows faster than linearly (0.04 s at 60k, 2.6 s at 2M), and `np.setdiff1d` calls it on
both sides. It made the manifest's invariant checks the one stage above a growth exponent of 1.1 in
benchmarks/bench_scale.py. These do the same by sorting.
"""
from __future__ import annotations

import numpy as np


def unique(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values (np.unique's result, by a sort)."""
    ordered = np.sort(np.asarray(values))
    if len(ordered) < 2:
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


def setdiff(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The sorted distinct values of `left` that are not in `right` (np.setdiff1d's result)."""
    distinct = unique(left)
    return distinct[~np.isin(distinct, np.asarray(right))]
