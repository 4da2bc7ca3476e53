"""Evaluation: hand-computed mIoU, dataset layouts read from tiny fake folders, overlays, evaluate() and the CLI."""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ovseg_core.evaluation import (
    ConfusionMatrix,
    DatasetLayoutError,
    evaluate,
    load_dataset,
    save_overlay,
)
from ovseg_core.evaluation import cli as eval_cli
from ovseg_core.evaluation.cli import add_eval_arguments, cli_eval
from ovseg_core.evaluation.overlay import voc_palette
from ovseg_core.zero_shot.templates import sample_classes

# ------------------------------------------------------------------ metrics


def test_miou_hand_computed_with_ignore_and_absent_class():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 1, 0]])  # the prediction under the ignore pixel must not count
    cm = ConfusionMatrix(num_classes=4)
    cm.update(pred, gt)
    scores = cm.compute()
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 2 -> 2/4; class 2: TP 0, FN 1 -> 0; class 3 absent -> NaN.
    np.testing.assert_allclose(scores.per_class_iou[:3], [0.5, 0.5, 0.0])
    assert math.isnan(scores.per_class_iou[3])
    assert scores.miou == pytest.approx(1 / 3)
    assert scores.pixel_acc == pytest.approx(3 / 5)
    assert scores.gt_pixels.tolist() == [2, 2, 1, 0] and scores.pred_pixels.tolist() == [1, 4, 0, 0]


def test_streaming_updates_equal_one_update_and_bad_labels_raise():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=(2, 16, 16))
    gt[0, :3] = 255
    pred = rng.integers(0, 5, size=(2, 16, 16))
    streamed, whole = ConfusionMatrix(5), ConfusionMatrix(5)
    for p, g in zip(pred, gt):
        streamed.update(torch.from_numpy(p), g)
    whole.update(pred.reshape(32, 16), gt.reshape(32, 16))
    assert np.array_equal(streamed.matrix, whole.matrix) and streamed.n_images == 2
    with pytest.raises(ValueError, match="ground-truth labels"):
        ConfusionMatrix(3).update(np.zeros((2, 2)), np.full((2, 2), 7))
    with pytest.raises(ValueError, match="predicted labels"):
        ConfusionMatrix(3).update(np.full((2, 2), 3), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(np.zeros((2, 2)), np.zeros((2, 3)))


# ------------------------------------------------------------------ fake dataset folders


def write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, quality=95)


def write_label(path: Path, label: np.ndarray, mode: str = "P") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8), mode="L")
    if mode == "P":
        img = img.convert("P")
        img.putpalette(voc_palette().flatten().tolist())
    img.save(path)


def label_map(values: list[int], height: int = 8, width: int = 12) -> np.ndarray:
    """Vertical bands of the given label values."""
    cols = np.array_split(np.arange(width), len(values))
    out = np.zeros((height, width), dtype=np.uint8)
    for band, value in zip(cols, values):
        out[:, band] = value
    return out


def rgb(height: int = 8, width: int = 12, value: int = 100) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


def make_voc_like(base: Path, ids: dict[str, np.ndarray], label_dir: str, split_file: str, mode: str = "P") -> None:
    for image_id, label in ids.items():
        write_image(base / "JPEGImages" / f"{image_id}.jpg", rgb(*label.shape))
        write_label(base / label_dir / f"{image_id}.png", label, mode)
    (base / split_file).parent.mkdir(parents=True, exist_ok=True)
    (base / split_file).write_text("".join(f"{i}\n" for i in ids))


def test_voc_layout_reads_palette_labels_from_root_or_parent(tmp_path):
    labels = {"2007_000032": label_map([0, 15, 255]), "2007_000033": label_map([20, 1])}
    make_voc_like(tmp_path / "VOCdevkit/VOC2012", labels, "SegmentationClass", "ImageSets/Segmentation/val.txt")
    for root in (tmp_path, tmp_path / "VOCdevkit/VOC2012"):
        ds = load_dataset("voc", root)
        assert len(ds) == 2 and ds.num_classes == 21 and ds.has_background and ds.default_bg_thresh == 0.95
        image_id, image, label = ds[0]
        assert image_id == "2007_000032" and image.size == (12, 8) and image.mode == "RGB"
        assert np.array_equal(label, labels["2007_000032"]) and label.dtype == np.uint8
        assert np.array_equal(ds[1].label, labels["2007_000033"])


def test_context_layout(tmp_path):
    labels = {"2008_000002": label_map([0, 59]), "2008_000003": label_map([12, 255, 3])}
    make_voc_like(
        tmp_path / "VOCdevkit/VOC2010",
        labels,
        "SegmentationClassContext",
        "ImageSets/SegmentationContext/val.txt",
        mode="L",
    )
    ds = load_dataset("context", tmp_path)
    assert len(ds) == 2 and ds.num_classes == 60 and ds.classnames[0] == "background" and ds.default_bg_thresh == 0.35
    assert np.array_equal(ds[0].label, labels["2008_000002"]) and np.array_equal(ds[1].label, labels["2008_000003"])


