"""Confusion-matrix segmentation metrics (mIoU, per-class IoU, pixel accuracy), accumulated image by image.

Conventions (same as mmseg's ``mean_iou``):
- pixels whose ground truth is ``ignore_index`` (255) are left out entirely, whatever was predicted there;
- IoU_c = TP / (TP + FP + FN); a class that appears neither in the ground truth nor in the predictions of any
  evaluated image has 0 / 0 = NaN and is excluded from the mean (a class that is predicted but never present
  has IoU 0 and does count);
- pixel accuracy = correctly labelled pixels / non-ignored pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = 255


def _as_int_array(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(np.int64, copy=False)


@dataclass(frozen=True)
class SegmentationScores:
    """Result of ``ConfusionMatrix.compute()``: ``per_class_iou`` holds NaN for classes absent everywhere."""

    miou: float
    per_class_iou: np.ndarray
    pixel_acc: float
    gt_pixels: np.ndarray
    pred_pixels: np.ndarray


class ConfusionMatrix:
    """Streaming (num_classes x num_classes) confusion matrix: rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class index (num_classes={num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.n_images = 0

    def update(self, pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> None:
        """Add one image (or a batch of same-shape maps): ``pred`` and ``gt`` of equal shape, integer labels."""
        pred, gt = _as_int_array(pred), _as_int_array(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
        valid = gt != self.ignore_index
        gt_valid, pred_valid = gt[valid], pred[valid]
        k = self.num_classes
        if gt_valid.size and (gt_valid.min() < 0 or gt_valid.max() >= k):
            bad = np.unique(gt_valid[(gt_valid < 0) | (gt_valid >= k)])
            raise ValueError(f"ground-truth labels {bad[:10].tolist()} outside [0, {k}) and not {self.ignore_index}")
        if pred_valid.size and (pred_valid.min() < 0 or pred_valid.max() >= k):
            bad = np.unique(pred_valid[(pred_valid < 0) | (pred_valid >= k)])
            raise ValueError(f"predicted labels {bad[:10].tolist()} outside [0, {k})")
        self.matrix += np.bincount(gt_valid * k + pred_valid, minlength=k * k).reshape(k, k)
        self.n_images += 1

    def compute(self) -> SegmentationScores:
        tp = np.diag(self.matrix).astype(np.float64)
        gt_pixels = self.matrix.sum(axis=1)
        pred_pixels = self.matrix.sum(axis=0)
        union = gt_pixels + pred_pixels - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
        present = ~np.isnan(iou)
        miou = float(iou[present].mean()) if present.any() else float("nan")
        total = self.matrix.sum()
        pixel_acc = float(tp.sum() / total) if total > 0 else float("nan")
        return SegmentationScores(
            miou=miou, per_class_iou=iou, pixel_acc=pixel_acc, gt_pixels=gt_pixels, pred_pixels=pred_pixels
        )
