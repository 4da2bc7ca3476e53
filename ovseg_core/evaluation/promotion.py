"""Evidence for promoting a retrained model: paired bootstrap intervals of its validation mIoU against the champion
and two trivial baselines (all-background, the untrained model), over the validation images.

Each predictor segments the same images; per image we keep its confusion matrix, and
`metrics.paired_bootstrap_miou_delta` resamples images (the same draw for both sides) to give the interval of
"candidate mIoU - other mIoU". The gate (manifests.registry.decide_with_evidence) promotes only when every lower
bound is above 0: 80 images cannot tell 0.0333 from 0.0349, and a model below all-background is no model.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ovseg_core.evaluation.datasets import SegDataset
from ovseg_core.evaluation.evaluate import evaluate
from ovseg_core.evaluation.metrics import ConfusionMatrix, paired_bootstrap_miou_delta, scores_of
from ovseg_core.models._factory import create_model
from ovseg_core.models.checkpoint import load_checkpoint, recorded_model

ALL_BACKGROUND = "all_background"
UNTRAINED = "untrained"
CHAMPION = "champion"


def per_image_confusions(model: nn.Module, dataset: SegDataset, max_images: int | None,
                         **settings: Any) -> np.ndarray:
    """(N, K, K) confusion matrices of `model` on the first `max_images` images (evaluate's protocol `settings`)."""
    stack: list[np.ndarray] = []
    evaluate(model, dataset, max_images=max_images, n_overlays=0, per_image_confusion=stack, **settings)
    return np.stack(stack)


def background_confusions(dataset: SegDataset, max_images: int | None) -> np.ndarray:
    """(N, K, K) confusion matrices of predicting background (class 0) everywhere."""
    if not dataset.has_background:
        raise ValueError(f"{dataset.name} has no background class: the all-background baseline does not apply")
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    matrix = ConfusionMatrix(dataset.num_classes)
    out = []
    for index in range(n):
        label = np.asarray(dataset[index].label)
        out.append(matrix.update(np.zeros_like(label), label))
    return np.stack(out)


def untrained_like(checkpoint: str, seed: int = 0) -> nn.Module:
    """The checkpoint's architecture at its initialisation (seeded), in eval mode: the "no training" baseline."""
    name, cfg = recorded_model(load_checkpoint(checkpoint), checkpoint)
    torch.manual_seed(seed)
    return create_model(name, **cfg).eval()


def promotion_evidence(candidate: nn.Module, dataset: SegDataset, others: dict[str, nn.Module | str],
                       max_images: int | None = None, n_resamples: int = 2000, seed: int = 0,
                       **settings: Any) -> dict[str, Any]:
    """{"candidate_mIoU", "n_images", "comparisons": {name: {"mIoU", "delta", "low", "high", ...}}}.

    others: {name: model, or ALL_BACKGROUND for the all-background predictor}; every predictor is scored on the
    same images with the same settings.
    """
    mine = per_image_confusions(candidate, dataset, max_images, **settings)
    comparisons = {}
    for name, other in others.items():
        theirs = (background_confusions(dataset, max_images) if other == ALL_BACKGROUND
                  else per_image_confusions(other, dataset, max_images, **settings))
        interval = paired_bootstrap_miou_delta(mine, theirs, n_resamples=n_resamples, seed=seed)
        comparisons[name] = {"mIoU": float(scores_of(theirs.sum(axis=0)).miou), **interval}
    return {"candidate_mIoU": float(scores_of(mine.sum(axis=0)).miou), "n_images": len(mine),
            "dataset": f"{dataset.name}:{dataset.split}", "comparisons": comparisons}
