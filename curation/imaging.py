"""Untrusted image bytes -> the JPEG stored in CC4M.

One function, `to_stored_jpeg`, used by every route that puts an image into a build (img2dataset's workers on the
download route, the webdataset-source route), so the same bytes give the same stored pixels whichever way they came.

Why not img2dataset's own resizer: it decodes with `cv2.imdecode(IMREAD_UNCHANGED)`, which ignores EXIF orientation
(phone photos end up sideways) and decodes the whole pixel array before anything checks its size (a 20000x20000 PNG
of a few hundred kB costs gigabytes). Here the size comes from the header first, and nothing is decoded above
`max_pixels`.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

# Bumped whenever the same bytes and ImageSpec would give other stored pixels: it is part of the staging fingerprint.
# 2: area (BOX) filter for downscaling, as img2dataset's default `downsample_interpolation="area"` (was LANCZOS).
IMAGING_VERSION = 2
# Pillow's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS): ~89 MP, a 9459x9459 image.
DEFAULT_MAX_PIXELS = 89_478_485
RESIZE_MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no")
# img2dataset composites transparent images on white and pads "border" with white; we keep both.
BACKGROUND = (255, 255, 255)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class ImageRejected(ValueError):
    """The bytes are not an image we store. `reason` is a failure class: too_many_pixels or undecodable."""

    def __init__(self, reason: str, detail: str) -> None:
        # Pillow names the stream object with its memory address ("<_io.BytesIO object at 0x7f...>"): drop it, so the
        # same bytes always give the same message (messages are counted, and the counts are in the manifest).
        detail = _ADDRESS.sub("", detail)
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageSpec:
    """How a stored image is made: the DownloadConfig fields that decide its pixels, plus the pixel cap."""

    image_size: int = 256
    resize_mode: str = "border"
    encode_quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.max_pixels <= 0:
            raise ValueError(f"ImageSpec: image_size and max_pixels must be positive, got {self}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"ImageSpec.resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError(f"ImageSpec.encode_quality must be in 1..100, got {self.encode_quality!r}")


@dataclass(frozen=True)
class StoredImage:
    jpeg: bytes
    width: int
    height: int
    original_width: int  # after EXIF orientation, before resizing
    original_height: int


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open `data` reading only its header, and refuse it above `max_pixels` before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # Our own cap decides; Pillow's global one must neither warn nor pre-empt it below its 2x error level.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageRejected("too_many_pixels", str(err)) from None
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for garbage; all mean "not an image"
        raise ImageRejected("undecodable", f"{type(err).__name__}: {err}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejected("undecodable", f"image header says {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected("too_many_pixels", f"{width}x{height} = {width * height} pixels > cap {max_pixels}")
    return image


def _scale_for(size: tuple[int, int], spec: ImageSpec) -> float:
    width, height = size
    if spec.resize_mode in ("border", "keep_ratio_largest"):
        return spec.image_size / max(width, height)
    if spec.resize_mode in ("keep_ratio", "center_crop"):
        return spec.image_size / min(width, height)
    return 1.0


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: keep the range, not the low byte
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, BACKGROUND)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _decode_upright(image: Image.Image, spec: ImageSpec) -> Image.Image:
    scale = _scale_for(image.size, spec)
    if image.format == "JPEG" and scale < 0.5:
        # DCT-domain downscaling (1/2, 1/4, 1/8) to no less than the target: a large JPEG decodes several times
        # faster and in a fraction of the memory. The scale is symmetric in width/height, so EXIF rotation after it
        # is fine.
        target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image.draft("RGB", target)
    try:
        image.load()
        if _orientation(image) != 1:  # phone photos: apply the Orientation tag before resizing
            image = ImageOps.exif_transpose(image)  # (which copies the pixels: only when there is something to do)
        return image if image.mode == "RGB" else _to_rgb(image)
    except Exception as err:  # noqa: BLE001 - truncated or corrupt data surfaces here, as many types
        raise ImageRejected("undecodable", f"{type(err).__name__}: {err}") from None


def resize(image: Image.Image, spec: ImageSpec) -> Image.Image:
    """img2dataset's resize modes (https://github.com/rom1504/img2dataset#api), on an RGB image."""
    if spec.resize_mode == "no":
        return image
    scale = _scale_for(image.size, spec)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size != image.size:
        # img2dataset's defaults: area averaging to shrink (BOX is exactly that, at any factor; it is also 2.5x faster
        # than LANCZOS here, which the download's CPU budget needs), LANCZOS to enlarge.
        shrink = size[0] <= image.width and size[1] <= image.height
        image = image.resize(size, Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
    if spec.resize_mode == "border":
        canvas = Image.new("RGB", (spec.image_size, spec.image_size), BACKGROUND)
        canvas.paste(image, ((spec.image_size - image.width) // 2, (spec.image_size - image.height) // 2))
        return canvas
    if spec.resize_mode == "center_crop":
        left, top = (image.width - spec.image_size) // 2, (image.height - spec.image_size) // 2
        return image.crop((left, top, left + spec.image_size, top + spec.image_size))
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block; decoding will report the image if it is broken
        return 1


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """The header's size, as displayed: orientations 5-8 swap width and height."""
    width, height = image.size
    return (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)


def to_stored_jpeg(data: bytes, spec: ImageSpec) -> StoredImage:
    """Header check, upright decode, resize, JPEG encode. Raises ImageRejected (with a failure reason)."""
    image = open_checked(data, spec.max_pixels)
    original = _upright_size(image)  # before draft decoding shrinks a large JPEG
    upright = _decode_upright(image, spec)
    out = resize(upright, spec)
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=spec.encode_quality)
    return StoredImage(buffer.getvalue(), out.width, out.height, *original)
