"""Side-by-side PNG overlays for eyeballing predictions: image | prediction over image | ground truth over image."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ovseg_core.evaluation.metrics import IGNORE_INDEX


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """(num_colors, 3) uint8 PASCAL VOC colour map (bit-interleaved, class 0 black): distinct neighbouring colours
    and the colours people recognise from VOC figures."""
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    return palette


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _to_rgb_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] == 3:
            image = image.transpose(1, 2, 0)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image or an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
    return image


def blend_labels(
    image: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray,
    *,
    alpha: float = 0.5,
    background_index: int | None = 0,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Colour ``labels`` over ``image``; background and ignored pixels are left as the image (readable overlays)."""
    labels = np.asarray(labels).astype(np.int64)
    colored = palette[np.clip(labels, 0, len(palette) - 1)].astype(np.float32)
    mask = labels != ignore_index
    if background_index is not None:
        mask &= labels != background_index
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * colored[mask]
    return out.round().clip(0, 255).astype(np.uint8)


def save_overlay(
    image: Image.Image | np.ndarray | torch.Tensor,
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    path: str | Path,
    palette: np.ndarray | None = None,
    *,
    alpha: float = 0.5,
    background_index: int | None = 0,
    ignore_index: int = IGNORE_INDEX,
) -> Path:
    """Write ``image | prediction overlay | ground-truth overlay`` as one PNG (atomically) and return its path.

    Args:
        image: the un-normalised RGB image (PIL or (H, W, 3) uint8).
        pred, gt: (H, W) label maps; ``gt`` may contain ``ignore_index``.
        palette: (N, 3) uint8 class colours; default ``voc_palette()``.
        background_index: label left uncoloured (None when the dataset has no background class).
    """
    rgb = _to_rgb_array(image)
    pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    gt = gt.detach().cpu().numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
    if pred.shape != rgb.shape[:2] or gt.shape != rgb.shape[:2]:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must match the image size {rgb.shape[:2]}")
    palette = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    kwargs = {"alpha": alpha, "background_index": background_index, "ignore_index": ignore_index}
    panels = [rgb, blend_labels(rgb, pred, palette, **kwargs), blend_labels(rgb, gt, palette, **kwargs)]
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(panels, axis=1)).save(buffer, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
