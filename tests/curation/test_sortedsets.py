"""The sort-based id set operations give numpy's results (including empty, repeated and unsorted input)."""
from __future__ import annotations

import numpy as np

from curation.sortedsets import setdiff, unique


def test_unique_and_setdiff_match_numpy():
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 17, 1000):
        left = rng.integers(0, max(n, 1) * 2, n).astype(np.int64)
        right = rng.integers(0, max(n, 1) * 2, n // 2).astype(np.int64)
        assert np.array_equal(unique(left), np.unique(left))
        assert np.array_equal(setdiff(left, right), np.setdiff1d(left, right))
        assert unique(left).dtype == np.int64
    assert np.array_equal(setdiff(np.array([5, 3, 3, 9]), np.array([], np.int64)), [3, 5, 9])
