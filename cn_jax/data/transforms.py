"""Decode, resize, crop and normalise one (image, condition) training pair.

The pipeline for one sample, in the order it is applied:

1. decode both images (a file path, encoded bytes, a `datasets.Image` dict, a PIL image
   or a uint8 array) into PIL, target as RGB, condition as RGB or L;
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


def decode_image(
    value: Any, mode: str, row: int | None = None, column: str | None = None
) -> Image.Image:
    """Decode one stored image into a fully loaded PIL image of the given mode.

    Args:
      value: a file path (`str` / `os.PathLike`), encoded bytes, a `datasets.Image` dict
        ``{"bytes": ..., "path": ...}`` (bytes win when both are set), a PIL image, or a uint8
        array (HW or HWC).
      mode: the PIL mode to convert to: "RGB" or "L".
      row: the dataset row, named in errors.
      column: the record column, named in errors.

    Returns:
      A PIL image in `mode`, with its pixels loaded (so later errors cannot surface lazily).

    Raises:
      BadSampleError: the file is missing or unreadable, the bytes are not a decodable image
        (corrupt or truncated), or the value has an unsupported type. The message names the
        file, or the row and column.
    """
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, np.ndarray):
            if value.dtype != np.uint8 or value.ndim not in (2, 3):
                raise TypeError(
                    f"an array image must be uint8 HW or HWC, got {value.dtype} "
                    f"with shape {value.shape}"
                )
            img = Image.fromarray(value)
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
        # Image.open is lazy: load now so a truncated file fails here, inside the try.
        img.load()
        if img.mode != mode:
            img = img.convert(mode)
        return img
    except BadSampleError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise BadSampleError(
            f"{describe_source(value, row, column)}: cannot decode image: {type(e).__name__}: {e}"
        ) from e


def resize_shorter_side(img: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is exactly `resolution`, keeping the aspect ratio.

    Images already at that size are returned as they are; smaller ones are upscaled.
    """
    w, h = img.size
    if min(w, h) == resolution:
        return img
    scale = resolution / min(w, h)
    # The shorter side is set exactly; the longer one rounded but never below resolution.
    new_w = resolution if w <= h else max(resolution, round(w * scale))
    new_h = resolution if h < w else max(resolution, round(h * scale))
    return img.resize((new_w, new_h), RESAMPLE)


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
      image: the target image (any value `decode_image` accepts).
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
    if conditioning_channels not in (1, 3):
        raise ValueError(f"conditioning_channels must be 1 or 3, got {conditioning_channels}")
    img = decode_image(image, "RGB", row, "image")
    cond = decode_image(
        conditioning_image, "RGB" if conditioning_channels == 3 else "L", row, "conditioning_image"
    )
    if cond.size != img.size:
        cond = cond.resize(img.size, RESAMPLE)
    img = resize_shorter_side(img, resolution)
    cond = resize_shorter_side(cond, resolution)
    box = crop_box(img.size, resolution, crop)
    img, cond = img.crop(box), cond.crop(box)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        cond = cond.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    condition = np.asarray(cond, dtype=np.float32) / 255.0
    if condition.ndim == 2:
        condition = condition[:, :, None]
    return pixels, condition


def to_uint8(images: np.ndarray, low: float = -1.0) -> np.ndarray:
    """Float images in [low, 1] (NHWC or HWC) back to uint8 RGB, the inverse of
    `preprocess_pair`: low=-1 for model images, low=0 for conditions; a 1-channel
    image is repeated to 3."""
    x = (np.asarray(images, np.float32) - low) / (1.0 - low)
    x = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
