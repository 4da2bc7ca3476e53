"""Image augmentations, parameterised by image size and chosen by name (a config choice, saved with the run).

- "deit"  (stage 1, the paper): RandomResizedCrop(0.08-1, bicubic) + flip, ColorJitter 0.4, RandAugment m9-mstd0.5
           (the paper's string; DeiT's "-inc1" variant crashes under Pillow >= 13: PosterizeIncreasing at magnitude 10
           asks for 0 bits),
           RandomErasing 0.25 (timm's DeiT recipe via timm.data.create_transform).
- "light" (stage 2, the paper): RandomResizedCrop(0.4-1) + horizontal flip; the partner image gets its own draw.
- "crop"  : RandomResizedCrop(0.4-1) + flip only. Use it for the synthetic sample: there colour IS the class signal,
           and ColorJitter / RandAugment's colour ops (Color, Solarize, Posterize, ...) would destroy it.
- "none"  : the eval transform (resize short side + center crop), for deterministic tests.
All end with ToTensor + ImageNet mean/std normalisation (GroupViT/OVSegmentor convention; the evaluator must match).
JPEG draft decoding (`draft=True`, the default of the random-crop augmentations): the random crop's box is drawn
from the JPEG header's size alone, then the JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still
leaves the box at least as large as the output, and the box is resized from there (PIL `Image.draft`). A 64 px
crop of a 256 px image decodes a quarter or a sixteenth of the pixels. The crop boxes and flips are the same
draws as without draft; the pixels differ slightly, because the DCT scaling pre-filters instead of bicubic alone
(tests/ovseg_core/test_decode.py bounds the difference). `apply_to_jpeg` feeds such transforms the undecoded image.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("deit", "light", "crop", "none")
INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
# The release's string is "rand-m9-mstd0.5-inc1"; its PosterizeIncreasing asks Pillow >= 13 for 0 bits at
# magnitude 10 and crashes, so the non-"inc" variant is used (a listed deviation, docs/training.md).
DEIT_AUTO_AUGMENT = "rand-m9-mstd0.5"

ImageTransform = Callable[[Image.Image], "object"]


def build_eval_transform(image_size: int) -> T.Compose:
    """Resize the short side to image_size/0.875 (DeiT crop ratio) then center-crop image_size."""
    return T.Compose([
        T.Resize(round(image_size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def describe_augment(augment: str, interpolation: str = "bicubic") -> dict[str, object]:
    """What `build_train_transform(…, augment, interpolation)` does, as a JSON-able record (run plans)."""
    if augment == "deit":
        return {"name": "deit", "interpolation": interpolation, "scale": [0.08, 1.0], "color_jitter": 0.4,
                "auto_augment": DEIT_AUTO_AUGMENT, "random_erasing": 0.25, "hflip": 0.5}
    if augment in ("light", "crop"):
        return {"name": augment, "interpolation": interpolation, "scale": [0.4, 1.0], "hflip": 0.5}
    return {"name": augment, "interpolation": "bicubic", "eval_transform": True}


class DraftResizedCrop:
    """A random resized crop (torchvision's RandomResizedCrop or timm's RandomResizedCropAndInterpolation, whose
    draws it reuses) that decodes a not-yet-loaded JPEG at the smallest DCT scale the drawn box allows.

    Given an already decoded image, or when the box needs full resolution, it is exactly the wrapped crop.
    """

    accepts_lazy_jpeg = True

    def __init__(self, crop: Any) -> None:
        self.crop = crop
        self.size = tuple(crop.size) if isinstance(crop.size, (tuple, list)) else (crop.size, crop.size)
        self.interpolation = crop.interpolation
        if isinstance(self.interpolation, (tuple, list)):
            raise TypeError("DraftResizedCrop needs one interpolation mode, not a random choice")

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        out_h, out_w = self.size
        shrink = min(h / out_h, w / out_w)  # how far the box is scaled down anyway
        full_w, full_h = img.size
        if getattr(img, "format", None) == "JPEG" and shrink >= 2:
            img.draft("RGB", (math.ceil(full_w / shrink), math.ceil(full_h / shrink)))
        img = img if img.mode == "RGB" else img.convert("RGB")
        if img.size == (full_w, full_h):
            return TF.resized_crop(img, top, left, h, w, list(self.size), self.interpolation)
        sx, sy = img.size[0] / full_w, img.size[1] / full_h
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        return img.resize((out_w, out_h), _PIL_RESAMPLE[self.interpolation], box=box)

    def __repr__(self) -> str:
        return f"DraftResizedCrop({self.crop!r})"


_PIL_RESAMPLE = {T.InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
                 T.InterpolationMode.BILINEAR: Image.Resampling.BILINEAR}


def with_draft(transform: T.Compose) -> T.Compose:
    """`transform` with its first op (a random resized crop) decoding JPEGs at the scale it needs."""
    first = transform.transforms[0]
    if not hasattr(first, "get_params") or not hasattr(first, "scale"):
        raise ValueError(f"draft decoding needs a random resized crop first, got {first!r}")
    return T.Compose([DraftResizedCrop(first), *transform.transforms[1:]])


ALL_RNGS = ("python", "numpy", "torch")


def global_rngs(transform: Callable) -> tuple[str, ...]:
    """The global RNGs `transform` draws from: torchvision's ops use torch's only; timm's (DeiT: crop, RandAugment,
    RandomErasing) also Python's `random` and numpy's."""
    ops = transform.transforms if isinstance(transform, T.Compose) else [transform]
    ops = [getattr(op, "crop", op) for op in ops]  # DraftResizedCrop draws with the crop it wraps
    if all(type(op).__module__.startswith("torchvision.") for op in ops):
        return ("torch",)
    return ALL_RNGS


def accepts_lazy_jpeg(transform: Callable) -> bool:
    """Whether `transform` takes an undecoded (lazily opened) JPEG and decodes it itself."""
    first = transform.transforms[0] if isinstance(transform, T.Compose) else transform
    return bool(getattr(first, "accepts_lazy_jpeg", False))


def apply_to_jpeg(transform: Callable, data: bytes) -> Any:
    """Run `transform` on the image in `data`: opened lazily for draft-aware transforms, else decoded to RGB."""
    if accepts_lazy_jpeg(transform):
        return transform(Image.open(io.BytesIO(data)))
    with Image.open(io.BytesIO(data)) as im:
        return transform(im.convert("RGB"))


def build_train_transform(image_size: int, augment: str, interpolation: str = "bicubic",
                          draft: bool = True) -> ImageTransform:
    """The training transform named `augment` (see module docstring), resizing with `interpolation`
    ("bicubic", ours; "bilinear", the release's); `draft`: JPEG draft decoding of the random crop."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {interpolation!r}")
    if augment == "none":
        return build_eval_transform(image_size)
    transform = _plain_train_transform(image_size, augment, interpolation)
    return with_draft(transform) if draft else transform


def _plain_train_transform(image_size: int, augment: str, interpolation: str) -> T.Compose:
    if augment == "deit":
        from timm.data import create_transform

        return create_transform(
            input_size=image_size, is_training=True, scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4,
            auto_augment=DEIT_AUTO_AUGMENT, interpolation=interpolation, re_prob=0.25, re_mode="pixel", re_count=1,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
        )
    if augment in ("light", "crop"):
        return T.Compose([
            T.RandomResizedCrop(image_size, scale=(0.4, 1.0), interpolation=INTERPOLATIONS[interpolation]),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
    raise ValueError(f"unknown augmentation {augment!r}; choose one of {AUGMENTATIONS}")
