"""Segmentation evaluation sets read from their usual on-disk layouts (no mmseg).

Every layout yields ``SegSample(image_id, image, label)``: an RGB ``PIL.Image`` and an ``(H, W)`` uint8 label map in
the dataset's class order, with 255 = ignore. Layouts (``root`` is the folder you pass; the listed sub-folders are
also tried so both the dataset folder and its parent work):

- ``voc``: PASCAL VOC 2012 (21 classes with background). ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``
  (palette PNG of class indices, 255 = object boundary, ignored), ids from ``ImageSets/Segmentation/<split>.txt``.
  Root may also be the parent of ``VOCdevkit/VOC2012`` or ``VOC2012``.
- ``context``: PASCAL Context, mmseg layout (60 classes: background = 0 + 59). ``VOCdevkit/VOC2010/JPEGImages``,
  ``SegmentationClassContext/<id>.png``, ``ImageSets/SegmentationContext/<split>.txt``.
- ``coco_object``: COCO-Object, GroupViT converter layout (81 classes: background = 0 + 80 things, 255 ignore).
  ``images/<split>2017/<id>.jpg``, ``annotations/<split>2017/<id>_instanceTrainIds.png``; every image is listed.
  (OVSegmentor's config reads ``annotations/val2017_cocoobject``: rename that folder to ``val2017``.)
- ``ade20k``: ADE20K SceneParsing (150 classes, no background). ``ADEChallengeData2016/images/validation/*.jpg``,
  ``annotations/validation/*.png`` where 0 = "other" -> 255 (ignored) and 1..150 -> 0..149 (mmseg
  ``reduce_zero_label``).
- ``sample``: the cc4m sample eval set, the VOC layout plus ``classes.txt`` ("background" then the 73 classes,
  one per line; label i = line i).

A folder that does not match raises ``DatasetLayoutError`` naming the missing file or folder; an id listed in the
split file without its image or label is an error too (never skipped silently).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from ovseg_core.evaluation.metrics import IGNORE_INDEX
from ovseg_core.zero_shot.templates import ADE20K_CLASSES, BACKGROUND, COCO_OBJECT_CLASSES, CONTEXT_CLASSES, VOC_CLASSES


class DatasetLayoutError(FileNotFoundError):
    """The folder does not have the files the chosen layout expects."""


class SegSample(NamedTuple):
    image_id: str
    image: Image.Image
    label: np.ndarray


@dataclass(frozen=True)
class DatasetLayout:
    """Where one dataset family keeps images, labels, the split list and its classes.

    ``image_dir``/``label_dir``/``split_file`` are relative to the resolved dataset root and may contain ``{split}``
    (after ``split_aliases`` is applied). ``classnames=None`` means "read ``classes.txt`` from the root".
    """

    name: str
    root_candidates: tuple[str, ...]
    image_dir: str
    label_dir: str
    split_file: str | None
    classnames: tuple[str, ...] | None
    image_suffix: str = ".jpg"
    label_suffix: str = ".png"
    reduce_zero_label: bool = False
    default_bg_thresh: float = 0.95
    split_aliases: tuple[tuple[str, str], ...] = ()
    classes_file: str | None = None

    def split_name(self, split: str) -> str:
        return dict(self.split_aliases).get(split, split)


DATASET_LAYOUTS: dict[str, DatasetLayout] = {
    layout.name: layout
    for layout in (
        DatasetLayout(
            name="voc",
            root_candidates=("", "VOCdevkit/VOC2012", "VOC2012"),
            image_dir="JPEGImages",
            label_dir="SegmentationClass",
            split_file="ImageSets/Segmentation/{split}.txt",
            classnames=VOC_CLASSES,
            default_bg_thresh=0.95,
        ),
        DatasetLayout(
            name="context",
            root_candidates=("VOCdevkit/VOC2010", "VOC2010", ""),
            image_dir="JPEGImages",
            label_dir="SegmentationClassContext",
            split_file="ImageSets/SegmentationContext/{split}.txt",
            classnames=CONTEXT_CLASSES,
            default_bg_thresh=0.35,
        ),
        DatasetLayout(
            name="coco_object",
            root_candidates=("", "coco"),
            image_dir="images/{split}2017",
            label_dir="annotations/{split}2017",
            split_file=None,
            classnames=COCO_OBJECT_CLASSES,
            label_suffix="_instanceTrainIds.png",
            default_bg_thresh=0.9,
        ),
        DatasetLayout(
            name="ade20k",
            root_candidates=("ADEChallengeData2016", ""),
            image_dir="images/{split}",
            label_dir="annotations/{split}",
            split_file=None,
            classnames=ADE20K_CLASSES,
            reduce_zero_label=True,
            split_aliases=(("val", "validation"), ("train", "training")),
        ),
        DatasetLayout(
            name="sample",
            root_candidates=("",),
            image_dir="JPEGImages",
            label_dir="SegmentationClass",
            split_file="ImageSets/Segmentation/{split}.txt",
            classnames=None,
            classes_file="classes.txt",
        ),
    )
}


def read_label_png(path: Path) -> np.ndarray:
    """Class indices from a single-channel PNG (palette "P" or greyscale "L"); colour masks are rejected because
    their RGB values are not class indices."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(
                f"{path}: label PNG must be single-channel class indices (mode P or L), got mode {img.mode}; "
                "convert colour-coded masks to index PNGs first"
            )
        return np.array(img, dtype=np.uint8)


