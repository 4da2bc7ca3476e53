"""What people read after an evaluation: panel titles in overlays, the 4 x 4 contact sheet, best and worst classes."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from ovseg_core.evaluation.metrics import best_and_worst_classes
from ovseg_core.evaluation.overlay import contact_sheet, save_overlay


def test_contact_sheet_tiles_the_first_sixteen_overlays_four_by_four(tmp_path):
    paths = []
    for index in range(18):
        colour = (index * 13 % 256, 40, 200)
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (30, 20 + index % 3), colour).save(path)
        paths.append(path)
    sheet = contact_sheet(paths, tmp_path / "sheet.png", pad=2)
    with Image.open(sheet) as img:
        out = np.asarray(img.convert("RGB"))
    cell_w, cell_h = 30 + 2, 22 + 2
    assert out.shape == (4 * cell_h + 2, 4 * cell_w + 2, 3)
    for index in range(16):  # each tile sits in its cell, row by row; the 17th and 18th are left out
        y, x = 2 + (index // 4) * cell_h, 2 + (index % 4) * cell_w
        assert tuple(out[y + 5, x + 5]) == (index * 13 % 256, 40, 200)
    with pytest.raises(ValueError):
        contact_sheet([], tmp_path / "none.png")


def test_overlay_legend_names_the_three_panels(tmp_path):
    image = np.full((48, 48, 3), 120, np.uint8)
    labels = np.zeros((48, 48), np.int64)
    labels[5:20, 5:20] = 2
    path = save_overlay(image, labels, labels, tmp_path / "o.png", class_names=["background", "cat", "dog"])
    with Image.open(path) as img:
        out = np.asarray(img.convert("RGB"))
    title_line = out[48:48 + 17]
    for panel in range(3):  # dark title text under each of image | prediction | ground truth
        assert (title_line[:, panel * 48:(panel + 1) * 48].sum(axis=-1) < 200).sum() > 10


def test_best_and_worst_classes_skip_background_and_unscored():
    per_class = {"background": 0.99, "a": 0.5, "b": 0.1, "c": None, "d": 0.7, "e": float("nan"), "f": 0.0}
    best, worst = best_and_worst_classes(per_class, 2)
    assert best == [("d", 0.7), ("a", 0.5)]
    assert worst == [("f", 0.0), ("b", 0.1)]
    best, worst = best_and_worst_classes(per_class, 5)
    assert [n for n, _ in best] == ["d", "a", "b", "f"] and not any(math.isnan(v) for _, v in worst)
