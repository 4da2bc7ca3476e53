"""Decode and augment on the training device: the loader ships JPEG bytes, crop boxes and token ids; the GPU decodes.

Why: a loader core decodes and crops a few hundred images per second, and one H100 at 40% MFU trains `vit_b` on
thousands: PIL decode on the CPU needs 16-60 cores per GPU. Here the CPU does only what is cheap per sample
(reading the shard, the JPEG header, the random draws, batched tokenization) and the device decodes the batch
with `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA; libjpeg-turbo with device="cpu").

CPU side (`SampleProcessor(device_decode=True)`): per image a uint8 tensor of the JPEG bytes ("jpeg") and a crop
row ("crop": top, left, height, width, flip, out_h, out_w). The box and the flip are the SAME draws as the PIL
path's (`RandomResizedCrop.get_params` on the header's size, then `torch.rand(1) < 0.5`, under the same per-sample
seed), so both paths see the same crops.
Device side (`decode_on_device`): decode -> crop + bicubic antialiased resize (uint8, like PIL) -> flip -> float,
ImageNet normalisation, batched.

Augmentations: "light" and "crop" (crop + flip) run entirely on the device. DeiT's ColorJitter, RandAugment and
RandomErasing work on PIL images with per-op Python draws: they stay on the CPU path (`device_decode` refuses
"deit"; stage 1 with DeiT augmentation decodes on the CPU, with JPEG draft decoding).
Differences from the PIL path (tests/ovseg_core/test_decode.py checks the bound): the JPEG decoder's IDCT and
chroma upsampling (libjpeg-turbo's fancy upsampling in both on CPU; nvJPEG differs by a few levels) and
torchvision's tensor bicubic vs PIL's (both antialiased; edge handling and rounding differ by a level or two).
"""
from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from ovseg_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CROP_COLUMNS = ("top", "left", "height", "width", "flip", "out_h", "out_w")
# batch keys: (bytes key, crop key, image key it becomes)
DEVICE_IMAGE_KEYS = (("jpeg", "crop", "image"), ("partner_jpeg", "partner_crop", "partner_image"))


def crop_draw(transform: Any, jpeg: bytes) -> torch.Tensor:
    """The crop row of one image: the random resized crop's box and the flip, drawn like the PIL path draws them.

    `transform` is a training transform of ovseg_core.data.transforms ("light"/"crop"): a random resized crop
    (possibly draft-wrapped), then a horizontal flip. Call it under the sample's seeded RNG.
    """
    crop, flip = _crop_and_flip(transform)
    width, height = jpeg_size(jpeg)
    # torchvision's get_params reads only the size: a zero-stride view stands in for the image
    top, left, h, w = crop.get_params(torch.empty(1, 1, 1).expand(3, height, width), crop.scale, crop.ratio)
    flipped = bool(torch.rand(1) < flip.p)
    size = crop.size if isinstance(crop.size, (tuple, list)) else (crop.size, crop.size)
    return torch.tensor([top, left, h, w, int(flipped), size[0], size[1]], dtype=torch.long)


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT/JPG/DAC)


def jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG's start-of-frame segment, scanning only the marker headers (PIL's
    Image.open parses every table and costs ~10x more); anything unusual goes through PIL, which names the fault."""
    pos, end = 2, len(jpeg)
    while jpeg[:2] == b"\xff\xd8" and pos + 9 <= end and jpeg[pos] == 0xFF:
        marker = jpeg[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _SOF_MARKERS:
            return int.from_bytes(jpeg[pos + 7:pos + 9], "big"), int.from_bytes(jpeg[pos + 5:pos + 7], "big")
        pos += 2 + int.from_bytes(jpeg[pos + 2:pos + 4], "big")
    with Image.open(io.BytesIO(jpeg)) as im:
        return im.size


def _crop_and_flip(transform: Any) -> tuple[Any, Any]:
    ops = list(getattr(transform, "transforms", ()))
    names = [type(op).__name__ for op in ops]
    if any(n in ("RandAugment", "ColorJitter", "RandomErasing") for n in names) or any(
            "Augment" in n for n in names):
        raise ValueError("device decoding supports the crop/light augmentations; DeiT's ColorJitter, RandAugment "
                         "and RandomErasing run on PIL images on the CPU (use the CPU decode path for them)")
    crop = getattr(ops[0], "crop", ops[0]) if ops else None  # unwrap DraftResizedCrop
    if crop is None or not type(crop).__module__.startswith("torchvision.") or len(ops) < 2:
        raise ValueError(f"device decoding needs a random resized crop and a flip, got {names}")
    if type(ops[1]).__name__ != "RandomHorizontalFlip":
        raise ValueError(f"device decoding needs a horizontal flip after the crop, got {names}")
    return crop, ops[1]


def jpeg_tensor(jpeg: bytes) -> torch.Tensor:
    """The JPEG bytes as a 1-D uint8 tensor (what decode_jpeg takes; one copy, out of the read buffer)."""
    return torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)


def decode_crops(jpegs: list[torch.Tensor], crops: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Decode N JPEGs on `device`, crop + resize + flip each by its crop row -> (N, 3, out_h, out_w) normalised."""
    images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    rows = crops.tolist()
    out = []
    for image, (top, left, h, w, flip, out_h, out_w) in zip(images, rows, strict=True):
        x = F2.resized_crop(image, top, left, h, w, [out_h, out_w], interpolation=InterpolationMode.BICUBIC,
                            antialias=True)
        out.append(x.flip(-1) if flip else x)
    batch = torch.stack(out).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return batch.sub_(mean).div_(std)


def decode_on_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Replace every (jpeg list, crop rows) pair of a collated batch by its decoded image batch on `device`.

    Rows whose partner is missing (partner_valid False) get a zero partner image, as on the PIL path. A batch
    without JPEG keys (CPU decode) is returned unchanged.
    """
    out = dict(batch)
    for bytes_key, crop_key, image_key in DEVICE_IMAGE_KEYS:
        if bytes_key not in out:
            continue
        images = decode_crops(out.pop(bytes_key), out.pop(crop_key), device)
        if image_key == "partner_image" and "partner_valid" in out:
            valid = out["partner_valid"].to(images.device).view(-1, 1, 1, 1)
            images = torch.where(valid, images, torch.zeros_like(images))
        out[image_key] = images
    return out
