"""decode/probe: every mode to RGB, EXIF, alpha over white, first frame, and clear refusals."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app.errors import ImageTooLarge, InvalidImage
from app.imaging.decode import decode, probe

LIMIT = 100_000_000


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def rgb(data: bytes, max_pixels: int = LIMIT) -> np.ndarray:
    image = decode(data, max_pixels)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def fake_png(width: int, height: int) -> bytes:
    """A well-formed PNG header claiming any size, with almost no pixel data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


# -- modes -----------------------------------------------------------------------------------
def test_rgb_passthrough_exact(rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)
    out = rgb(encode(Image.fromarray(pixels, "RGB"), "PNG"))
    assert np.array_equal(out, pixels)


def test_mode_L() -> None:
    image = Image.fromarray(np.array([[0, 77], [200, 255]], dtype=np.uint8), "L")
    out = rgb(encode(image, "PNG"))
    assert out.shape == (2, 2, 3)
    assert out[:, :, 0].tolist() == [[0, 77], [200, 255]]
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_mode_1() -> None:
    image = Image.new("1", (5, 3), 0)
    image.putpixel((4, 2), 1)
    out = rgb(encode(image, "PNG"))
    assert out.shape == (3, 5, 3)
    assert out[2, 4].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [0, 0, 0]


def test_mode_LA_alpha_over_white() -> None:
    image = Image.new("LA", (3, 1))
    image.putpixel((0, 0), (100, 255))  # opaque
    image.putpixel((1, 0), (100, 0))  # fully transparent
    image.putpixel((2, 0), (0, 128))  # half black over white
    out = rgb(encode(image, "PNG"))
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in out[0, 2])


def test_mode_RGBA_alpha_over_white() -> None:
    image = Image.new("RGBA", (4, 2), (10, 20, 30, 255))
    image.putpixel((1, 0), (200, 0, 0, 0))  # transparent red: must vanish, not show red
    image.putpixel((2, 0), (0, 0, 0, 0))  # transparent black: white, not black
    image.putpixel((3, 1), (0, 0, 255, 128))  # half blue over white
    out = rgb(encode(image, "PNG"))
    assert out.shape == (2, 4, 3)
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [255, 255, 255]
    r, g, b = out[1, 3]
    assert abs(r - 127) <= 1 and abs(g - 127) <= 1 and b == 255


def test_mode_P() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    out = rgb(encode(image, "PNG"))
    assert out[0].tolist() == [[255, 0, 0], [0, 255, 0]]


