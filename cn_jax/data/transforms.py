"""Decode, resize, crop and normalise one (image, condition) training pair.

The pipeline for one sample, in the order it is applied:

1. decode both images (a file path, encoded bytes, a `datasets.Image` dict, a PIL image
   or an array) by `decode_planes`, target as RGB, condition as RGB or L, each on its own
   range: an 8-bit image stays one 8-bit PIL image (converted exactly as PIL does), a 16-bit
   PNG / uint16 array is divided by 65535 into float planes (PIL's own `convert("RGB")`
   would clip every value above 255: a depth gradient would read 0, 1, 1, 1, ...);
2. if the condition's size differs from the target's, resize the condition to exactly the
   target's size (aspect ratio is *not* preserved). A condition is a pixel-aligned map of its
   image (edges, depth, pose), so after this step the two share one coordinate frame and one
   crop box fits both; a condition stored at another resolution (a 512 px canny map for a
   1024 px photo) is the common case this handles;
3. resize so the shorter side equals `resolution` (bicubic; smaller images are upscaled);
4. crop `resolution` x `resolution`, at the offset given as fractions of the slack (0.5, 0.5
   is the centre crop), then optionally flip horizontally, with the *same* box and flip for
   both images;
5. target to float32 in [-1, 1] (what the VAE encodes), condition to float32 in [0, 1]
   (what the ControlNet's condition encoder takes), both HWC.

`image_to_float` is the same decoding for one image, straight to float32 [0, 1] HWC: what
sampling (control images) and `annotate` use.

The random choices (crop offset, flip) are arguments, not drawn here: the loader draws them
deterministically per (seed, epoch, index), so this module is pure and testable.

A file that is missing, unreadable or not a decodable image raises `BadSampleError`, which
names the file (or, for an image held in memory, the row and column).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

# Bicubic for both images: sharper than bilinear when downscaling photos, and the condition
# is usually a line or depth map where bicubic's slight overshoot is clipped away by uint8.
RESAMPLE = Image.Resampling.BICUBIC


class BadSampleError(ValueError):
    """A training sample's image is missing, unreadable or cannot be decoded.

    The message names the file, or the dataset row and column for an image held in memory.
    It subclasses `ValueError` because the problem lies in the data, not in the program.
    """


def describe_source(value: Any, row: int | None = None, column: str | None = None) -> str:
    """A short human description of where an image comes from, for error messages.

    Args:
      value: the image value as stored in a record (path, bytes, dict, PIL image, array).
      row: the dataset row it was read from, if known.
      column: the record column it was read from, if known.

    Returns:
      e.g. ``"'/data/target/3.png' (row 3, image)"`` or ``"row 3, image (in-memory bytes)"``.
    """
    where = ", ".join(p for p in (None if row is None else f"row {row}", column) if p)
    path = _path_of(value)
    if path is not None:
        return f"{path!r}" + (f" ({where})" if where else "")
    kind = type(value).__name__
    return (where + f" (in-memory {kind})") if where else f"in-memory {kind}"


def _path_of(value: Any) -> str | None:
    """The file path an image value refers to, or None for in-memory data."""
    if isinstance(value, str | os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping) and not value.get("bytes") and value.get("path"):
        return str(value["path"])
    return None


# ---------------------------------------------------------------------------------------------
# Decoding: any stored image -> pixels on a known scale
# ---------------------------------------------------------------------------------------------

I_MODE_MAX = 65535
"""The range a PIL mode "I" (32-bit integer) image is read on: 0..65535, i.e. 16-bit. Pillow
opened 16-bit grayscale PNGs as "I" before it had "I;16", and TIFF/PGM 16-bit data still
converts to it; a 32-bit integer has no range of its own, so values outside 0..65535 (negative,
or wider than 16 bits) are refused rather than guessed at."""


def _where(value: Any, row: int | None, column: str | None, source: str | None) -> str:
    """Where an image comes from, for errors: `describe_source`, after an optional label."""
    if source is None:
        return describe_source(value, row, column)
    path = _path_of(value)
    return source + (f" ({path!r})" if path is not None else "")


def _open(value: Any) -> Image.Image | np.ndarray:
    """A stored image as a loaded PIL image, or an ndarray as it is (its dtype is its scale)."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, bytes | bytearray | memoryview):
        img = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, Mapping) and value.get("bytes"):
        img = Image.open(io.BytesIO(value["bytes"]))
    elif (path := _path_of(value)) is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError("file not found")
        img = Image.open(path)
    else:
        raise TypeError(f"unsupported image value of type {type(value).__name__}")
    # Image.open is lazy: load now so a truncated file fails here, inside the caller's try.
    img.load()
    return img


