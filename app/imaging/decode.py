"""Bytes -> RGB PIL image, with the checks that must happen before any pixel is decoded.

`probe` reads only the header (size, EXIF orientation), so the service can size an image,
count its tokens and refuse it (too many pixels, queue full) without paying for the decode.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import ImageTooLarge, InvalidImage

# EXIF orientations 5..8 rotate by 90 degrees, so the displayed image swaps height and width.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
_WHITE = (255, 255, 255)

# This module enforces MAX_IMAGE_PIXELS itself, from the header, before decoding. PIL's fixed
# decompression-bomb limit (about 179M pixels) would otherwise refuse images the setting allows.
Image.MAX_IMAGE_PIXELS = None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise InvalidImage("empty image data")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage("not a decodable image (unrecognized format)") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImage(f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(f"image has {width * height} pixels, the limit is {max_pixels}")
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:
        # A corrupt EXIF block must not cost the image: display it as stored.
        return 1


def probe(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(height, width) as displayed (after EXIF orientation), from the header alone."""
    image = _open(data, max_pixels)
    width, height = image.size
    if _orientation(image) in _TRANSPOSING_ORIENTATIONS:
        height, width = width, height
    return height, width


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        # PIL's own I/F -> RGB conversion clips at 255; scale 16-bit range to 8 bits instead.
        values = np.asarray(image, dtype=np.float64)
        # I;16 is 16-bit by definition; plain I may hold 8-bit data, so judge it by its values.
        sixteen_bit = mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255)
        peak = 65535.0 if sixteen_bit else 255.0
        scaled = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    return image.convert("RGB")


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:
        # Same policy as `_orientation`: a broken EXIF block leaves the image as stored.
        return image


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Decode fully: first frame, EXIF orientation applied, alpha over white, RGB."""
    image = _open(data, max_pixels)
    try:
        image.seek(0)
        image.load()
        image = _apply_orientation(image)
        rgb = _to_rgb(image)
        rgb.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"image data is corrupt or truncated ({type(exc).__name__})") from exc
    return rgb
