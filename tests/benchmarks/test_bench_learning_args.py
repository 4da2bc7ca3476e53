"""bench_learning's evaluator options are checked before any training starts."""
from __future__ import annotations

import pytest

from benchmarks.bench_learning import refine_candidates


def test_refine_candidates_parse_the_comma_list_and_refuse_unknown_modes():
    assert refine_candidates("none,pamr") == ("none", "pamr")
    assert refine_candidates(" none ") == ("none",)
    for bad in ("", "none,crf", ","):
        with pytest.raises(ValueError, match="--refine"):
            refine_candidates(bad)
