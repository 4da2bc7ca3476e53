"""Deterministic synthetic images with ground-truth masks: one object per class, each class with its own look.

A class's look is (shape family, colour, texture). With 10 shapes x 8 colours every one of the 73 classes gets a
unique (shape, colour) pair, so a model that sees colour + shape can tell any two classes apart; the texture
(solid, stripes, dots) is a third cue. Objects sit on a noisy, low-saturation background so that "background" is
learnable too and no class colour appears in it.

Mask values: 0 = background, i + 1 = vocabulary.classes[i], 255 = ignore (a 1-pixel ring on object edges, where
JPEG blur makes the label ambiguous).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

from manifests.vocabulary import load_vocabulary

MAX_OBJECTS = 3
IGNORE_LABEL = 255
# Bump when the rendering changes: it is part of the sample's done-marker hash, so old samples get rebuilt.
RENDER_VERSION = "render-v1"
# The training images' scene rule (make_sample): each caption class drawn once, at the sizes of an image with as
# many objects as an eval image would hold (1-3, uniform), so training objects have the eval objects' sizes.
# scenes-v2 filled the remaining places with more instances of the caption's classes; v3 leaves them empty, since
# an eval image never repeats a class and the unclaimed-group term (ovseg_core) treats a repeat as background.
# Part of the sample's done-marker; eval images never take this path, so their renders stay render-v1's.
TRAIN_SCENE_VERSION = "scenes-v3"

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "hourglass",
    "star",
    "cross",
    "ring",
    "ellipse",
    "crescent",
)
# Saturated colours far from each other and from the grey background.
COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 35),  # red
    (20, 180, 40),  # green
    (30, 70, 230),  # blue
    (250, 220, 20),  # yellow
    (230, 30, 220),  # magenta
    (20, 220, 230),  # cyan
    (250, 130, 10),  # orange
    (120, 20, 160),  # purple
)
TEXTURES: tuple[str, ...] = ("solid", "stripes", "dots")


@dataclass(frozen=True)
class ClassLook:
    shape: str
    colour: tuple[int, int, int]
    texture: str


@dataclass(frozen=True)
class RenderedSample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) uint8: 0 background, i+1 class i, 255 ignore
    classes: tuple[str, ...]  # classes actually drawn (<= MAX_OBJECTS), in drawing order


@cache
def _classes(vocabulary: str = "v1") -> tuple[str, ...]:
    return load_vocabulary(vocabulary).classes


def class_look(class_index: int) -> ClassLook:
    """Look of vocabulary.classes[class_index]: (shape, colour) pairs are unique for indices 0..79."""
    if not 0 <= class_index < len(SHAPES) * len(COLOURS):
        raise ValueError(f"class index {class_index} out of range for {len(SHAPES) * len(COLOURS)} looks")
    shape_id = class_index % len(SHAPES)
    group = class_index // len(SHAPES)
    # For a fixed shape, the colour is a bijection of `group`, so (shape, colour) never repeats.
    colour_id = (group + shape_id) % len(COLOURS)
    texture_id = (group + 2 * shape_id) % len(TEXTURES)
    return ClassLook(SHAPES[shape_id], COLOURS[colour_id], TEXTURES[texture_id])


def class_palette(n_classes: int | None = None) -> list[int]:
    """VOC-style palette (bit-interleaved colour map) as a flat list of 768 ints for PIL P-mode images.

    Index 255 (ignore) is set to VOC's off-white (224, 224, 192) as in the PASCAL VOC ground truth.
    `n_classes` is accepted for symmetry with other palettes; all 256 entries are always returned.
    """
    del n_classes
    palette: list[int] = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette.extend((r, g, b))
    palette[255 * 3 : 256 * 3] = [224, 224, 192]
    return palette


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape on normalized coordinates (u right, v down; the shape fits in the unit disc)."""
    rho = np.hypot(u, v)
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return rho <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.8
    if shape == "triangle":  # apex up
        return (v <= 0.75) & (v >= -0.95 + 2.0 * au)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "hourglass":  # two triangles meeting at the centre: nothing round about it
        return (au <= av + 0.08) & (av <= 0.9)
    if shape == "star":
        theta = np.arctan2(v, u) + math.pi / 2
        return rho <= 0.55 + 0.45 * np.abs(np.cos(2.5 * theta))
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "ring":
        return (rho <= 1.0) & (rho >= 0.55)
    if shape == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.5) ** 2 <= 1.0
    if shape == "crescent":
        return (rho <= 1.0) & (np.hypot(u - 0.5, v + 0.1) > 0.75)
    raise ValueError(f"unknown shape {shape!r}")