class _RangeError(ValueError):
    """A decoded image whose dtype, shape or values are outside what it may hold."""


def _unit_range(arr: np.ndarray, what: str) -> np.ndarray:
    """A float image, checked to be finite and inside [0, 1], as float32."""
    arr = np.asarray(arr, np.float32)
    if arr.size and not np.isfinite(arr).all():
        raise _RangeError(f"{what} holds NaN or infinite values")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < 0.0 or hi > 1.0:
        raise _RangeError(
            f"{what} holds values in [{lo:g}, {hi:g}]; a float image must lie in [0, 1] "
            "(pass 8-bit values as uint8, 16-bit as uint16)"
        )
    return arr


def _high_depth(raw: Image.Image | np.ndarray) -> np.ndarray | None:
    """Float32 HWC in [0, 1] for a source deeper than 8 bits (or float), None for an 8-bit one.

    Raises:
      ValueError: an unsupported dtype or shape, or values outside the source's range.
    """
    if isinstance(raw, Image.Image):
        mode = raw.mode
        if mode.startswith("I;16"):  # 16-bit grayscale PNG / TIFF, any byte order
            arr = np.asarray(raw)
            if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
                raise _RangeError(f"a mode {mode!r} image holds negative values")
            return (arr.astype(np.float32) / 65535.0)[..., None]
        if mode == "I":
            arr = np.asarray(raw)
            lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
            if lo < 0 or hi > I_MODE_MAX:
                raise _RangeError(
                    f"a mode 'I' image holds values in [{lo}, {hi}]; it is read as 16-bit "
                    f"(0..{I_MODE_MAX}), so save it as a 16-bit PNG or scale it first"
                )
            return (arr.astype(np.float32) / I_MODE_MAX)[..., None]
        if mode == "F":
            return _unit_range(np.asarray(raw), "a mode 'F' image")[..., None]
        return None  # every other mode is 8 bits per channel: PIL converts it exactly
    arr = raw
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4)):
        raise _RangeError(
            f"an array image must be (H, W) or (H, W, C) with C in 1..4; got shape {arr.shape}"
        )
    if arr.dtype in (np.uint8, np.bool_):
        return None
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype.kind == "f":
        return _unit_range(arr, f"a {arr.dtype} array image")
    raise _RangeError(
        f"an array image must be uint8 (0..255), uint16 (0..65535), bool or float in [0, 1]; "
        f"got {arr.dtype} (its range is ambiguous: convert it to one of those)"
    )


def _eight_bit(raw: Image.Image | np.ndarray, channels: int | None) -> Image.Image:
    """An 8-bit source as a PIL "L" or "RGB" image, converted exactly as PIL does."""
    if isinstance(raw, np.ndarray):
        arr = raw.astype(np.uint8) * 255 if raw.dtype == np.bool_ else raw
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    else:
        img = raw
    if channels is None:  # the source's own: gray stays gray, alpha is dropped
        gray = img.mode in ("1", "L", "LA", "La") or (
            img.mode == "P" and img.palette is not None and img.palette.mode == "L"
        )
        channels = 1 if gray else 3
    mode = "L" if channels == 1 else "RGB"
    return img if img.mode == mode else img.convert(mode)