def test_coco_object_layout_keeps_background_and_ignore(tmp_path):
    labels = {"000000000139": label_map([0, 80, 255]), "000000000285": label_map([1, 23])}
    for image_id, label in labels.items():
        write_image(tmp_path / "images/val2017" / f"{image_id}.jpg", rgb(*label.shape))
        write_label(tmp_path / "annotations/val2017" / f"{image_id}_instanceTrainIds.png", label, mode="L")
    ds = load_dataset("coco_object", tmp_path)
    assert [s.image_id for s in ds] == ["000000000139", "000000000285"]
    assert ds.num_classes == 81 and ds.has_background and ds.default_bg_thresh == 0.9
    assert np.array_equal(ds[0].label, labels["000000000139"])
    # An image without its annotation is an error that names the missing file, never a silent skip.
    write_image(tmp_path / "images/val2017/000000000632.jpg", rgb())
    with pytest.raises(DatasetLayoutError, match="000000000632_instanceTrainIds.png"):
        load_dataset("coco_object", tmp_path)


def test_ade20k_layout_reduces_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    raw = {"ADE_val_00000001": label_map([0, 1, 150]), "ADE_val_00000002": label_map([2, 0])}
    for image_id, label in raw.items():
        write_image(base / "images/validation" / f"{image_id}.jpg", rgb(*label.shape))
        write_label(base / "annotations/validation" / f"{image_id}.png", label, mode="L")
    ds = load_dataset("ade20k", tmp_path)
    assert len(ds) == 2 and ds.num_classes == 150 and not ds.has_background
    assert np.array_equal(ds[0].label, label_map([255, 0, 149]))
    assert np.array_equal(ds[1].label, label_map([1, 255]))


def make_sample_set(
    root: Path, classnames: tuple[str, ...], labels: dict[str, np.ndarray], images: dict[str, np.ndarray] | None = None
) -> None:
    make_voc_like(root, labels, "SegmentationClass", "ImageSets/Segmentation/val.txt")
    for image_id, array in (images or {}).items():
        write_image(root / "JPEGImages" / f"{image_id}.jpg", array)
    (root / "classes.txt").write_text("\n".join(classnames) + "\n")


def test_sample_layout_reads_classes_txt(tmp_path):
    labels = {"000000000001": label_map([0, 73]), "000000000007": label_map([5, 255])}
    make_sample_set(tmp_path, sample_classes(), labels)
    ds = load_dataset("sample", tmp_path)
    assert ds.classnames == sample_classes() and ds.has_background and len(ds) == 2
    assert np.array_equal(ds[0].label, labels["000000000001"])
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="classes.txt"):
        load_dataset("sample", tmp_path)


