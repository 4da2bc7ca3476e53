"""The demo's closing lines name the 5 best and the 5 worst classes (background and unscored classes left out);
its evaluation chooses its settings on the selection split."""
from __future__ import annotations

from pathlib import Path

from flows.local import DEMO_OVERLAYS, _class_ranking_lines


def test_demo_prints_best_and_worst_five_classes():
    per_class = {"background": 0.9, **{f"c{i}": i / 10 for i in range(8)}, "absent": None}
    best, worst = _class_ranking_lines(per_class)
    assert best.split(":", 1)[1].strip() == "c7 0.70, c6 0.60, c5 0.50, c4 0.40, c3 0.30"
    assert worst.split(":", 1)[1].strip() == "c0 0.00, c1 0.10, c2 0.20, c3 0.30, c4 0.40"
    assert _class_ranking_lines({}) == []
    assert DEMO_OVERLAYS == 16  # enough overlays for the report's 4 x 4 contact sheet


def test_demo_evaluation_chooses_pamr_or_not_on_the_selection_split():
    from flows.local import _eval_params

    params = _eval_params({"sample": {"eval_dir": "/x/eval"}}, {"checkpoint": "/x/c.pt", "entry_id": "m1"},
                          Path("/x/out"), Path("/x/reg"), None)
    (spec,) = params["datasets"]
    assert spec["split"] == "val" and spec["select_split"] == "train"
    assert spec["candidates"] == {"refine": ["none", "pamr"]}
