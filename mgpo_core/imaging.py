"""Image I/O and the size rules of MGPO: open any file safely as upright RGB, and resize overviews and crops
to the exact ``W_in x H_in`` the model sees (METHOD.md §1.1 and §1.5)."""

from __future__ import annotations

import math
import os
import threading
import warnings
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_ERROR_REASONS",
    "PROCESSOR_MAX_PIXELS",
    "PROCESSOR_MIN_PIXELS",
    "ImageError",
    "crop_and_enlarge",
    "image_size",
    "model_max_pixels",
    "open_image",
    "overview_area_bound",
    "overview_size",
    "resize_for_model",
    "smart_resize",
    "to_rgb",
    "visual_tokens",
]

#: The codes an :class:`ImageError` may carry in ``reason``.
IMAGE_ERROR_REASONS = ("missing", "empty_file", "too_many_pixels", "unreadable", "truncated", "bad_size")

#: Limits of Qwen2.5-VL's image processor, applied after the paper's own min/max-pixel rule.
PROCESSOR_MIN_PIXELS = 56 * 56
PROCESSOR_MAX_PIXELS = 14 * 14 * 4 * 16384  # 12,845,056

Resample = Literal["nearest", "bilinear", "bicubic", "lanczos"]
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# EXIF orientation -> the transpose that makes the image upright (same table as ImageOps.exif_transpose).
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

# Serialises our header reads: the warnings filter is process-global, and the rare path that lifts Pillow's
# own bomb limit must not race with itself.
_HEADER_LOCK = threading.Lock()

_DECODE_ERRORS = (OSError, EOFError, SyntaxError, ValueError, zlib.error, IndexError)


class ImageError(ValueError):
    """An image file that cannot be used; ``reason`` is one of :data:`IMAGE_ERROR_REASONS`."""

    def __init__(self, reason: str, path: str | os.PathLike[str], detail: str, fix: str) -> None:
        self.reason = reason
        self.path = str(path)
        self.detail = detail
        self.fix = fix
        super().__init__(f"{detail} [{reason}] in {self.path!r}; {fix}")

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str, str, str]]:
        # Exceptions cross process boundaries (task runners, data-loader workers) by pickling.
        return (type(self), (self.reason, self.path, self.detail, self.fix))


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageError(
            "missing", path, "image file does not exist", "check the data root and the row's path"
        )
    if not path.is_file():
        raise ImageError("unreadable", path, "path is not a regular file", "point the row at an image file")
    if path.stat().st_size == 0:
        raise ImageError("empty_file", path, "image file is empty (0 bytes)", "re-download or drop the row")


