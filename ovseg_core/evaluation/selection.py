"""Choose zero-shot evaluation settings (background threshold, top-k, assignment, test size) on a SELECTION split.

The paper picks checkpoints and bg_thresh on the test set (VOC val). We never do: the embedded sample ships a separate
selection split (`ImageSets/Segmentation/train.txt` of its VOC-layout eval folder), and this module scores candidate
evaluator settings on it; the caller then evaluates the test split (val.txt) once, with the chosen settings.

    choice = select_eval_settings(model, load_dataset("sample", root, split="train"))
    evaluate(model, load_dataset("sample", root, split="val"), **choice["chosen"])
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from ovseg_core.evaluation.evaluate import evaluate
from ovseg_core.numerics import content_key
from ovseg_core.zero_shot.refine import MemoisedPamr

# bg_thresh 0.95 is the VOC protocol value: with 73 classes and a small model every class probability is far below
# it, so the background rule degenerates to "only the most confident group of each crop is foreground"; lower
# values let more groups through. topk None keeps every class (GroupViT's rule for datasets of <= 5 classes): when
# the image-level ranking is weaker than the groups' own scores, restricting to its top k only removes right answers.
# Test sizes: 2x the training size is the paper's convention (224 -> 448); 1.5x lies between a grid fine enough to
# follow object outlines and the training scale the patch features (textures) were learned at.
DEFAULT_CANDIDATES: dict[str, Sequence[Any]] = {
    "bg_thresh": (0.05, 0.1, 0.2, 0.3, 0.5, 0.95),
    "topk": (1, 3, 5, None),
    "assignment": ("hard", "soft"),
    "scale": (1.0, 1.5, 2.0),  # test short side / window = scale x model.image_size (stride = half the window)
    # PAMR (ovseg_core.zero_shot.refine) is not in the paper's protocol: opt in with candidates={"refine": (...)}.
    "refine": ("none",),
}
# The embedded sample's evaluation (the demo and benchmarks/bench_learning.py) also offers PAMR to the selection
# split: its models group 4-px patches, so an object's outline is blurred over a patch, and the toy world's objects
# differ from the background by colour, which PAMR follows (selection split: +0.03 on a colour-affinity checkpoint,
# docs/demo.md "Eighth session").
SAMPLE_CANDIDATES: dict[str, Sequence[Any]] = {"refine": ("none", "pamr")}


def candidate_grid(candidates: dict[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
    """Cartesian product of the candidate values (missing keys take DEFAULT_CANDIDATES)."""
    merged = {**DEFAULT_CANDIDATES, **(candidates or {})}
    unknown = sorted(set(merged) - set(DEFAULT_CANDIDATES))
    if unknown:
        raise ValueError(f"unknown candidate keys {unknown}; known: {sorted(DEFAULT_CANDIDATES)}")
    keys = list(merged)
    return [dict(zip(keys, values)) for values in itertools.product(*(merged[k] for k in keys))]


def evaluator_kwargs(model: nn.Module, setting: dict[str, Any]) -> dict[str, Any]:
    """Turn one candidate (bg_thresh, topk, assignment, scale, refine) into `ovseg_core.evaluation.evaluate` kwargs."""
    size = max(int(model.patch_size), round(float(setting["scale"]) * int(model.image_size)))
    size -= size % int(model.patch_size)
    return {"bg_thresh": float(setting["bg_thresh"]), "topk": setting["topk"], "assignment": setting["assignment"],
            "short_side": size, "window": size, "stride": max(1, size // 2),
            "refine": setting.get("refine", "none")}


class ReusedForwards:
    """Stand-in for a model during one selection sweep: `encode_image` / `encode_text_strings` results are memoised
    by their exact input, everything else is the model's. Candidates that differ only in bg_thresh or topk (applied
    after the forward) then share one forward per crop, which makes the sweep ~10x cheaper. Valid only while the
    model does not change (no training step in between) and stays in eval mode, as during `select_eval_settings`.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._images: dict[tuple, Any] = {}
        self._texts: dict[tuple[str, ...], Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode_image(self, images: Any) -> Any:
        if self._model.training:  # train mode draws Gumbel noise: nothing to reuse
            return self._model.encode_image(images)
        key = content_key(images)
        if key not in self._images:
            self._images[key] = self._model.encode_image(images)
        return self._images[key]

    def encode_text_strings(self, texts: list[str], *args: Any, **kwargs: Any) -> Any:
        if self._model.training or args or kwargs:
            return self._model.encode_text_strings(texts, *args, **kwargs)
        key = tuple(texts)
        if key not in self._texts:
            self._texts[key] = self._model.encode_text_strings(texts)
        return self._texts[key]


class DecodedOnce(Sequence):
    """The first `max_images` samples of an evaluation dataset, decoded once for a whole sweep (every candidate
    reads every image; decoding them again was 7% of the sweep); other attributes are the dataset's."""

    def __init__(self, dataset: Any, max_images: int | None = None) -> None:
        self._dataset = dataset
        count = len(dataset) if max_images is None else min(max_images, len(dataset))
        self._samples = [dataset[index] for index in range(count)]

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Any:
        return self._samples[index]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dataset, name)


