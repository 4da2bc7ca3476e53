"""Zero-shot segmentation evaluation: run ``ZeroShotSegmenter`` over a ``SegDataset`` and score it (mIoU).

The ``cc4m eval`` command is ovseg_core.evaluation.cli.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from manifests.version import code_version
from ovseg_core.evaluation.datasets import SegDataset
from ovseg_core.evaluation.metrics import ConfusionMatrix
from ovseg_core.evaluation.overlay import atomic_write_bytes, save_overlay, voc_palette
from ovseg_core.zero_shot.classifier import eval_mode
from ovseg_core.zero_shot.segment import ZeroShotSegmenter
from ovseg_core.zero_shot.templates import SEGMENTATION_TEMPLATES

logger = logging.getLogger(__name__)

# DINO / ImageNet statistics (GroupViT's mmseg img_norm_cfg, divided by 255).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class_iou.csv"


def image_to_tensor(
    image: Image.Image, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32, scaled to [0, 1] then normalised with ``mean``/``std``."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (tensor - mean_t) / std_t


def _nan_to_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def evaluate(
    model: nn.Module,
    dataset: SegDataset,
    *,
    templates: Sequence[str] = SEGMENTATION_TEMPLATES,
    bg_thresh: float | None = None,
    topk: int | None = 5,
    window: int | None = 448,
    stride: int | None = 224,
    short_side: int | None = 448,
    max_long_side: int | None = 2048,
    assignment: str = "hard",
    refine: str = "none",
    refiner: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    max_images: int | None = None,
    out_dir: str | Path | None = None,
    overlay_dir: str | Path | None = None,
    n_overlays: int = 4,
    device: str | torch.device | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    per_image_confusion: list[np.ndarray] | None = None,
) -> dict:
    """Zero-shot mIoU of ``model`` on ``dataset`` (defaults: the paper's protocol, short side 448, 448/224 slide).

    Args:
        bg_thresh: background threshold; None uses the dataset's protocol value (VOC 0.95, Context 0.35,
            COCO-Object 0.9; unused without a background class).
        max_images: evaluate only the first N images (None = all).
        out_dir: when given, write ``metrics.json`` (the returned dict) and ``per_class_iou.csv`` there.
        overlay_dir: where to write ``image | prediction | ground truth`` PNGs of the first ``n_overlays`` images;
            default ``<out_dir>/overlays`` when ``out_dir`` is given, else none are written. ``n_overlays=0``: none.
        device: move the model there first; None keeps it where it is (safe to call mid-training).
        mean, std: the normalisation the model was trained with.
        per_image_confusion: when a list is given, each image's (K, K) confusion matrix is appended to it, in
            dataset order (for paired bootstrap intervals, ``metrics.paired_bootstrap_miou_delta``).
        Other arguments: see ``ZeroShotSegmenter``.

    Returns:
        JSON-able dict: ``mIoU``, ``pixel_acc`` (fractions in [0, 1]; None if nothing could be scored),
        ``per_class`` {class: IoU, or None when the class is absent from both ground truth and predictions and so
        excluded from the mean}, ``n_classes_scored``, ``n_images``, ``settings``, ``dataset``, ``code_version``,
        ``seconds``, ``overlays`` (PNG paths), ``outputs`` (metrics.json / per_class_iou.csv paths).
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    if n_overlays < 0:
        raise ValueError(f"n_overlays must be >= 0, got {n_overlays}")
    if device is not None:
        model.to(device)
    bg_thresh = dataset.default_bg_thresh if bg_thresh is None else bg_thresh
    if overlay_dir is None and out_dir is not None:
        overlay_dir = Path(out_dir) / "overlays"
    started = time.perf_counter()
    segmenter = ZeroShotSegmenter(
        model, dataset.classnames, templates, bg_thresh=bg_thresh, topk=topk, window=window,
        stride=stride if window is not None else None, short_side=short_side, max_long_side=max_long_side,
        assignment=assignment, has_background=dataset.has_background, refine=refine, refiner=refiner,
    )
    n_images = len(dataset) if max_images is None else min(max_images, len(dataset))
    with eval_mode(model):  # once for the whole set, not per image (mid-training calls get their mode back)
        matrix, overlays = _score_images(segmenter, dataset, n_images, mean, std, _model_device(model),
                                         overlay_dir, n_overlays, per_image_confusion)
    scores = matrix.compute()
    result = _result(dataset, n_images, scores, {**segmenter.settings(), "mean": list(mean), "std": list(std),
                                                 "max_images": max_images}, time.perf_counter() - started, overlays)
    if out_dir is not None:
        out = Path(out_dir)
        result["outputs"]["metrics"] = str(out / METRICS_FILE)
        result["outputs"]["per_class_iou"] = str(out / PER_CLASS_FILE)
        _write_per_class_csv(out / PER_CLASS_FILE, dataset.classnames, scores)
        atomic_write_bytes(out / METRICS_FILE, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return result


def _result(dataset: SegDataset, n_images: int, scores, settings: dict[str, object], seconds: float,
            overlays: list[str]) -> dict:
    """The JSON-able result of `evaluate` (its docstring lists the keys); `outputs` is filled by the caller."""
    return {
        "dataset": {
            "layout": dataset.name,
            "root": str(dataset.root),
            "split": dataset.split,
            "num_classes": dataset.num_classes,
            "size": len(dataset),
        },
        "n_images": n_images,
        "mIoU": _nan_to_none(scores.miou),
        "pixel_acc": _nan_to_none(scores.pixel_acc),
        "per_class": {name: _nan_to_none(v) for name, v in zip(dataset.classnames, scores.per_class_iou)},
        "n_classes_scored": int(np.count_nonzero(~np.isnan(scores.per_class_iou))),
        "settings": settings,
        "code_version": code_version(),
        "seconds": round(seconds, 3),
        "overlays": overlays,
        "outputs": {},
    }


def _score_images(segmenter: ZeroShotSegmenter, dataset: SegDataset, n_images: int, mean: Sequence[float],
                  std: Sequence[float], device: torch.device, overlay_dir: str | Path | None, n_overlays: int,
                  per_image_confusion: list[np.ndarray] | None) -> tuple[ConfusionMatrix, list[str]]:
    """Predict the first `n_images` images into one confusion matrix; overlays of the first `n_overlays`."""
    matrix = ConfusionMatrix(dataset.num_classes)
    palette = voc_palette()
    overlays: list[str] = []
    for index in range(n_images):
        sample = dataset[index]
        pred = segmenter.predict(image_to_tensor(sample.image, mean, std).to(device))
        counts = matrix.update(pred, sample.label)
        if per_image_confusion is not None:
            per_image_confusion.append(counts)
        if overlay_dir is not None and index < n_overlays:
            safe_id = sample.image_id.replace("/", "_")
            path = save_overlay(
                sample.image,
                pred,
                sample.label,
                Path(overlay_dir) / f"{index:04d}_{safe_id}.png",
                palette,
                background_index=0 if dataset.has_background else None,
                class_names=dataset.classnames,
            )
            overlays.append(str(path))
        if (index + 1) % 50 == 0:
            logger.info("evaluated %d/%d images of %s", index + 1, n_images, dataset.name)
    return matrix, overlays


def _write_per_class_csv(path: Path, classnames: Sequence[str], scores) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class_index", "class", "iou", "gt_pixels", "pred_pixels"])
    for index, name in enumerate(classnames):
        iou = scores.per_class_iou[index]
        writer.writerow(
            [
                index,
                name,
                "" if math.isnan(iou) else f"{iou:.6f}",
                int(scores.gt_pixels[index]),
                int(scores.pred_pixels[index]),
            ]
        )
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def protocol_sizes(image_size: int) -> dict[str, int]:
    """The paper's test sizes relative to the training resolution: a 224-px model is evaluated with short side 448
    and 448-px windows every 224 px (GroupViT/OVSegmentor), so a 64-px CPU model gets 128 / 128 / 64."""
    return {"short_side": 2 * image_size, "window": 2 * image_size, "stride": image_size}