def _open_header(path: Path, max_image_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse bombs before any pixel is decoded.

    Pillow's global ``MAX_IMAGE_PIXELS`` is left alone: its warning is silenced because we apply our own
    limit, and its hard error (at twice its limit) is only bypassed, under a lock and restored at once, when
    the caller asked for a limit above Pillow's.
    """
    try:
        with _HEADER_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(path)
            except Image.DecompressionBombError:
                pillow_limit = Image.MAX_IMAGE_PIXELS
                if pillow_limit is None or max_image_pixels < 2 * pillow_limit:
                    raise
                Image.MAX_IMAGE_PIXELS = None
                try:
                    image = Image.open(path)
                finally:
                    Image.MAX_IMAGE_PIXELS = pillow_limit
    except Image.DecompressionBombError as err:
        raise ImageError(
            "too_many_pixels",
            path,
            f"image declares more than {max_image_pixels:,} pixels ({err})",
            "drop the row (possible decompression bomb) or raise max_image_pixels",
        ) from err
    except (Image.UnidentifiedImageError, *_DECODE_ERRORS) as err:
        raise ImageError(
            "unreadable",
            path,
            f"not a readable image ({type(err).__name__}: {err})",
            "re-encode the file as PNG/JPEG or drop the row",
        ) from err
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise ImageError(
            "bad_size", path, f"image declares size {width}x{height}", "re-encode or drop the row"
        )
    if width * height > max_image_pixels:
        image.close()
        raise ImageError(
            "too_many_pixels",
            path,
            f"image declares {width}x{height} = {width * height:,} pixels "
            f"> max_image_pixels={max_image_pixels:,}",
            "drop the row (possible decompression bomb) or raise max_image_pixels",
        )
    return image


def _header_orientation(image: Image.Image) -> int:
    """EXIF orientation 1..8 read from the header alone (1 when absent or unreadable).

    ``Image.Image.getexif`` is called on the base class on purpose: PNG's override decodes the whole image
    to look for a trailing eXIf chunk, and :func:`image_size` must agree with :func:`open_image` without
    decoding.
    """
    try:
        orientation = Image.Image.getexif(image).get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # broken EXIF must not cost us the pixels; treat as upright
        return 1
    return orientation if isinstance(orientation, int) and orientation in _ORIENTATION_FIX else 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as 8-bit RGB: transparency composited on white, 16-bit and float data scaled.

    ``I;16*`` is divided by 257; ``I`` is taken as 16-bit when its maximum exceeds 255; ``F`` is taken as 0..1
    when its maximum is at most 1, else clipped to 0..255 (NaN becomes 0). Nothing saturates to white.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        data = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(data.max()) if data.size else 0.0
        if mode.startswith("I;16") or (mode == "I" and peak > 255):
            data = np.clip(data, 0, 65535) / 257.0
        elif mode == "F" and peak <= 1.0:
            data = data * 255.0
        gray = np.clip(np.rint(data), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if "A" in mode or "a" in mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(
            f"cannot convert image mode {mode!r} to RGB ({err}); re-encode the file as RGB"
        ) from err


def open_image(
    path: str | os.PathLike[str], *, max_image_pixels: int = 100_000_000, load: bool = True
) -> Image.Image:
    """Open ``path`` as an upright RGB image, refusing bombs from the header before decoding.

    With ``load=False`` the header is checked and the lazily opened file is returned as is (original mode, no
    EXIF rotation, pixels not decoded): for callers that need metadata or decide before paying the decode.

    Raises:
        ImageError: with ``reason`` in :data:`IMAGE_ERROR_REASONS`.
    """
    file = Path(path)
    _check_file(file)
    image = _open_header(file, max_image_pixels)
    if not load:
        return image
    orientation = _header_orientation(image)
    try:
        image.load()
    except _DECODE_ERRORS as err:
        image.close()
        truncated = isinstance(err, EOFError) or "truncated" in str(err).lower()
        if truncated:
            raise ImageError(
                "truncated", file, f"image data ends early ({err})", "re-download the file or drop the row"
            ) from err
        raise ImageError(
            "unreadable",
            file,
            f"pixel data cannot be decoded ({type(err).__name__}: {err})",
            "re-encode the file or drop the row",
        ) from err
    fixed = image.transpose(_ORIENTATION_FIX[orientation]) if orientation != 1 else image
    try:
        rgb = to_rgb(fixed)
    except ValueError as err:
        raise ImageError("unreadable", file, str(err), "re-encode the file as RGB or drop the row") from err
    if rgb is not image:
        image.close()
    return rgb


def image_size(path: str | os.PathLike[str], *, max_image_pixels: int = 100_000_000) -> tuple[int, int]:
    """Upright ``(width, height)`` from the header (sides swapped for EXIF orientations 5-8); never decodes.

    Raises:
        ImageError: as :func:`open_image` (except ``truncated``, which only decoding can reveal).
    """
    file = Path(path)
    _check_file(file)
    with _open_header(file, max_image_pixels) as image:
        width, height = image.size
        if _header_orientation(image) >= 5:
            width, height = height, width
    return width, height


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = PROCESSOR_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2.5-VL's processor rule: ``(h, w)`` multiples of ``factor`` near the input, area in [min, max].

    Each side is rounded to the nearest multiple of ``factor`` (at least ``factor``); if the area then exceeds
    ``max_pixels`` both sides shrink by the same ratio and round down, if below ``min_pixels`` they grow and
    round up.

    Raises:
        ValueError: non-positive sizes, or an aspect ratio above 200 (the model cannot take it).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize needs positive sizes, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} of {width}x{height} exceeds 200; "
            "crop or pad the image before feeding it to the model"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def overview_size(
    width: int,
    height: int,
    *,
    min_pixels: int = 256 * 28 * 28,
    max_pixels: int = 1280 * 28 * 28,
    factor: int = 28,
) -> tuple[int, int]:
    """The reference two-step size ``(W_in, H_in)`` of an image the model sees (METHOD.md §1.1).

    Step 1 scales by ``sqrt(limit / area)`` and truncates with ``int()`` when the area is above ``max_pixels``
    (then, on the new size, when below ``min_pixels``); step 2 is :func:`smart_resize` with the processor's
    wide limits.
    Example: 3840x2160 -> 1335x751 -> (1344, 756), i.e. 1296 visual tokens.

    Raises:
        ValueError: non-positive sizes or limits, ``min_pixels > max_pixels``, or aspect ratio above 200.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"overview_size needs a positive image size, got {width}x{height}")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(
            f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}"
        )
    w, h = width, height
    if w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        # max(1, ...) keeps an extreme aspect ratio from truncating a side to 0; smart_resize then rejects it.
        w, h = max(1, int(w * scale)), max(1, int(h * scale))
    if w * h < min_pixels:
        scale = math.sqrt(min_pixels / (w * h))
        w, h = max(1, int(w * scale)), max(1, int(h * scale))
    h_in, w_in = smart_resize(
        h, w, factor=factor, min_pixels=PROCESSOR_MIN_PIXELS, max_pixels=PROCESSOR_MAX_PIXELS
    )
    return w_in, h_in