def _float_planes(arr: np.ndarray, channels: int | None) -> list[Image.Image]:
    """Float32 HWC in [0, 1] -> one PIL "F" image per channel, alpha dropped; 3 channels
    become 1 by ITU-R 601 luma (what PIL's convert("L") computes); 1 stays 1 (repeated to
    `channels` only when the pixels are read out, after resizing)."""
    c = arr.shape[-1]
    if c in (2, 4):  # gray + alpha, RGB + alpha: the alpha carries no condition
        arr = arr[..., : c - 1]
    if arr.shape[-1] == 3 and channels == 1:
        arr = arr @ np.asarray([0.299, 0.587, 0.114], np.float32)
        arr = arr[..., None]
    arr = np.ascontiguousarray(arr, np.float32)
    return [Image.fromarray(arr[..., i], "F") for i in range(arr.shape[-1])]


def decode_planes(
    value: Any,
    channels: int | None = None,
    *,
    row: int | None = None,
    column: str | None = None,
    source: str | None = None,
) -> tuple[list[Image.Image], float]:
    """Decode one stored image into PIL images on a known scale, ready to resize and crop.

    8-bit sources (PIL modes 1, L, LA, P, RGB, RGBA, CMYK, YCbCr, ...; uint8 or bool arrays)
    come back as one PIL "L" or "RGB" image converted exactly as PIL's `convert` does, on the
    scale 255. Deeper sources (16-bit PNG/TIFF: modes "I;16", "I;16B", ...; mode "I" read as
    16-bit, see `I_MODE_MAX`; mode "F"; uint16 or float arrays) come back as one float32 PIL
    "F" image per channel on the scale 1, each divided by its *own* range (65535 for 16 bits):
    PIL's `convert("RGB")` would clip every value above 255 instead. Float sources must
    already lie in [0, 1].

    Args:
      value: a file path (`str` / `os.PathLike`), encoded bytes, a `datasets.Image` dict
        ``{"bytes": ..., "path": ...}`` (bytes win when both are set), a PIL image, or an
        array (HW or HWC, C in 1..4: gray, gray + alpha, RGB, RGBA).
      channels: 1 (gray), 3 (RGB), or None for the source's own (gray stays 1, colour 3;
        alpha is always dropped). A 16-bit gray source asked for 3 comes back as one plane,
        repeated by `planes_to_array`.
      row, column: the dataset row and column, named in errors.
      source: a label for errors instead of row/column, e.g. ``"control image 0"``.

    Returns:
      ``(planes, scale)``: the PIL images (one, or one "F" image per channel) and the value
      that stands for full intensity in them (255.0 or 1.0).

    Raises:
      BadSampleError: the file is missing or unreadable, the bytes are not a decodable image,
        or the value has an unsupported type, dtype, shape or range (NaN, infinity, a float
        outside [0, 1], an int64 array). The one-line message names the file, or the row and
        column, or the `source` label.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    try:
        raw = _open(value)
        deep = _high_depth(raw)
        if deep is None:
            return [_eight_bit(raw, channels)], 255.0
        return _float_planes(deep, channels), 1.0
    except BadSampleError:
        raise
    except _RangeError as e:
        raise BadSampleError(f"{_where(value, row, column, source)}: {e}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise BadSampleError(
            f"{_where(value, row, column, source)}: not a readable image ({type(e).__name__}: {e})"
        ) from e


def planes_to_array(planes: list[Image.Image], scale: float, channels: int | None) -> np.ndarray:
    """`decode_planes`' images (after any resize, crop, flip) -> float32 HWC in [0, scale].

    8-bit planes are read exactly (float32 of the uint8 values); float planes are clipped to
    [0, 1] (a bicubic resize overshoots, which uint8 clips on the 8-bit path). One plane asked
    for 3 channels is repeated.
    """
    if scale == 255.0:
        arr = np.asarray(planes[0], dtype=np.float32)
    else:
        arr = np.clip(np.stack([np.asarray(p, np.float32) for p in planes], -1), 0.0, 1.0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if channels is not None and arr.shape[-1] != channels:
        arr = np.repeat(arr, channels, axis=-1)
    return arr


def image_to_float(
    value: Any,
    channels: int | None = None,
    *,
    row: int | None = None,
    column: str | None = None,
    source: str | None = None,
) -> np.ndarray:
    """Any supported image -> float32 (H, W, C) in [0, 1], scaled by the source's own range.

    The one decoder of the project (training data, control images for sampling, `annotate`):
    uint8 / 8-bit PIL modes are divided by 255, uint16 / 16-bit PNG and TIFF ("I;16*") by
    65535, mode "I" by 65535 (values outside 0..65535 refused), float arrays and mode "F" are
    taken as [0, 1] (NaN, infinity or values outside refused). See `decode_planes` for the
    accepted values and channel rules.

    Args:
      value: a path, encoded bytes, a `datasets.Image` dict, a PIL image or an array.
      channels: 1, 3, or None to keep the source's own (1 for gray, 3 for colour).
      row, column: the dataset row and column, named in errors.
      source: a label for errors, e.g. ``"control image 0"``.

    Raises:
      BadSampleError (a ValueError): one line naming the source and what is wrong.
    """
    planes, scale = decode_planes(value, channels, row=row, column=column, source=source)
    arr = planes_to_array(planes, scale, channels)
    return arr / np.float32(255.0) if scale == 255.0 else arr


def resize_float(
    image: np.ndarray, size: tuple[int, int], resample: Image.Resampling = Image.Resampling.LANCZOS
) -> np.ndarray:
    """Resize a float32 (H, W, C) image in [0, 1] to `size` (H, W) without quantising it:
    each channel as a PIL "F" image, the result clipped to [0, 1]."""
    image = np.asarray(image, np.float32)
    planes = [
        Image.fromarray(np.ascontiguousarray(image[..., i]), "F") for i in range(image.shape[-1])
    ]
    planes = [p.resize((size[1], size[0]), resample) for p in planes]
    return planes_to_array(planes, 1.0, image.shape[-1])


def decode_image(
    value: Any, mode: str, row: int | None = None, column: str | None = None
) -> Image.Image:
    """Decode one stored image into a fully loaded 8-bit PIL image of the given mode.

    Args:
      value: any value `decode_planes` accepts.
      mode: "RGB" or "L".
      row: the dataset row, named in errors.
      column: the record column, named in errors.

    Returns:
      A PIL image in `mode`. An 8-bit source is converted exactly as PIL does; a deeper one
      (16-bit, float) is scaled by its own range and rounded to 8 bits, never clipped.

    Raises:
      BadSampleError: as `decode_planes`.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    channels = 3 if mode == "RGB" else 1
    planes, scale = decode_planes(value, channels, row=row, column=column)
    if scale == 255.0:
        return planes[0]
    u8 = np.rint(planes_to_array(planes, scale, channels) * 255).astype(np.uint8)
    return Image.fromarray(u8[..., 0] if channels == 1 else u8, mode)


