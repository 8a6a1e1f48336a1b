"""Tests of mgpo_core.imaging: safe opening of any image file and the exact size rules of the model input."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mgpo_core import imaging
from mgpo_core.imaging import (
    ImageError,
    crop_and_enlarge,
    image_size,
    open_image,
    overview_area_bound,
    overview_size,
    resize_for_model,
    smart_resize,
    visual_tokens,
)

MIN_PIXELS = 256 * 28 * 28
MAX_PIXELS = 1280 * 28 * 28


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares ``width x height`` (no pixel data): a decompression-bomb stand-in."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _noise_bytes(fmt: str, size: tuple[int, int] = (120, 80)) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


# --- size rules ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "expected", "tokens"),
    [(3840, 2160, (1344, 756), 1296), (1000, 700, (1008, 700), 900)],
)
def test_overview_size_reproduces_the_papers_worked_examples(width, height, expected, tokens):
    size = overview_size(width, height)
    assert size == expected
    assert visual_tokens(*size) == tokens


def test_overview_size_depends_only_on_aspect_ratio_once_above_max_pixels():
    # 7680x4320 and 3840x2160 are both 16:9 and both shrink to the same 1335x751 intermediate.
    assert overview_size(7680, 4320) == overview_size(3840, 2160)


def test_overview_size_enlarges_a_small_image_to_min_pixels():
    w_in, h_in = overview_size(100, 100)
    # sqrt(200704 / 10000) = 4.48 exactly, so the side becomes 448, already a multiple of 28.
    assert (w_in, h_in) == (448, 448)
    assert visual_tokens(w_in, h_in) == 256


def test_overview_size_keeps_an_extreme_but_allowed_aspect_ratio():
    w_in, h_in = overview_size(5000, 30)
    assert w_in % 28 == 0 and h_in == 28
    assert w_in / h_in > 150


def test_overview_size_rejects_aspect_ratio_above_200_with_reason():
    with pytest.raises(ValueError, match="aspect ratio"):
        overview_size(30000, 100)


def test_overview_size_rejects_bad_limits_and_sizes():
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        overview_size(100, 100, min_pixels=10_000, max_pixels=5_000)
    with pytest.raises(ValueError, match="positive image size"):
        overview_size(0, 100)


@settings(max_examples=150, deadline=None)
@given(width=st.integers(1, 20_000), height=st.integers(1, 20_000))
@example(width=11, height=137)  # enlarged to 126x1581 (truncated below min), then rounded down to 112x1568
def test_overview_size_gives_multiples_of_28_near_the_pixel_limits(width, height):
    assume(max(width, height) / min(width, height) <= 100)
    w_in, h_in = overview_size(width, height)
    assert w_in % 28 == 0 and h_in % 28 == 0
    # Step 1's int() truncation leaves a size a x b whose area is within [min - (a + b), max]; smart_resize then
    # moves each side by at most 14 px, so a + b <= w_in + h_in + 28 and the area moves by at most
    # 14 (a + b) + 196 more.
    slack = 15 * (w_in + h_in) + 15 * 28 + 14 * 14
    assert MIN_PIXELS - slack <= w_in * h_in <= MAX_PIXELS + slack


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 20_000),
    ratio=st.floats(1.0, 200.0),
    limits=st.sampled_from([(12544, 50176), (3136, 12544), (MIN_PIXELS, MAX_PIXELS), (784, 3136)]),
)
def test_overview_area_bound_holds_every_size_overview_size_makes(width, ratio, limits):
    height = max(1, round(width / ratio))
    assume(max(width, height) / min(width, height) <= 200)
    lo, hi = limits
    try:
        w_in, h_in = overview_size(width, height, min_pixels=lo, max_pixels=hi)
    except ValueError:  # step 1's truncation pushed the ratio past 200: refused, nothing to bound
        assume(False)
    assert w_in * h_in <= overview_area_bound(hi)


def test_overview_area_bound_admits_a_crop_that_rounds_past_max_pixels():
    w_in, h_in = overview_size(71, 602, min_pixels=12544, max_pixels=50176)
    assert (w_in, h_in) == (84, 616) and w_in * h_in > 50176  # a processor capped at 50176 would shrink it
    assert smart_resize(h_in, w_in, min_pixels=784, max_pixels=overview_area_bound(50176)) == (h_in, w_in)
    assert overview_area_bound(50176) < 2 * 50176  # and the bound stays a bound, not "anything"


def test_smart_resize_rounds_each_side_to_the_nearest_multiple():
    assert smart_resize(700, 1000) == (700, 1008)


def test_smart_resize_scales_down_with_floor_above_max_pixels():
    h, w = smart_resize(10_000, 10_000, max_pixels=1_000_000)
    assert h * w <= 1_000_000 and h % 28 == 0 and w % 28 == 0
    assert h == w == (1000 // 28) * 28


def test_smart_resize_scales_up_with_ceil_below_min_pixels():
    assert smart_resize(10, 10) == (56, 56)


def test_smart_resize_rejects_aspect_ratio_above_200():
    with pytest.raises(ValueError, match="exceeds 200"):
        smart_resize(10, 2011)


def test_visual_tokens_refuses_sizes_that_are_not_multiples_of_the_factor():
    with pytest.raises(ValueError, match="multiple of 28"):
        visual_tokens(1000, 700)


# --- opening files ----------------------------------------------------------------------------------------


def test_missing_file_is_rejected_with_reason_and_path(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageError) as info:
        open_image(path)
    assert info.value.reason == "missing"
    assert str(path) in str(info.value)


def test_empty_file_is_rejected_with_reason(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as info:
        image_size(path)
    assert info.value.reason == "empty_file"


def test_garbage_bytes_are_rejected_as_unreadable(tmp_path):
    path = tmp_path / "junk.jpg"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageError) as info:
        open_image(path)
    assert info.value.reason == "unreadable"


def test_decompression_bomb_is_refused_from_the_header_without_touching_pillows_limit(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    bomb = _png_header_only(tmp_path / "bomb.png", 50_000, 50_000)
    for call in (open_image, image_size):
        with pytest.raises(ImageError) as info:
            call(bomb)
        assert info.value.reason == "too_many_pixels"
        assert "max_image_pixels" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == before


def test_80_megapixel_original_is_admitted_by_the_default_limit(tmp_path):
    path = _png_header_only(tmp_path / "big.png", 10_000, 8_000)
    assert image_size(path) == (10_000, 8_000)
    with open_image(path, load=False) as lazy:
        assert lazy.size == (10_000, 8_000)


def test_image_between_pillows_warning_and_our_limit_opens_without_a_bomb_warning(tmp_path):
    path = _png_header_only(tmp_path / "95mp.png", 10_000, 9_500)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert image_size(path) == (10_000, 9_500)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_limit_above_pillows_hard_limit_is_honoured_and_pillows_limit_restored(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    path = _png_header_only(tmp_path / "200mp.png", 20_000, 10_000)
    with pytest.raises(ImageError):
        image_size(path)
    assert image_size(path, max_image_pixels=300_000_000) == (20_000, 10_000)
    assert Image.MAX_IMAGE_PIXELS == before


def test_small_pixel_limit_refuses_a_real_image_before_decoding(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(_noise_bytes("PNG"))
    with pytest.raises(ImageError) as info:
        open_image(path, max_image_pixels=5_000)
    assert info.value.reason == "too_many_pixels"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_truncated_file_is_rejected_as_truncated(tmp_path, fmt):
    data = _noise_bytes(fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(ImageError) as info:
        open_image(path)
    assert info.value.reason == "truncated"


def test_zero_sized_header_is_rejected_as_bad_size(tmp_path, monkeypatch):
    # Pillow's own plugins already refuse 0-sized headers, so stand in a reader that reports one.
    class ZeroSized:
        size = (0, 5)

        def close(self) -> None:
            pass

    path = tmp_path / "zero.png"
    path.write_bytes(b"x")
    monkeypatch.setattr(imaging.Image, "open", lambda *_: ZeroSized())
    with pytest.raises(ImageError) as info:
        image_size(path)
    assert info.value.reason == "bad_size"


def test_image_error_survives_pickling_for_worker_processes():
    err = ImageError("truncated", "/data/a.jpg", "image data ends early", "drop the row")
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.reason, clone.path, str(clone)) == (err.reason, err.path, str(err))
    assert isinstance(clone, ValueError)


def _half_red_half_blue() -> Image.Image:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    return image


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_rotation_is_applied_and_image_size_agrees(tmp_path, fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left (red) half ends up on top
    path = tmp_path / f"rot.{fmt.lower()}"
    _half_red_half_blue().save(path, fmt, exif=exif, quality=95)
    image = open_image(path)
    assert image.size == (20, 40) == image_size(path)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_every_common_mode_becomes_rgb_with_the_expected_colour(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white background
    la = Image.new("LA", (4, 4), (0, 0))
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    sixteen = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))  # mid-grey in 16 bits
    cases = {
        "rgba.png": (_save(rgba, tmp_path / "rgba.png"), (255, 255, 255)),
        "la.png": (_save(la, tmp_path / "la.png"), (255, 255, 255)),
        "p.png": (_save(palette, tmp_path / "p.png", transparency=0), (255, 255, 255)),
        "i16.png": (_save(sixteen, tmp_path / "i16.png"), (128, 128, 128)),
        "cmyk.tif": (_save(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), tmp_path / "cmyk.tif"), (255, 255, 255)),
        "one.png": (_save(Image.new("1", (4, 4), 1), tmp_path / "one.png"), (255, 255, 255)),
        "l.png": (_save(Image.new("L", (4, 4), 77), tmp_path / "l.png"), (77, 77, 77)),
    }
    for name, (path, colour) in cases.items():
        image = open_image(path)
        assert image.mode == "RGB", name
        assert image.getpixel((1, 1)) == colour, name


def test_sixteen_bit_image_is_scaled_not_saturated():
    image = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.uint16))
    values = [imaging.to_rgb(image).getpixel((x, 0))[0] for x in range(3)]
    assert values == [0, round(1000 / 257), 255]


def test_load_false_returns_the_lazy_image_in_its_file_mode(tmp_path):
    path = _save(Image.new("L", (30, 10), 5), tmp_path / "l.png")
    with open_image(path, load=False) as lazy:
        assert lazy.mode == "L" and lazy.size == (30, 10)


# --- resizing and cropping --------------------------------------------------------------------------------


def test_resize_for_model_produces_the_overview_size():
    image = Image.new("RGB", (1000, 700))
    out = resize_for_model(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert out.size == overview_size(1000, 700) == (1008, 700)


def test_unknown_resample_name_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="bicubic"):
        resize_for_model(
            Image.new("RGB", (10, 10)), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, resample="cubic"
        )


def test_crop_and_enlarge_takes_the_box_from_the_original_and_enlarges_with_nearest():
    original = Image.new("RGB", (4000, 3000), (0, 0, 255))
    original.paste((255, 0, 0), (1000, 500, 1050, 540))
    crop = crop_and_enlarge(original, (1000, 500, 1050, 540), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert crop.size == overview_size(50, 40)
    assert crop.width * crop.height >= MIN_PIXELS * 0.9  # a 50x40 crop is enlarged to about min_pixels
    colours = {colour for _, colour in crop.getcolors(maxcolors=16)}
    assert colours == {(255, 0, 0)}  # NEAREST: no blending with the surrounding blue


@pytest.mark.parametrize(
    "box",
    [(0, 0, 4001, 10), (10, 10, 5, 20), (0.0, 0, 10, 10), (True, 0, 10, 10), (0, 0, 10)],
    ids=["outside", "reversed", "float", "bool", "three-values"],
)
def test_crop_and_enlarge_rejects_boxes_that_are_not_integer_boxes_inside_the_original(box):
    with pytest.raises(ValueError, match="crop box"):
        crop_and_enlarge(Image.new("RGB", (4000, 3000)), box, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