def overview_area_bound(max_pixels: int, factor: int = 28, max_ratio: int = 200) -> int:
    """An upper bound on the area :func:`overview_size` can return under ``max_pixels``.

    Step 2 rounds each side to the nearest multiple of ``factor`` (at least ``factor``) with the processor's wide
    limits, so an output may exceed ``max_pixels``: 71x602 under 64·28² becomes 84x616, 3 % over. A second
    resizer that caps at ``max_pixels`` (vLLM's processor) would shrink it again, to 56x588; give it this bound
    instead. After step 1 ``w·h <= max(max_pixels, min_pixels)`` with ``w/h <= max_ratio``, and each side grows by
    at most ``factor / 2``, or to ``factor`` when shorter than that.
    """
    if max_pixels <= 0:
        raise ValueError(f"overview_area_bound needs a positive max_pixels, got {max_pixels}")
    long_side = math.sqrt(max_pixels * max_ratio)
    half = factor / 2
    rounded = max_pixels + half * (long_side + math.sqrt(max_pixels / max_ratio)) + half * half
    thin = factor * (long_side + half)  # the short side rounded up to one factor
    return math.ceil(max(rounded, thin))


def visual_tokens(w_in: int, h_in: int, factor: int = 28) -> int:
    """Number of visual tokens of a ``w_in x h_in`` model input (one per ``factor x factor`` merged patch)."""
    if w_in <= 0 or h_in <= 0 or w_in % factor or h_in % factor:
        raise ValueError(
            f"{w_in}x{h_in} is not a positive multiple of {factor} per side; pass sizes from overview_size"
        )
    return (w_in // factor) * (h_in // factor)


def _resample(name: str) -> Image.Resampling:
    try:
        return _RESAMPLE[name]
    except KeyError:
        raise ValueError(f"unknown resample {name!r}; use one of {sorted(_RESAMPLE)}") from None


def resize_for_model(
    image: Image.Image, *, min_pixels: int, max_pixels: int, resample: Resample = "bicubic"
) -> Image.Image:
    """Resize ``image`` in one step to its :func:`overview_size` (the size the model sees)."""
    method = _resample(resample)
    size = overview_size(image.width, image.height, min_pixels=min_pixels, max_pixels=max_pixels)
    return image.resize(size, method)


def crop_and_enlarge(
    original: Image.Image,
    box_ori: tuple[int, int, int, int],
    *,
    min_pixels: int,
    max_pixels: int,
    resample: Resample = "nearest",
) -> Image.Image:
    """Crop the ORIGINAL image at integer pixel box ``(x1, y1, x2, y2)`` and resize it like an overview.

    Small crops are thereby enlarged to about ``min_pixels``; NEAREST is the reference's resampling here.

    Raises:
        ValueError: a box that is not 4 ints with ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``.
    """
    method = _resample(resample)
    if len(box_ori) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in box_ori):
        raise ValueError(
            f"crop box must be 4 ints (x1, y1, x2, y2), got {box_ori!r}; use map_box_to_original"
        )
    x1, y1, x2, y2 = box_ori
    if not (0 <= x1 < x2 <= original.width and 0 <= y1 < y2 <= original.height):
        raise ValueError(
            f"crop box {box_ori} is empty or outside the {original.width}x{original.height} original; "
            "map a validated box with map_box_to_original"
        )
    crop = original.crop(box_ori)
    size = overview_size(crop.width, crop.height, min_pixels=min_pixels, max_pixels=max_pixels)
    return crop.resize(size, method)


def model_max_pixels(image_processor: object) -> int:
    """The largest image (in pixels) the model's processor accepts without downscaling it again.

    Qwen2-VL-family processors keep it as ``max_pixels`` or in ``size["longest_edge"]`` (a pixel count despite
    its name); 12,845,056 (16,384 visual tokens) when neither is set.
    """
    value = getattr(image_processor, "max_pixels", None)
    if not value:
        size = getattr(image_processor, "size", None)
        value = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    return int(value) if value else PROCESSOR_MAX_PIXELS
