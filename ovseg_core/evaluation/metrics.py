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

    def update(self, pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> np.ndarray:
        """Add one image (or a batch of same-shape maps): ``pred`` and ``gt`` of equal shape, integer labels.

        Returns this update's own (num_classes, num_classes) counts (per-image matrices for bootstrapping)."""
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
        counts = np.bincount(gt_valid * k + pred_valid, minlength=k * k).reshape(k, k)
        self.matrix += counts
        self.n_images += 1
        return counts

    def compute(self) -> SegmentationScores:
        return scores_of(self.matrix)


def scores_of(matrix: np.ndarray) -> SegmentationScores:
    """Scores of one accumulated (K, K) confusion matrix (rows = ground truth)."""
    tp = np.diag(matrix).astype(np.float64)
    gt_pixels = matrix.sum(axis=1)
    pred_pixels = matrix.sum(axis=0)
    union = gt_pixels + pred_pixels - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    present = ~np.isnan(iou)
    miou = float(iou[present].mean()) if present.any() else float("nan")
    total = matrix.sum()
    pixel_acc = float(tp.sum() / total) if total > 0 else float("nan")
    return SegmentationScores(
        miou=miou, per_class_iou=iou, pixel_acc=pixel_acc, gt_pixels=gt_pixels, pred_pixels=pred_pixels
    )


def paired_bootstrap_miou_delta(per_image_a: np.ndarray, per_image_b: np.ndarray, n_resamples: int = 2000,
                                seed: int = 0, confidence: float = 0.95) -> dict[str, float]:
    """How sure is "A scores a higher mIoU than B on this test set"? Resample the test images with replacement
    (the same draw for both, since they segment the same images), recompute both mIoUs, and report the delta's
    percentile interval.

    Args:
        per_image_a, per_image_b: (N, K, K) per-image confusion matrices of the two predictors, same image order
            (what ``ConfusionMatrix.update`` returns); B may be e.g. an all-background baseline.

    Returns:
        {"delta": mIoU(A) - mIoU(B) on the full set, "low", "high": the interval, "p_not_better": fraction of
        resamples where A does not beat B, "n_images", "n_resamples", "confidence"}.
    """
    a, b = np.asarray(per_image_a), np.asarray(per_image_b)
    if a.shape != b.shape or a.ndim != 3 or a.shape[1] != a.shape[2] or len(a) == 0:
        raise ValueError(f"expected two (N, K, K) per-image confusion stacks of one shape, got {a.shape}, {b.shape}")
    if not 0 < confidence < 1 or n_resamples < 1:
        raise ValueError("need 0 < confidence < 1 and n_resamples >= 1")
    rng = np.random.default_rng(seed)
    n = len(a)
    deltas = np.empty(n_resamples)
    for i in range(n_resamples):
        pick = rng.integers(0, n, size=n)
        deltas[i] = scores_of(a[pick].sum(axis=0)).miou - scores_of(b[pick].sum(axis=0)).miou
    tail = (1 - confidence) / 2 * 100
    return {"delta": scores_of(a.sum(axis=0)).miou - scores_of(b.sum(axis=0)).miou,
            "low": float(np.percentile(deltas, tail)), "high": float(np.percentile(deltas, 100 - tail)),
            "p_not_better": float(np.mean(deltas <= 0)), "n_images": n, "n_resamples": n_resamples,
            "confidence": confidence}


def best_and_worst_classes(per_class: dict[str, float | None], n: int = 5, skip: tuple[str, ...] = ("background",),
                           ) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The `n` highest and `n` lowest (class, IoU) of an evaluation's per-class IoU, best first and worst first;
    classes without a score (None/NaN: absent everywhere) and `skip` (background) are left out. With fewer than
    2n scored classes the two lists share classes."""
    scored = [(name, float(iou)) for name, iou in per_class.items()
              if name not in skip and iou is not None and not np.isnan(iou)]
    ranked = sorted(scored, key=lambda item: (-item[1], item[0]))
    return ranked[:n], ranked[::-1][:n]