def test_mode_P_with_transparency() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    data = encode(image, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = rgb(data)
    # Index 0 is transparent: white, not its palette red.
    assert out[0].tolist() == [[255, 255, 255], [0, 255, 0]]


def test_mode_PA() -> None:
    image = Image.new("PA", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), (0, 0))  # red, transparent
    image.putpixel((1, 0), (1, 255))  # green, opaque
    data = encode(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "PA"
    assert rgb(data)[0].tolist() == [[255, 255, 255], [0, 255, 0]]


def test_mode_I16_png_scaled_to_8_bits() -> None:
    values = np.array([[0, 65535, 32768, 16384]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = rgb(data)
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 255, 128, 64]


def test_mode_I16_dark_image_stays_dark() -> None:
    """A 16-bit image is in 0..65535 even when every value happens to be small."""
    values = np.array([[0, 255, 128]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    assert rgb(data)[0, :, 0].tolist() == [0, 1, 0]


def test_mode_I_tiff() -> None:
    values = np.array([[0, 65535, 70000, 32768]], dtype=np.int32)
    data = encode(Image.fromarray(values, mode="I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    # 16-bit range scaled to 8 bits; above the range clips.
    assert rgb(data)[0, :, 0].tolist() == [0, 255, 255, 128]


def test_cmyk_jpeg() -> None:
    image = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    data = encode(image, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = rgb(data)
    assert out.shape == (8, 16, 3)
    assert np.all(np.abs(out - [255, 0, 0]) <= 8)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("PA", "TIFF"),
        ("I;16", "PNG"),
        ("I", "TIFF"),
        ("CMYK", "JPEG"),
        ("RGBA", "PNG"),
        ("1", "PNG"),
        ("RGB", "JPEG"),
        ("RGB", "WEBP"),
        ("RGBA", "WEBP"),
        ("L", "BMP"),
        ("RGB", "TIFF"),
    ],
)
def test_every_mode_decodes_to_rgb_of_right_size(mode: str, fmt: str) -> None:
    image = Image.new(mode, (13, 7))
    data = encode(image, fmt)
    out = decode(data, LIMIT)
    assert out.mode == "RGB"
    assert out.size == (13, 7)
    assert probe(data, LIMIT) == (7, 13)


# -- EXIF orientation ------------------------------------------------------------------------
def _marked(width: int = 40, height: int = 20) -> np.ndarray:
    """Stored pixels: blue, with a red block at the top-left and green at the bottom-left."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[...] = (0, 0, 255)
    pixels[:8, :8] = (255, 0, 0)
    pixels[-8:, :8] = (0, 255, 0)
    return pixels


def _with_orientation(pixels: np.ndarray, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(pixels, "RGB"), fmt, exif=exif)


@pytest.mark.parametrize(
    ("orientation", "k", "swaps"),
    [
        (6, -1, True),  # stored image must turn 90 degrees clockwise to display
        (8, 1, True),  # ... 90 degrees counter-clockwise
        (3, 2, False),  # ... 180 degrees
        (1, 0, False),  # as stored
    ],
)
def test_exif_orientation_png(orientation: int, k: int, swaps: bool) -> None:
    stored = _marked()
    data = _with_orientation(stored, orientation, "PNG")
    assert probe(data, LIMIT) == ((40, 20) if swaps else (20, 40))
    out = rgb(data)
    assert out.shape == ((40, 20, 3) if swaps else (20, 40, 3))
    assert np.array_equal(out, np.rot90(stored, k=k))


def test_exif_orientation_6_puts_top_left_at_top_right() -> None:
    data = _with_orientation(_marked(), 6, "PNG")
    out = rgb(data)
    assert out[0, -1].tolist() == [255, 0, 0]  # stored top-left -> displayed top-right
    assert out[0, 0].tolist() == [0, 255, 0]  # stored bottom-left -> displayed top-left


@pytest.mark.parametrize(("orientation", "k"), [(6, -1), (8, 1)])
def test_exif_orientation_jpeg(orientation: int, k: int) -> None:
    stored = _marked(64, 32)
    data = _with_orientation(stored, orientation, "JPEG")
    assert probe(data, LIMIT) == (64, 32)
    out = rgb(data)
    assert out.shape == (64, 32, 3)
    expected = np.rot90(stored, k=k).astype(int)
    # JPEG is lossy: compare block centres, away from the edges where colours bleed.
    for y, x in [(3, 3), (3, 28), (60, 3), (60, 28), (32, 16)]:
        assert np.all(np.abs(out[y, x] - expected[y, x]) <= 40), (y, x, out[y, x])


# -- animations ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "params"), [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})]
)
def test_first_frame_of_animation(fmt: str, params: dict[str, object]) -> None:
    frames = [Image.new("RGB", (8, 6), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encode(
        frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **params
    )
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = rgb(data)
    assert out.shape == (6, 8, 3)
    assert np.all(out == [255, 0, 0])


# -- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_invalid(rng: np.random.Generator, fmt: str) -> None:
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels, "RGB"), fmt)
    truncated = data[: len(data) // 2]
    # The header survives, so probing still works: only decoding finds the damage.
    assert probe(truncated, LIMIT) == (64, 64)
    with pytest.raises(InvalidImage, match=r"truncated|corrupt") as info:
        decode(truncated, LIMIT)
    assert info.value.type == "invalid_image"


@pytest.mark.parametrize("data", [b"garbage bytes, not an image" * 4, b"\x89PNG\r\n\x1a\n", b"GIF"])
def test_garbage_is_invalid(data: bytes) -> None:
    with pytest.raises(InvalidImage, match="not a decodable image"):
        probe(data, LIMIT)
    with pytest.raises(InvalidImage, match="not a decodable image"):
        decode(data, LIMIT)


def test_empty_is_invalid() -> None:
    for fn in (probe, decode):
        with pytest.raises(InvalidImage, match="empty"):
            fn(b"", LIMIT)


@pytest.mark.parametrize(("width", "height"), [(0, 10), (10, 0)])
def test_zero_size_is_invalid(width: int, height: int) -> None:
    with pytest.raises(InvalidImage):
        probe(fake_png(width, height), LIMIT)


def test_over_max_pixels_from_probe() -> None:
    data = encode(Image.new("RGB", (200, 200)), "PNG")
    with pytest.raises(ImageTooLarge, match="40000 pixels, the limit is 100") as info:
        probe(data, 100)
    assert info.value.type == "image_too_large"
    with pytest.raises(ImageTooLarge):
        decode(data, 100)
    # At the limit is fine.
    assert probe(data, 40_000) == (200, 200)


def test_huge_header_refused_without_decoding() -> None:
    # 10^10 pixels claimed; the file is a few dozen bytes, so nothing was decoded.
    data = fake_png(100_000, 100_000)
    assert len(data) < 100
    with pytest.raises(ImageTooLarge, match="limit"):
        probe(data, LIMIT)
    with pytest.raises(ImageTooLarge):
        decode(data, LIMIT)


def test_probe_reads_the_header_only() -> None:
    # A 150-megapixel claim within a 10^9 limit: probe answers from the header (decoding
    # the few bytes behind it would fail), decode then finds the data missing.
    data = fake_png(15_000, 10_000)
    assert probe(data, 10**9) == (10_000, 15_000)
    with pytest.raises(InvalidImage):
        decode(data, 10**9)


def test_limit_above_pils_bomb_threshold_is_honoured() -> None:
    assert probe(fake_png(20_000, 10_000), 10**9) == (10_000, 20_000)