class SegDataset(Sequence):
    """An evaluation set: ``dataset[i] -> SegSample(image_id, PIL RGB image, (H, W) uint8 labels, 255 = ignore)``."""

    def __init__(
        self,
        layout: DatasetLayout,
        root: Path,
        split: str,
        classnames: tuple[str, ...],
        items: list[tuple[str, Path, Path]],
    ) -> None:
        self.layout = layout
        self.root = root
        self.split = split
        self.classnames = classnames
        self.has_background = classnames[0] == BACKGROUND
        self.items = items

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def default_bg_thresh(self) -> float:
        return self.layout.default_bg_thresh

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> SegSample:  # type: ignore[override]
        image_id, image_path, label_path = self.items[index]
        with Image.open(image_path) as img:
            image = img.convert("RGB")
        label = read_label_png(label_path)
        if label.shape != (image.height, image.width):
            raise ValueError(
                f"{label_path}: label size {label.shape[::-1]} (w, h) != image size {image.size} of {image_path}"
            )
        if self.layout.reduce_zero_label:
            # 0 ("other") -> ignore, 1..K -> 0..K-1; 255 stays ignore (uint8 wrap-around handled explicitly).
            label = np.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label.astype(np.int16) - 1)
            label = label.astype(np.uint8)
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            values = np.unique(label[bad])[:10].tolist()
            raise ValueError(
                f"{label_path}: label values {values} are not classes of the {self.layout.name!r} layout "
                f"(0..{self.num_classes - 1}, {IGNORE_INDEX} = ignore)"
            )
        return SegSample(image_id, image, label)

    def __repr__(self) -> str:
        return f"SegDataset(layout={self.name!r}, root='{self.root}', split={self.split!r}, n={len(self)})"


def _resolve_root(layout: DatasetLayout, root: Path, split: str) -> Path:
    image_dir = layout.image_dir.format(split=layout.split_name(split))
    candidates = [root / sub if sub else root for sub in layout.root_candidates]
    for candidate in candidates:
        if (candidate / image_dir).is_dir():
            return candidate
    looked = ", ".join(str(c / image_dir) for c in candidates)
    raise DatasetLayoutError(
        f"{root} does not match the {layout.name!r} layout: image folder {image_dir!r} not found (looked for {looked})"
    )


def _require(path: Path, what: str, layout: DatasetLayout) -> Path:
    if not path.exists():
        raise DatasetLayoutError(f"{layout.name!r} layout: missing {what} {path}")
    return path


def _read_classes_file(path: Path) -> tuple[str, ...]:
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not names:
        raise ValueError(f"{path}: no class names")
    if names[0] != BACKGROUND:
        raise ValueError(f"{path}: first class must be {BACKGROUND!r} (label 0), got {names[0]!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate class names")
    return names


def _missing_error(layout: DatasetLayout, kind: str, missing: list[Path], total: int) -> DatasetLayoutError:
    shown = ", ".join(str(p) for p in missing[:5])
    return DatasetLayoutError(f"{layout.name!r} layout: {len(missing)} of {total} {kind} missing, e.g. {shown}")


def load_dataset(layout: str, root: str | Path, split: str = "val") -> SegDataset:
    """Open an evaluation set. ``layout`` is a key of ``DATASET_LAYOUTS``; ``split`` e.g. "val"."""
    if layout not in DATASET_LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r}; choose one of {sorted(DATASET_LAYOUTS)}")
    spec = DATASET_LAYOUTS[layout]
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset root {root} is not a directory")
    split_name = spec.split_name(split)
    base = _resolve_root(spec, root, split)
    image_dir = base / spec.image_dir.format(split=split_name)
    label_dir = _require(base / spec.label_dir.format(split=split_name), "label folder", spec)

    if spec.classnames is not None:
        classnames = spec.classnames
    else:
        classnames = _read_classes_file(_require(base / spec.classes_file, "class list", spec))

    if spec.split_file is not None:
        split_path = _require(base / spec.split_file.format(split=split_name), "split list", spec)
        ids = [line.strip() for line in split_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{split_path}: duplicate image ids")
    else:
        ids = sorted(
            p.name[: -len(spec.image_suffix)]
            for p in image_dir.iterdir()
            if p.is_file() and p.name.endswith(spec.image_suffix)
        )
    if not ids:
        raise DatasetLayoutError(f"{spec.name!r} layout: no images for split {split!r} in {image_dir}")

    items = [(i, image_dir / f"{i}{spec.image_suffix}", label_dir / f"{i}{spec.label_suffix}") for i in ids]
    missing_images = [img for _, img, _ in items if not img.is_file()]
    if missing_images:
        raise _missing_error(spec, "images", missing_images, len(items))
    missing_labels = [lab for _, _, lab in items if not lab.is_file()]
    if missing_labels:
        raise _missing_error(spec, "label PNGs", missing_labels, len(items))
    return SegDataset(spec, base, split, classnames, items)
