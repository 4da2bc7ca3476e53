"""curation.imaging: header-checked, upright, resized JPEGs from untrusted bytes in every common format."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curation.imaging import ImageRejected, ImageSpec, open_checked, to_stored_jpeg
from curation.sample.bombs import png_bomb


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _left_red_right_blue(width: int = 120, height: int = 60) -> Image.Image:
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(array)


def _decoded(stored_jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(stored_jpeg)).convert("RGB")).astype(int)


def test_exif_orientation_is_applied_before_resizing():
    # Stored landscape (120x60, red left); Orientation=6 says "rotate 90 CW to display": upright it is 60x120 portrait
    # with red on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(_left_red_right_blue(), "JPEG", exif=exif.tobytes(), quality=95)
    stored = to_stored_jpeg(data, ImageSpec(image_size=64, resize_mode="keep_ratio_largest"))
    assert (stored.width, stored.height) == (32, 64)
    assert (stored.original_width, stored.original_height) == (60, 120)
    pixels = _decoded(stored.jpeg)
    top, bottom = pixels[: 20].mean(axis=(0, 1)), pixels[-20:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60, top  # red on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_pixel_cap_refuses_from_the_header_before_decoding():
    bomb = png_bomb(20000, 20000)
    assert len(bomb) < 2_000_000
    with pytest.raises(ImageRejected) as err:
        to_stored_jpeg(bomb, ImageSpec())
    assert err.value.reason == "too_many_pixels"
    # The cap is ours, not Pillow's: a small cap refuses a small image too, a large one admits it.
    small = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageRejected, match="too_many_pixels"):
        open_checked(small, max_pixels=9_999)
    assert open_checked(small, max_pixels=10_000).size == (100, 100)


@pytest.mark.parametrize("resize_mode, size", [
    ("border", (64, 64)), ("keep_ratio", (128, 64)), ("keep_ratio_largest", (64, 32)), ("center_crop", (64, 64)),
    ("no", (120, 60)),
])
def test_resize_modes_follow_img2dataset(resize_mode, size):
    stored = to_stored_jpeg(_encode(_left_red_right_blue(), "PNG"), ImageSpec(image_size=64, resize_mode=resize_mode))
    assert (stored.width, stored.height) == size
    if resize_mode == "border":  # white padding above and below the 64x32 picture
        pixels = _decoded(stored.jpeg)
        assert pixels[:10].mean() > 245 and pixels[-10:].mean() > 245


def _formats() -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    """name -> (bytes, expected mean colour of the stored image, roughly)."""
    orange = Image.new("RGB", (80, 80), (250, 120, 10))
    transparent = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    palette = Image.new("P", (80, 80), 0)
    palette.putpalette([0, 0, 0] * 256)
    grey16 = Image.fromarray(np.full((80, 80), 32768, np.uint16))
    frames = [Image.new("RGB", (80, 80), c) for c in ((0, 200, 0), (200, 0, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return {
        "baseline_jpeg": (_encode(orange, "JPEG"), (250, 120, 10)),
        "progressive_jpeg": (_encode(orange, "JPEG", progressive=True), (250, 120, 10)),
        "cmyk_jpeg": (_encode(orange.convert("CMYK"), "JPEG"), (250, 120, 10)),
        "greyscale_jpeg": (_encode(orange.convert("L"), "JPEG"), (150, 150, 150)),
        "png_16bit": (_encode(grey16, "PNG"), (128, 128, 128)),
        "png_palette_transparent": (_encode(palette, "PNG", transparency=0), (255, 255, 255)),
        "png_rgba_transparent": (_encode(transparent, "PNG"), (255, 255, 255)),
        "webp": (_encode(orange, "WEBP", quality=95), (250, 120, 10)),
        "bmp": (_encode(orange, "BMP"), (250, 120, 10)),
        "tiff": (_encode(orange, "TIFF"), (250, 120, 10)),
        "animated_gif_first_frame": (gif.getvalue(), (0, 200, 0)),
    }


@pytest.mark.parametrize("name", sorted(_formats()))
def test_common_formats_and_colour_modes_are_stored_as_rgb_jpeg(name):
    data, colour = _formats()[name]
    stored = to_stored_jpeg(data, ImageSpec(image_size=32, resize_mode="keep_ratio"))
    image = Image.open(io.BytesIO(stored.jpeg))
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
    mean = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert np.abs(mean - np.array(colour)).max() < 25, (name, mean, colour)


@pytest.mark.parametrize("data", [
    b"", b"garbage" * 100, b"<html><body>Not found</body></html>",
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
], ids=["empty", "garbage", "html", "svg"])
def test_non_images_are_undecodable(data):
    with pytest.raises(ImageRejected) as err:
        to_stored_jpeg(data, ImageSpec())
    assert err.value.reason == "undecodable"
    assert " at 0x" not in str(err.value)  # no memory address: one message for the same bytes in every run


def test_truncated_image_is_undecodable():
    data = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)), "PNG")
    with pytest.raises(ImageRejected) as err:
        to_stored_jpeg(data[: len(data) // 2], ImageSpec())
    assert err.value.reason == "undecodable"


def test_large_jpeg_draft_decode_matches_full_decode_closely():
    rng = np.random.default_rng(1)
    # 1200x1600 of 200 px colour blocks: 16 px blocks once stored, so JPEG's chroma subsampling barely matters.
    blocks = np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((200, 200, 1))).astype(np.uint8)
    data = _encode(Image.fromarray(blocks), "JPEG", quality=95)
    stored = to_stored_jpeg(data, ImageSpec(image_size=128, resize_mode="keep_ratio_largest"))
    reference = np.asarray(Image.fromarray(blocks).resize((128, 96), Image.Resampling.BOX)).astype(int)
    assert (stored.width, stored.height) == (128, 96)
    assert (stored.original_width, stored.original_height) == (1600, 1200)  # the header's size, not the draft's
    assert np.abs(_decoded(stored.jpeg) - reference).mean() < 4