def test_layout_mismatches_give_clear_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="JPEGImages"):
        load_dataset("voc", tmp_path)
    labels = {"a": label_map([0, 1]), "b": label_map([2])}
    make_voc_like(tmp_path, labels, "SegmentationClass", "ImageSets/Segmentation/val.txt")
    with pytest.raises(DatasetLayoutError, match="missing label folder .*SegmentationClassContext"):
        load_dataset("context", tmp_path)  # JPEGImages exists but not the Context label folder
    (tmp_path / "SegmentationClass/b.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of 2 label PNGs missing.*b\.png"):
        load_dataset("voc", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset layout"):
        load_dataset("cityscapes", tmp_path)
    write_label(tmp_path / "SegmentationClass/b.png", label_map([30]))
    with pytest.raises(ValueError, match=r"label values \[30\]"):
        load_dataset("voc", tmp_path)[1]
    Image.fromarray(rgb()).save(tmp_path / "SegmentationClass/b.png")
    with pytest.raises(ValueError, match="mode P or L"):
        load_dataset("voc", tmp_path)[1]


# ------------------------------------------------------------------ overlays


def test_overlay_is_a_valid_side_by_side_png(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
    pred = label_map([0, 1, 2])
    gt = label_map([0, 255, 2])
    path = save_overlay(Image.fromarray(image), torch.from_numpy(pred.astype(np.int64)), gt, tmp_path / "o/x.png")
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (36, 8)
        out = np.asarray(img.convert("RGB"))
    assert np.array_equal(out[:, :12], image)
    pred_panel, gt_panel = out[:, 12:24], out[:, 24:]
    assert np.array_equal(pred_panel[:, :4], image[:, :4])  # background left as the image
    assert not np.array_equal(pred_panel[:, 4:8], image[:, 4:8])  # class 1 coloured
    assert np.array_equal(gt_panel[:, 4:8], image[:, 4:8])  # ignore left as the image
    assert not list(path.parent.glob("*.tmp"))
    with pytest.raises(ValueError, match="match the image size"):
        save_overlay(image, pred[:4], gt, tmp_path / "bad.png")


# ------------------------------------------------------------------ evaluate() with a fake model


@dataclass
class FakeImageOutput:
    image_emb: torch.Tensor
    group_emb: torch.Tensor
    assign: torch.Tensor


class CodeModel(nn.Module):
    """Patch group = round(channel 0): group 0 = cat, 1 = dog, 2 orthogonal to all classes (-> background)."""

    def __init__(self) -> None:
        super().__init__()
        self.texts = {"cat": torch.eye(4)[0], "dog": torch.eye(4)[1], "car": torch.eye(4)[2]}
        self.register_buffer("groups", torch.eye(4)[[0, 1, 3]])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(50.0)))
        self.patch_size = 4
        self.image_size = 16

    def encode_image(self, images: torch.Tensor) -> FakeImageOutput:
        codes = F.avg_pool2d(images[:, :1], 4).round().long().clamp(0, 2)[:, 0]
        batch = images.shape[0]
        assign = F.one_hot(codes, 3).permute(0, 3, 1, 2).float()
        image_emb = F.normalize(torch.ones(batch, 4), dim=-1)
        return FakeImageOutput(image_emb, self.groups.expand(batch, -1, -1), assign)

    def encode_text_strings(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([next(v for k, v in self.texts.items() if k in text) for text in texts])


# With mean 0 and std 64/255 a grey level of 64 * code normalises to exactly the code; JPEG noise rounds away.
CODE_NORM = {"mean": (0.0, 0.0, 0.0), "std": (64 / 255,) * 3}
CODE_CLASSES = ("background", "cat", "dog", "car")


def code_image(codes: list[int], height: int = 16, band: int = 16) -> np.ndarray:
    row = np.repeat(np.array(codes) * 64, band)
    return np.repeat(row[None, :, None], height, axis=0).repeat(3, axis=2).astype(np.uint8)


def make_code_dataset(root: Path) -> None:
    # code 0 -> cat (1), code 1 -> dog (2), code 2 -> background (0); car (3) never appears anywhere.
    images = {"img_a": code_image([0, 1, 2]), "img_b": code_image([2, 0])}
    labels = {
        "img_a": np.repeat(np.repeat([[1, 2, 0]], 16, axis=1), 16, axis=0),
        "img_b": np.repeat(np.repeat([[0, 1]], 16, axis=1), 16, axis=0),
    }
    labels["img_a"][0, 0] = 255
    make_sample_set(root, CODE_CLASSES, labels, images)


def test_evaluate_end_to_end_writes_metrics_csv_and_overlays(tmp_path):
    make_code_dataset(tmp_path / "data")
    ds = load_dataset("sample", tmp_path / "data")
    model = CodeModel().train()
    result = evaluate(
        model,
        ds,
        window=16,
        stride=8,
        short_side=None,
        out_dir=tmp_path / "out",
        n_overlays=1,
        **CODE_NORM,
    )
    assert model.training  # mode restored for a caller that evaluates mid-training
    assert result["n_images"] == 2 and result["mIoU"] == pytest.approx(1.0) and result["pixel_acc"] == 1.0
    assert result["per_class"] == {"background": 1.0, "cat": 1.0, "dog": 1.0, "car": None}
    assert result["n_classes_scored"] == 3
    assert result["settings"]["bg_thresh"] == 0.95 and result["settings"]["window"] == 16
    saved = json.loads((tmp_path / "out/metrics.json").read_text())
    assert saved["per_class"]["car"] is None and saved["mIoU"] == pytest.approx(1.0)
    assert saved["overlays"] == [str(tmp_path / "out/overlays/0000_img_a.png")]
    with open(tmp_path / "out/per_class_iou.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["class"] for r in rows] == list(CODE_CLASSES) and rows[3]["iou"] == "" and rows[1]["iou"] == "1.000000"
    overlays = sorted((tmp_path / "out/overlays").glob("*.png"))
    assert [p.name for p in overlays] == ["0000_img_a.png"]
    with Image.open(overlays[0]) as img:  # three 48x16 panels above a legend strip naming the classes
        assert img.size[0] >= 3 * 48 and img.size[1] > 16

    one = evaluate(model, ds, window=None, short_side=None, max_images=1, topk=1, **CODE_NORM)
    assert one["n_images"] == 1 and one["settings"]["topk"] == 1 and one["settings"]["stride"] is None
    assert one["overlays"] == [] and one["outputs"] == {}  # no out_dir, no overlay_dir: nothing written


def test_cli_eval_with_a_fake_checkpoint_loader(tmp_path, monkeypatch, capsys):
    make_code_dataset(tmp_path / "data")
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"fake")
    loaded = []
    monkeypatch.setattr(eval_cli, "_load_model", lambda path: loaded.append(path) or CodeModel())
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(
        [
            "--checkpoint",
            str(checkpoint),
            "--dataset-layout",
            "sample",
            "--data-root",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "out"),
            "--window",
            "0",
            "--short-side",
            "0",
            "--max-images",
            "1",
            "--n-overlays",
            "1",
        ]
    )
    assert cli_eval(args) == 0
    assert loaded == [str(checkpoint)]
    saved = json.loads((tmp_path / "out/metrics.json").read_text())
    assert saved["checkpoint"] == str(checkpoint) and saved["n_images"] == 1 and saved["settings"]["window"] is None
    # Default sizes follow the model's training resolution (CodeModel: 16 px -> short side 32, window 32, stride 16).
    auto = parser.parse_args(
        [
            "--checkpoint",
            str(checkpoint),
            "--dataset-layout",
            "sample",
            "--data-root",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "auto"),
            "--n-overlays",
            "0",
        ]
    )
    assert cli_eval(auto) == 0
    settings = json.loads((tmp_path / "auto/metrics.json").read_text())["settings"]
    assert (settings["short_side"], settings["window"], settings["stride"]) == (32, 32, 16)
    assert not (tmp_path / "auto/overlays").exists()
    assert len(list((tmp_path / "out/overlays").glob("*.png"))) == 1
    assert "mIoU" in capsys.readouterr().out

    bad = parser.parse_args(["--checkpoint", str(checkpoint), "--dataset-layout", "voc", "--data-root", str(tmp_path)])
    assert cli_eval(bad) == 2
    assert "JPEGImages" in capsys.readouterr().err