def resize_shorter_side(img: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is exactly `resolution`, keeping the aspect ratio.

    Images already at that size are returned as they are; smaller ones are upscaled.
    """
    if min(img.size) == resolution:
        return img
    return img.resize(resized_size(img.size, resolution), RESAMPLE)


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) after `resize_shorter_side`."""
    w, h = size
    if min(w, h) == resolution:
        return w, h
    scale = resolution / min(w, h)
    # The shorter side is set exactly; the longer one rounded but never below resolution.
    new_w = resolution if w <= h else max(resolution, round(w * scale))
    new_h = resolution if h < w else max(resolution, round(h * scale))
    return new_w, new_h


def size_numbers(
    size: tuple[int, int], resolution: int, crop: tuple[float, float], flip: bool
) -> np.ndarray:
    """SDXL's six size numbers of a training sample, float32: the original image's
    (height, width), the crop's (top, left) in the resized image (as seen after the flip:
    a flipped crop's left edge is measured from the flipped image's left), and the target
    (resolution, resolution). What the SDXL paper conditions on and diffusers'
    `train_text_to_image_sdxl.py` computes (its flipped left is off by the crop's width).

    Args:
      size: (width, height) of the stored target image.
      resolution, crop, flip: the transform's arguments (`preprocess_pair`).
    """
    w, h = size
    rw, rh = resized_size(size, resolution)
    left, top, right, _ = crop_box((rw, rh), resolution, crop)
    if flip:
        left = rw - right
    return np.asarray([h, w, top, left, resolution, resolution], np.float32)


def crop_box(
    size: tuple[int, int], resolution: int, crop: tuple[float, float]
) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of a `resolution` square inside an image of `size`.

    Args:
      size: (width, height) of the resized image, both >= resolution.
      resolution: the side of the square.
      crop: (x, y) fractions in [0, 1] of the slack on each axis; (0.5, 0.5) centres it.
    """
    w, h = size
    fx, fy = crop
    if not (0.0 <= fx <= 1.0 and 0.0 <= fy <= 1.0):
        raise ValueError(f"crop fractions must lie in [0, 1], got {crop}")
    # floor(f * slack + 0.5): round half up, so the centre crop is the same on every platform.
    left = math.floor(fx * (w - resolution) + 0.5)
    top = math.floor(fy * (h - resolution) + 0.5)
    return left, top, left + resolution, top + resolution


def preprocess_pair(
    image: Any,
    conditioning_image: Any,
    resolution: int,
    *,
    conditioning_channels: int = 3,
    crop: tuple[float, float] = (0.5, 0.5),
    flip: bool = False,
    row: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn one stored (image, condition) pair into model-ready float32 arrays.

    Args:
      image: the target image (any value `decode_planes` accepts).
      conditioning_image: the condition image, pixel-aligned with `image`.
      resolution: the side of the square output.
      conditioning_channels: 3 (RGB condition) or 1 (grayscale, L).
      crop: crop offset as fractions of the slack, (0.5, 0.5) = centre crop.
      flip: flip both horizontally.
      row: the dataset row, named in errors.

    Returns:
      ``(pixels, condition)``: float32 arrays of shape (R, R, 3) in [-1, 1] and (R, R, C) in
      [0, 1].

    Raises:
      BadSampleError: either image cannot be decoded (the message names which).
      ValueError: `conditioning_channels` is not 1 or 3.
    """
    img, img_scale, cond, cond_scale = _pair_planes(
        image, conditioning_image, resolution, conditioning_channels, crop, flip, row
    )
    # Written as the 8-bit formulas (x / 127.5 - 1, x / 255) so 8-bit results stay bit-exact.
    pixels = planes_to_array(img, img_scale, 3) / np.float32(img_scale / 2) - 1.0
    condition = planes_to_array(cond, cond_scale, conditioning_channels) / np.float32(cond_scale)
    return pixels, condition


def _pair_planes(
    image, conditioning_image, resolution, conditioning_channels, crop, flip, row, target=True
):
    """Steps 1-4 of the module docstring: both images decoded, aligned, resized, cropped and
    flipped alike, as PIL planes with their scales (see `decode_planes`). With
    ``target=False`` only the target's size is read (its header), not its pixels: the
    condition's geometry is the same, and the image planes come back empty."""
    if conditioning_channels not in (1, 3):
        raise ValueError(f"conditioning_channels must be 1 or 3, got {conditioning_channels}")
    if target:
        img, img_scale = decode_planes(image, 3, row=row, column="image")
        size = img[0].size
    else:
        img, img_scale, size = [], 255.0, image_size(image, row=row, column="image")
    cond, cond_scale = decode_planes(
        conditioning_image, conditioning_channels, row=row, column="conditioning_image"
    )
    # Geometry acts on every plane alike: one 8-bit PIL image, or one float plane per channel.
    if cond[0].size != size:
        cond = [p.resize(size, RESAMPLE) for p in cond]
    img = [resize_shorter_side(p, resolution) for p in img]
    cond = [resize_shorter_side(p, resolution) for p in cond]
    box = crop_box(cond[0].size, resolution, crop)  # the condition now has the image's size
    img, cond = [p.crop(box) for p in img], [p.crop(box) for p in cond]
    if flip:
        img = [p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in img]
        cond = [p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in cond]
    return img, img_scale, cond, cond_scale


def image_size(value: Any, *, row: int | None = None, column: str | None = None) -> tuple:
    """(width, height) of a stored image, from its header only where it is encoded.

    Raises:
      BadSampleError: as `decode_planes`, for a missing or unreadable file.
    """
    try:
        if isinstance(value, np.ndarray):
            return (value.shape[1], value.shape[0])
        if isinstance(value, Image.Image):
            return value.size
        if isinstance(value, bytes | bytearray | memoryview):
            value = {"bytes": bytes(value)}
        if isinstance(value, Mapping) and value.get("bytes"):
            with Image.open(io.BytesIO(value["bytes"])) as img:
                return img.size
        path = _path_of(value)
        if path is None:
            raise TypeError(f"unsupported image value of type {type(value).__name__}")
        if not os.path.isfile(path):
            raise FileNotFoundError("file not found")
        with Image.open(path) as img:
            return img.size
    except Exception as e:
        raise BadSampleError(
            f"{_where(value, row, column, None)}: not a readable image ({type(e).__name__}: {e})"
        ) from e


TRANSPORT_DTYPES = (np.uint8, np.uint16)


def planes_to_int(planes: list[Image.Image], scale: float, channels: int, dtype) -> np.ndarray:
    """`decode_planes`' images (after geometry) -> (H, W, channels) `dtype` pixels for
    transport: uint8 on 0..255 or uint16 on 0..65535. An 8-bit image is exact in both (v, or
    v * 257, which the step maps to the same float as v / 255); float planes are rounded to
    the nearest step of the dtype (to uint8 only if asked: a 16-bit source then loses its low
    bits, see `Loader`)."""
    dtype = np.dtype(dtype)
    if scale == 255.0:
        arr = np.asarray(planes[0], np.uint8)
        arr = arr if dtype == np.uint8 else arr.astype(np.uint16) * np.uint16(257)
    else:
        top = 255.0 if dtype == np.uint8 else 65535.0
        arr = np.rint(planes_to_array(planes, 1.0, None) * np.float32(top)).astype(dtype)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[-1] != channels:
        arr = np.repeat(arr, channels, axis=-1)
    return arr


def preprocess_pair_pixels(
    image: Any,
    conditioning_image: Any,
    resolution: int,
    *,
    conditioning_channels: int = 3,
    crop: tuple[float, float] = (0.5, 0.5),
    flip: bool = False,
    row: int | None = None,
    image_dtype=np.uint8,
    condition_dtype=np.uint8,
    target: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, bool]:
    """`preprocess_pair` as integer pixels, what the loader sends to the device (the train
    step maps them to the model's float ranges: `cn_jax.train.step.image_to_model_range`).

    Returns:
      ``(pixels, condition, quantised)``: (R, R, 3) `image_dtype` and (R, R, C)
      `condition_dtype` arrays, and whether a source deeper than 8 bits was rounded to uint8.
      With ``target=False`` the target is not decoded (only its size read: what cached
      latents need) and `pixels` is None.
    """
    img, img_scale, cond, cond_scale = _pair_planes(
        image, conditioning_image, resolution, conditioning_channels, crop, flip, row, target
    )
    pixels = planes_to_int(img, img_scale, 3, image_dtype) if target else None
    condition = planes_to_int(cond, cond_scale, conditioning_channels, condition_dtype)
    quantised = (img_scale != 255.0 and np.dtype(image_dtype) == np.uint8) or (
        cond_scale != 255.0 and np.dtype(condition_dtype) == np.uint8
    )
    return pixels, condition, quantised


def source_is_deep(value: Any) -> bool:
    """Whether a stored image is deeper than 8 bits (16-bit, mode I/F, uint16/float arrays);
    False for an unreadable one (the loader reports it where it is used)."""
    try:
        return decode_planes(value)[1] != 255.0
    except BadSampleError:
        return False


def to_uint8(images: np.ndarray, low: float = -1.0) -> np.ndarray:
    """Float images in [low, 1] (NHWC or HWC) back to uint8 RGB, the inverse of
    `preprocess_pair`: low=-1 for model images, low=0 for conditions; a 1-channel
    image is repeated to 3."""
    x = (np.asarray(images, np.float32) - low) / (1.0 - low)
    x = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
