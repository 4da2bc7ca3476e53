"""Side-by-side PNG overlays for eyeballing predictions: image | prediction over image | ground truth over image,
with a legend strip below naming the panels and the classes that appear (their colour swatch and name) when class
names are given; `contact_sheet` tiles overlays into one 4 x 4 picture for a report."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from manifests.fileio import write_bytes_atomic
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
    """The project's one atomic write (manifests.fileio): readers never see a half-written file."""
    write_bytes_atomic(path, data)


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


LEGEND_FONT_SIZE = 13
LEGEND_PAD = 4


PANEL_TITLES = ("image", "prediction", "ground truth")


def legend_strip(width: int, entries: list[tuple[str, tuple[int, int, int]]],
                 panel_width: int | None = None) -> np.ndarray:
    """(H, width, 3) uint8 white strip with one ``[swatch] name`` entry per class, flowing left to right and
    wrapping onto further lines. The strip is widened when a single entry does not fit. With `panel_width`, a first
    line names the three panels above it (PANEL_TITLES), centred under each."""
    font = ImageFont.load_default(size=LEGEND_FONT_SIZE)
    swatch = LEGEND_FONT_SIZE
    line_h = swatch + LEGEND_PAD
    sizes = [swatch + LEGEND_PAD + int(font.getlength(name)) + 3 * LEGEND_PAD for name, _ in entries]
    width = max([width, *(s + LEGEND_PAD for s in sizes)])
    top = LEGEND_PAD + (line_h if panel_width else 0)
    positions, x, y = [], LEGEND_PAD, top
    for size in sizes:
        if x + size > width and x > LEGEND_PAD:
            x, y = LEGEND_PAD, y + line_h
        positions.append((x, y))
        x += size
    strip = Image.new("RGB", (width, y + line_h + LEGEND_PAD), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for index, title in enumerate(PANEL_TITLES if panel_width else ()):
        draw.text((index * panel_width + panel_width // 2, LEGEND_PAD + swatch // 2), title, fill=(0, 0, 0),
                  font=font, anchor="mm")
    for (name, colour), (x, y) in zip(entries, positions):
        draw.rectangle((x, y, x + swatch - 1, y + swatch - 1), fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
        draw.text((x + swatch + LEGEND_PAD, y + swatch // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(strip)


def legend_entries(labels: list[np.ndarray], class_names: list[str] | tuple[str, ...], palette: np.ndarray,
                   background_index: int | None, ignore_index: int) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of every class present in any of ``labels``, in class order (background and ignore left out:
    they are not coloured)."""
    present = sorted(set(np.unique(np.concatenate([np.asarray(a).ravel() for a in labels])).tolist()))
    entries = []
    for index in present:
        if index == ignore_index or index == background_index or index < 0:
            continue
        name = class_names[index] if index < len(class_names) else f"class {index}"
        entries.append((name, tuple(int(c) for c in palette[min(index, len(palette) - 1)])))
    return entries


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
    class_names: list[str] | tuple[str, ...] | None = None,
) -> Path:
    """Write ``image | prediction overlay | ground-truth overlay`` as one PNG (atomically) and return its path.

    Args:
        image: the un-normalised RGB image (PIL or (H, W, 3) uint8).
        pred, gt: (H, W) label maps; ``gt`` may contain ``ignore_index``.
        palette: (N, 3) uint8 class colours; default ``voc_palette()``.
        background_index: label left uncoloured (None when the dataset has no background class).
        class_names: names by label index; when given, a legend below the panels names every class present in the
            prediction or the ground truth next to its colour.
    """
    rgb = _to_rgb_array(image)
    pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    gt = gt.detach().cpu().numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
    if pred.shape != rgb.shape[:2] or gt.shape != rgb.shape[:2]:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must match the image size {rgb.shape[:2]}")
    palette = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    kwargs = {"alpha": alpha, "background_index": background_index, "ignore_index": ignore_index}
    panels = [rgb, blend_labels(rgb, pred, palette, **kwargs), blend_labels(rgb, gt, palette, **kwargs)]
    canvas = np.concatenate(panels, axis=1)
    if class_names is not None:
        entries = legend_entries([pred, gt], class_names, palette, background_index, ignore_index)
        strip = legend_strip(canvas.shape[1], entries, panel_width=rgb.shape[1])
        if strip.shape[1] > canvas.shape[1]:  # a long name widens the picture; the panels keep their pixels
            pad = np.full((canvas.shape[0], strip.shape[1] - canvas.shape[1], 3), 255, np.uint8)
            canvas = np.concatenate([canvas, pad], axis=1)
        canvas = np.concatenate([canvas, strip], axis=0)
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def contact_sheet(paths: list[str | Path], out_path: str | Path, columns: int = 4, rows: int = 4,
                  pad: int = 6) -> Path:
    """Tile the first ``columns x rows`` images of ``paths`` (overlays) into one PNG, row by row, on white; cells are
    as large as the largest image, so no picture is scaled. Returns the written path (atomically written)."""
    if not paths:
        raise ValueError("contact_sheet needs at least one image")
    images = []
    for path in list(paths)[: columns * rows]:
        with Image.open(path) as img:
            images.append(np.asarray(img.convert("RGB")))
    cell_h = max(a.shape[0] for a in images) + pad
    cell_w = max(a.shape[1] for a in images) + pad
    used_rows = -(-len(images) // columns)
    sheet = np.full((used_rows * cell_h + pad, min(columns, len(images)) * cell_w + pad, 3), 255, np.uint8)
    for index, array in enumerate(images):
        y, x = pad + (index // columns) * cell_h, pad + (index % columns) * cell_w
        sheet[y : y + array.shape[0], x : x + array.shape[1]] = array
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, format="PNG")
    out = Path(out_path)
    atomic_write_bytes(out, buffer.getvalue())
    return out
