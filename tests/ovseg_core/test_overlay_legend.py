"""Overlay legends: every class present in the prediction or ground truth is named next to its colour."""
from __future__ import annotations

import numpy as np
from PIL import Image

from ovseg_core.evaluation.overlay import legend_entries, save_overlay, voc_palette


def test_legend_names_present_classes_with_their_colours(tmp_path):
    image = np.full((64, 64, 3), 120, np.uint8)
    pred = np.zeros((64, 64), np.int64)
    pred[10:30, 10:30] = 3
    gt = np.zeros((64, 64), np.int64)
    gt[20:40, 20:40] = 5
    gt[0, 0] = 255
    names = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle with a rather long class name"]
    palette = voc_palette()
    entries = legend_entries([pred, gt], names, palette, background_index=0, ignore_index=255)
    assert entries == [("bird", tuple(palette[3])), ("bottle with a rather long class name", tuple(palette[5]))]

    plain = save_overlay(image, pred, gt, tmp_path / "plain.png")
    labelled = save_overlay(image, pred, gt, tmp_path / "legend.png", class_names=names)
    with Image.open(plain) as a, Image.open(labelled) as b:
        assert a.size == (192, 64)
        width, height = b.size
        out = np.asarray(b.convert("RGB"))
    assert height > 64 and width >= 192
    assert np.array_equal(out[:64, :192], np.asarray(Image.open(plain).convert("RGB")))  # panels unchanged
    legend = out[64:]
    for _, colour in entries:  # each class's swatch is drawn in its palette colour
        assert (legend == np.array(colour, np.uint8)).all(axis=-1).sum() >= 100
    assert (legend.sum(axis=-1) < 100).sum() > 50  # dark text pixels: the names are written