def select_eval_settings(model: nn.Module, selection_dataset: Any,
                         candidates: dict[str, Sequence[Any]] | None = None,
                         max_images: int | None = None, **evaluate_kwargs: Any) -> dict[str, Any]:
    """Score every candidate setting on `selection_dataset` and return the best (highest mIoU; ties -> the earlier,
    i.e. the paper-like order of DEFAULT_CANDIDATES).

    Args:
        model: the (trained) model, any mode (evaluation switches to eval mode itself).
        selection_dataset: an `ovseg_core.evaluation` dataset that is NOT the test split (sample: split="train").
        candidates: {"bg_thresh": [...], "topk": [...], "assignment": [...], "scale": [...], "refine": [...]}
            overrides.
        max_images: score only the first N selection images.
        **evaluate_kwargs: passed to every `evaluate` call (e.g. templates, mean/std).

    Returns:
        {"chosen": evaluate() kwargs, "chosen_candidate": the candidate, "selection_mIoU": float,
         "split": dataset split, "n_candidates": int, "scores": [{**candidate, "mIoU": ...}] in grid order,
         "seconds": float, "pamr_channels_refined": int (score channels PAMR refined, after memoisation)}
    """
    if getattr(selection_dataset, "split", None) == "val":
        raise ValueError("select_eval_settings got the 'val' split: settings must be chosen on the selection split")
    started = time.perf_counter()
    grid = candidate_grid(candidates)
    reused, refiner = ReusedForwards(model), MemoisedPamr()
    selection_dataset = DecodedOnce(selection_dataset, max_images)
    results: dict[int, dict[str, Any]] = {}
    for block in _forward_blocks(grid):
        refiner.clear()  # a block's PAMR channels are never reused by the next block: bound the memory
        for index in block:
            res = evaluate(reused, selection_dataset, max_images=max_images, n_overlays=0, refiner=refiner,
                           **{**evaluate_kwargs, **evaluator_kwargs(model, grid[index])})
            results[index] = {**grid[index], "mIoU": res["mIoU"], "pixel_acc": res["pixel_acc"]}
    scores = [results[i] for i in range(len(grid))]
    # Ties go to the earlier candidate in grid order (the paper-like order of DEFAULT_CANDIDATES).
    best = max(range(len(grid)), key=lambda i: (_or_minus_inf(scores[i]["mIoU"]), -i))
    return {"chosen": evaluator_kwargs(model, grid[best]), "chosen_candidate": grid[best],
            "selection_mIoU": _or_minus_inf(scores[best]["mIoU"]), "split": getattr(selection_dataset, "split", None),
            "n_candidates": len(scores), "scores": scores, "seconds": round(time.perf_counter() - started, 2),
            "pamr_channels_refined": refiner.channels_refined}


def _forward_blocks(grid: list[dict[str, Any]]) -> list[list[int]]:
    """Grid indices grouped by the settings that change the forward and its refinement (assignment, scale, refine):
    within a block only bg_thresh / top-k differ, so the block's candidates share their forwards and PAMR channels."""
    blocks: dict[tuple, list[int]] = {}
    for index, cand in enumerate(grid):
        blocks.setdefault((cand["assignment"], cand["scale"], cand.get("refine", "none")), []).append(index)
    return list(blocks.values())


def _or_minus_inf(miou: float | None) -> float:
    return float("-inf") if miou is None else miou
