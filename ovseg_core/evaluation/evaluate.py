"""Zero-shot segmentation evaluation: run ``ZeroShotSegmenter`` over a ``SegDataset`` and score it (mIoU).

Also the ``cc4m eval`` command (``add_eval_arguments`` / ``cli_eval``), wired by the lead in flows/cli.py.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from manifests.version import code_version
from ovseg_core.evaluation.datasets import DATASET_LAYOUTS, DatasetLayoutError, SegDataset, load_dataset
from ovseg_core.evaluation.metrics import ConfusionMatrix
from ovseg_core.evaluation.overlay import atomic_write_bytes, save_overlay, voc_palette
from ovseg_core.zero_shot.segment import ZeroShotSegmenter
from ovseg_core.zero_shot.templates import SEGMENTATION_TEMPLATES, TEMPLATE_SETS, get_templates

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
        model,
        dataset.classnames,
        templates,
        bg_thresh=bg_thresh,
        topk=topk,
        window=window,
        stride=stride if window is not None else None,
        short_side=short_side,
        max_long_side=max_long_side,
        assignment=assignment,
        has_background=dataset.has_background,
    )
    n_images = len(dataset) if max_images is None else min(max_images, len(dataset))
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


# ---------------------------------------------------------------- CLI: cc4m eval


def protocol_sizes(image_size: int) -> dict[str, int]:
    """The paper's test sizes relative to the training resolution: a 224-px model is evaluated with short side 448
    and 448-px windows every 224 px (GroupViT/OVSegmentor), so a 64-px CPU model gets 128 / 128 / 64."""
    return {"short_side": 2 * image_size, "window": 2 * image_size, "stride": image_size}


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``cc4m eval``. Size-like flags take 0 to mean "off"."""
    p.add_argument("--checkpoint", required=True, help="model checkpoint (ovseg_core.train.checkpoint format)")
    p.add_argument("--dataset-layout", required=True, choices=sorted(DATASET_LAYOUTS))
    p.add_argument("--data-root", required=True, help="dataset folder in the chosen layout")
    p.add_argument("--split", default="val")
    p.add_argument("--out", default=None, help="write metrics.json, per_class_iou.csv and overlays/ here")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument(
        "--templates",
        default="single",
        choices=sorted(TEMPLATE_SETS),
        help="prompt set; the paper uses 'single' (\"a photo of a {}.\") for segmentation",
    )
    p.add_argument("--bg-thresh", type=float, default=None, help="default: the dataset's protocol value")
    p.add_argument("--topk", type=int, default=5, help="classes kept by the image-level ranking; 0 = all")
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="sliding-window size; 0 = whole image in one pass; default 2 x the model's image size",
    )
    p.add_argument("--stride", type=int, default=None, help="window stride; default the model's image size")
    p.add_argument(
        "--short-side",
        type=int,
        default=None,
        help="resize the short side first; 0 = keep size; default 2 x the model's image size",
    )
    p.add_argument(
        "--assignment",
        choices=["hard", "soft"],
        default="hard",
        help="hard = argmax group per pixel (paper); soft = weight groups by soft assignment",
    )
    p.add_argument("--n-overlays", type=int, default=4)
    p.add_argument("--device", default=None, help="e.g. cpu or cuda; default: where the checkpoint loads")


def _load_model(checkpoint: str) -> nn.Module:
    # Imported lazily: the trainer package is heavier and evaluation must import without it.
    from ovseg_core.train.checkpoint import load_model_from_checkpoint

    return load_model_from_checkpoint(checkpoint)


def cli_eval(args: argparse.Namespace) -> int:
    """``cc4m eval``: load a checkpoint, evaluate it on one dataset, print mIoU; 0 on success, 2 on bad input."""
    try:
        dataset = load_dataset(args.dataset_layout, args.data_root, split=args.split)
    except (DatasetLayoutError, ValueError) as err:
        print(f"cc4m eval: {err}", file=sys.stderr)
        return 2
    if not Path(args.checkpoint).is_file():
        print(f"cc4m eval: checkpoint not found: {args.checkpoint}", file=sys.stderr)
        return 2
    model = _load_model(args.checkpoint)
    auto = protocol_sizes(int(model.image_size))
    window = auto["window"] if args.window is None else (args.window or None)
    stride = auto["stride"] if args.stride is None else args.stride
    short_side = auto["short_side"] if args.short_side is None else (args.short_side or None)
    out = Path(args.out) if args.out else None
    result = evaluate(
        model,
        dataset,
        templates=get_templates(args.templates),
        bg_thresh=args.bg_thresh,
        topk=args.topk or None,
        window=window,
        stride=min(stride, window) if window else None,
        short_side=short_side,
        assignment=args.assignment,
        max_images=args.max_images,
        out_dir=out,
        n_overlays=args.n_overlays,
        device=args.device,
    )
    result["checkpoint"] = str(args.checkpoint)
    if out is not None:
        atomic_write_bytes(out / METRICS_FILE, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    miou = result["mIoU"]
    print(
        f"{dataset.name} {args.split}: mIoU {miou * 100:.2f} over {result['n_images']} images "
        f"({result['n_classes_scored']} classes scored), pixel acc {result['pixel_acc'] * 100:.2f}"
        if miou is not None
        else f"{dataset.name}: no class could be scored"
    )
    for name, iou in result["per_class"].items():
        print(f"  {name:<24} {'-' if iou is None else f'{iou * 100:.2f}'}")
    if out is not None:
        print(f"wrote {out / METRICS_FILE}")
    return 0