def test_paired_bootstrap_separates_a_real_lead_from_noise():
    from ovseg_core.evaluation.metrics import ConfusionMatrix, paired_bootstrap_miou_delta

    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 3, size=(8, 8)) for _ in range(30)]
    perfect, background, noisy = [], [], []
    for gt in gts:
        perfect.append(ConfusionMatrix(3).update(gt, gt))
        background.append(ConfusionMatrix(3).update(np.zeros_like(gt), gt))
        flip = rng.random(gt.shape) < 0.5
        noisy.append(ConfusionMatrix(3).update(np.where(flip, rng.integers(0, 3, size=gt.shape), gt), gt))
    lead = paired_bootstrap_miou_delta(np.stack(perfect), np.stack(background), n_resamples=200)
    full_bg = ConfusionMatrix(3)
    for gt in gts:
        full_bg.update(np.zeros_like(gt), gt)
    assert lead["delta"] == pytest.approx(1.0 - full_bg.compute().miou)
    assert 0 < lead["low"] <= lead["delta"] <= lead["high"] and lead["p_not_better"] == 0.0
    same = paired_bootstrap_miou_delta(np.stack(noisy), np.stack(noisy), n_resamples=50)
    assert same["delta"] == 0.0 and same["low"] == 0.0 == same["high"] and same["p_not_better"] == 1.0
    with pytest.raises(ValueError):
        paired_bootstrap_miou_delta(np.stack(perfect), np.stack(perfect)[:, :2])


def test_promotion_evidence_pairs_the_same_images_against_each_baseline(tmp_path):
    from ovseg_core.evaluation.promotion import ALL_BACKGROUND, background_confusions, promotion_evidence

    make_code_dataset(tmp_path / "data")
    ds = load_dataset("sample", tmp_path / "data")
    settings = {"window": 16, "stride": 8, "short_side": None, **CODE_NORM}
    evidence = promotion_evidence(CodeModel(), ds, {"all_background": ALL_BACKGROUND, "itself": CodeModel()},
                                  n_resamples=200, **settings)
    assert evidence["n_images"] == 2 and evidence["candidate_mIoU"] == pytest.approx(1.0)
    background = evidence["comparisons"]["all_background"]
    # all-background: background IoU = 512 background px / 1,279 valid px, cat and dog 0, car never seen (not scored)
    assert background["mIoU"] == pytest.approx(512 / 1279 / 3)
    assert background["delta"] > 0 and background["low"] > 0  # a perfect model beats it on every resample
    itself = evidence["comparisons"]["itself"]
    assert itself["delta"] == 0 and itself["low"] == itself["high"] == 0  # same predictions: no difference
    stack = background_confusions(ds, None)
    assert stack.shape == (2, 4, 4) and stack[:, :, 1:].sum() == 0  # background predicted everywhere