def _texture_fill(look: ClassLook, ys: np.ndarray, xs: np.ndarray, phase: int) -> np.ndarray:
    """RGB values (N, 3) for object pixels at (ys, xs); textures vary only in brightness, never in hue."""
    base = np.asarray(look.colour, dtype=np.float32)
    rgb = np.broadcast_to(base, (len(ys), 3)).copy()
    if look.texture == "stripes":
        dark = ((ys + phase) // 3) % 2 == 0
        rgb[dark] *= 0.55
    elif look.texture == "dots":
        dot = (((ys + phase) % 6) < 2) & (((xs + phase) % 6) < 2)
        rgb[dot] = rgb[dot] * 0.4 + 255 * 0.6
    return rgb


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation grey gradient with pixel noise: neutral so no class colour hides in it."""
    level = rng.uniform(80, 175)
    tint = rng.uniform(-12, 12, size=3)
    gy, gx = rng.uniform(-30, 30, size=2)
    ramp = np.linspace(-0.5, 0.5, size)[:, None] * gy + np.linspace(-0.5, 0.5, size)[None, :] * gx
    noise = rng.normal(0.0, 9.0, size=(size, size, 1))
    img = level + ramp[:, :, None] + tint[None, None, :] + noise
    return img.astype(np.float32)


def _place_objects(rng: np.random.Generator, n: int, size: int) -> list[tuple[float, float, float]]:
    """(cx, cy, radius) per object with limited overlap: centres at least 1.1 x the larger radius apart."""
    max_r = {1: 0.32, 2: 0.25, 3: 0.21}[n] * size
    min_r = 0.6 * max_r
    best: list[tuple[float, float, float]] = []
    for _attempt in range(50):
        placed: list[tuple[float, float, float]] = []
        for _ in range(n):
            r = rng.uniform(min_r, max_r)
            cx, cy = rng.uniform(r, size - r, size=2)
            placed.append((cx, cy, r))
        ok = all(
            math.hypot(a[0] - b[0], a[1] - b[1]) >= 1.1 * max(a[2], b[2])
            for i, a in enumerate(placed)
            for b in placed[i + 1 :]
        )
        if ok:
            return placed
        best = placed
    return best  # rare; drawing order still keeps every object partly visible, and the mask says what is


def render_sample(
    classes: Sequence[str],
    seed: int | Sequence[int],
    image_size: int = 128,
    *,
    ignore_border: bool = True,
    vocabulary: str = "v1",
    n_objects: int | None = None,
    repeat_instances: bool = True,
) -> RenderedSample:
    """Render an image showing `classes` (at most MAX_OBJECTS drawn) and its mask; same inputs -> same arrays.

    When more than MAX_OBJECTS classes are given, a seeded choice of MAX_OBJECTS is drawn (reported in
    `.classes`). An empty list gives a background-only image. `n_objects` (1..MAX_OBJECTS): when the classes are
    fewer, further instances of them are drawn (cycling through the classes) so the image shows `n_objects`
    objects of the sizes an image with that many objects gets; None (eval images) draws each class once and makes
    no extra random draw, so those renders do not change. `repeat_instances=False` (with `n_objects`): each class is
    still drawn once, at the sizes and places of an image with `n_objects` objects (the remaining places stay empty).
    """
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    vocab = _classes(vocabulary)
    index_of = {c: i for i, c in enumerate(vocab)}
    unknown = [c for c in classes if c not in index_of]
    if unknown:
        raise ValueError(f"classes not in vocabulary {vocabulary!r}: {unknown}")
    unique = list(dict.fromkeys(classes))
    rng = np.random.default_rng(seed)
    if len(unique) > MAX_OBJECTS:
        picked = sorted(rng.choice(len(unique), size=MAX_OBJECTS, replace=False))
        unique = [unique[i] for i in picked]
    image = _background(rng, image_size)
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    objects = _instances(unique, n_objects)
    layout = len(objects)
    if not repeat_instances:
        objects = unique
    if objects:
        grid = np.arange(image_size, dtype=np.float32) + 0.5
        for cls, (cx, cy, r) in zip(objects, _place_objects(rng, layout, image_size)):
            look = class_look(index_of[cls])
            # Small rotation and stretch vary instances without changing the shape family.
            angle = rng.uniform(-0.25, 0.25)
            stretch = rng.uniform(0.9, 1.1)
            dx = (grid[None, :] - cx) / r
            dy = (grid[:, None] - cy) / r
            u = (math.cos(angle) * dx + math.sin(angle) * dy) * stretch
            v = (-math.sin(angle) * dx + math.cos(angle) * dy) / stretch
            inside = _shape_mask(look.shape, u, v)
            ys, xs = np.nonzero(inside)
            rgb = _texture_fill(look, ys, xs, int(rng.integers(0, 6)))
            rgb *= rng.uniform(0.85, 1.1)
            image[ys, xs] = rgb
            mask[ys, xs] = index_of[cls] + 1
    if ignore_border:
        mask = _mark_edges(mask)
    image = np.clip(image + rng.normal(0.0, 3.0, size=image.shape), 0, 255).astype(np.uint8)
    drawn = tuple(c for c in unique if np.any(mask == index_of[c] + 1))
    return RenderedSample(image=image, mask=mask, classes=drawn)


def _instances(classes: list[str], n_objects: int | None) -> list[str]:
    """The objects to draw: each class once, then further instances of the classes in turn up to `n_objects`."""
    if n_objects is None or not classes:
        return classes
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n_objects}")
    return [classes[i % len(classes)] for i in range(max(n_objects, len(classes)))]


def _mark_edges(mask: np.ndarray) -> np.ndarray:
    """Set to IGNORE_LABEL the object pixels that touch a different label (4-neighbourhood)."""
    padded = np.pad(mask, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
    out = mask.copy()
    out[differs & (mask != 0)] = IGNORE_LABEL
    return out


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """P-mode PNG with the VOC palette: the class index is the pixel value, the palette only helps viewing."""
    # frombytes keeps the raw indices; an L -> P convert() would remap them through a palette.
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    img.putpalette(class_palette())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def colour_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the palette colour of each mask label over the image (background and ignore left as they are)."""
    palette = np.asarray(class_palette(), dtype=np.float32).reshape(256, 3)
    colours = palette[mask]
    blend = (mask != 0) & (mask != IGNORE_LABEL)
    out = image.astype(np.float32)
    out[blend] = (1 - alpha) * out[blend] + alpha * colours[blend]
    return out.astype(np.uint8)
