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
"""
from __future__ import annotations

from collections.abc import Callable

from PIL import Image
from torchvision import transforms as T

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


def build_train_transform(image_size: int, augment: str, interpolation: str = "bicubic") -> ImageTransform:
    """The training transform named `augment` (see module docstring), resizing with `interpolation`
    ("bicubic", ours; "bilinear", the release's)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {interpolation!r}")
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
    if augment == "none":
        return build_eval_transform(image_size)
    raise ValueError(f"unknown augmentation {augment!r}; choose one of {AUGMENTATIONS}")
