"""Control adherence on the fill50k task, measured on images alone.

A fill50k condition is a thin circle outline; a generated image should hold a
disk of the prompted fill colour exactly inside it, on the prompted background.
Three numbers per sample:

- `iou`: intersection over union of the generated circle's mask and the disk
  the condition outline encloses. Both are found from pixels only:
  the disk from the outline (`enclosed_disk`), the circle by splitting the
  image into its background colour (the colour of most of its border) and the
  rest (`foreground_mask`). An image with no second colour has an empty mask
  (IoU 0).
- `fill_ok` / `background_ok`: whether the mean colour of the mask (of the
  rest) is nearest, among the palette, to the colour the prompt names.
- `roundness`: IoU of the mask with the disk of the same area and centroid: 1
  for a crisp disk anywhere, low for blobs. It measures a base model's
  circles without any condition.

All functions take uint8 RGB arrays (H, W, 3) (conditions may also be
(H, W) or (H, W, 1)) and are plain NumPy, independent of the model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

from cn_jax.data.fill50k import PALETTE

# A mask needs its colour this far (RGB distance, 0..441) from the background's
# to count as a circle: below it the image is one flat colour plus noise.
MIN_CONTRAST = 48.0
_PROMPT = re.compile(r"^\s*(?P<fill>.+?) circle with (?P<background>.+?) background\s*$")


def parse_prompt(prompt: str, palette: Mapping[str, Sequence[int]] = PALETTE) -> tuple[str, str]:
    """ "red circle with navy blue background" -> ("red", "navy blue").

    Raises:
      ValueError: the prompt is not of that form or names a colour not in `palette`.
    """
    m = _PROMPT.match(prompt)
    if m is None:
        raise ValueError(f"prompt {prompt!r} is not '<colour> circle with <colour> background'")
    fill, background = m.group("fill"), m.group("background")
    for name in (fill, background):
        if name not in palette:
            raise ValueError(f"prompt {prompt!r}: colour {name!r} is not in the palette")
    return fill, background


def _gray(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3:
        a = a.mean(axis=-1)
    if a.ndim != 2:
        raise ValueError(f"expected an image (H, W) or (H, W, C), got shape {np.shape(image)}")
    return a.astype(np.float32)


def _reach_from_border(free: np.ndarray) -> np.ndarray:
    """Pixels of `free` 4-connected to the image border through `free` pixels."""
    reached = np.zeros_like(free)
    reached[0, :], reached[-1, :] = free[0, :], free[-1, :]
    reached[:, 0], reached[:, -1] = free[:, 0], free[:, -1]
    while True:
        grown = reached.copy()
        grown[1:, :] |= reached[:-1, :]
        grown[:-1, :] |= reached[1:, :]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= free
        if np.array_equal(grown, reached):
            return reached
        reached = grown


def disk_mask(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    """Pixels whose centre (x + 0.5, y + 0.5) lies within `radius` of `center` (x, y)."""
    h, w = shape
    xs, ys = np.arange(w)[None, :] + 0.5, np.arange(h)[:, None] + 0.5
    dist = np.hypot(xs - center[0], ys - center[1])
    return dist <= radius


def enclosed_disk(condition: np.ndarray, threshold: float = 127.5) -> np.ndarray:
    """The disk a circle outline encloses, as a boolean (H, W) mask.

    The outline is every pixel brighter than `threshold`; its inside is what
    the border cannot reach without crossing it. The disk is centred on the
    centroid of outline plus inside, with the outline's mean distance from
    that centre as radius, so a band drawn across the true circle gives back
    that circle (not the circle plus half the band's width). An image with no
    closed outline gives an empty mask.
    """
    outline = _gray(condition) > threshold
    region = ~_reach_from_border(~outline)
    if not outline.any() or region.sum() <= outline.sum():  # nothing inside the line
        return np.zeros_like(outline)
    ys, xs = np.nonzero(region)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    oy, ox = np.nonzero(outline)
    radius = float(np.hypot(ox + 0.5 - cx, oy + 0.5 - cy).mean())
    return disk_mask(outline.shape, (cx, cy), radius)


def foreground_mask(image: np.ndarray, min_contrast: float = MIN_CONTRAST) -> np.ndarray:
    """The pixels that are not the image's background colour, as a boolean (H, W) mask.

    Two-means clustering of the RGB values, started from the median colour of
    the border (the background) and the pixel farthest from it; the cluster
    holding the background seed is the background. Empty when the two colours
    differ by less than `min_contrast`.
    """
    rgb = np.asarray(image, np.float32)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    h, w, _ = rgb.shape
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg = np.median(border, axis=0)
    pixels = rgb.reshape(-1, 3)
    fg = pixels[np.argmax(np.linalg.norm(pixels - bg, axis=1))]
    is_fg = np.zeros(len(pixels), bool)
    for _ in range(20):
        new = np.linalg.norm(pixels - fg, axis=1) < np.linalg.norm(pixels - bg, axis=1)
        if not new.any() or new.all():
            break
        bg, fg = pixels[~new].mean(axis=0), pixels[new].mean(axis=0)
        if np.array_equal(new, is_fg):
            break
        is_fg = new
    if not is_fg.any() or np.linalg.norm(fg - bg) < min_contrast:
        return np.zeros((h, w), bool)
    return is_fg.reshape(h, w)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def roundness(mask: np.ndarray) -> float:
    """IoU of `mask` with the disk of its own area and centroid (0 for an empty mask)."""
    if not mask.any():
        return 0.0
    ys, xs = np.nonzero(mask)
    radius = float(np.sqrt(mask.sum() / np.pi))
    return iou(mask, disk_mask(mask.shape, (xs.mean() + 0.5, ys.mean() + 0.5), radius))


def nearest_colour(rgb: Sequence[float], palette: Mapping[str, Sequence[int]] = PALETTE) -> str:
    """The palette name nearest (Euclidean RGB) to `rgb`."""
    names = list(palette)
    table = np.asarray([palette[n] for n in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(table - np.asarray(rgb, np.float32), axis=1)))]


@dataclasses.dataclass(frozen=True)
class CircleScore:
    """The metrics of one generated image (see the module docstring)."""

    iou: float
    roundness: float
    fill: str | None  # nearest palette colour of the mask; None for an empty mask
    background: str
    fill_ok: bool
    background_ok: bool


def score(image: np.ndarray, condition: np.ndarray, prompt: str) -> CircleScore:
    """Score one generated uint8 RGB `image` against its `condition` and `prompt`."""
    want_fill, want_bg = parse_prompt(prompt)
    rgb = np.asarray(image)
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {rgb.dtype}")
    mask = foreground_mask(rgb)
    target = enclosed_disk(condition)
    if target.shape != mask.shape:
        raise ValueError(f"image {mask.shape} and condition {target.shape} sizes differ")
    fill = nearest_colour(rgb[mask].mean(axis=0)) if mask.any() else None
    bg_pixels = rgb[~mask] if (~mask).any() else rgb.reshape(-1, 3)
    background = nearest_colour(bg_pixels.mean(axis=0))
    return CircleScore(
        iou=iou(mask, target),
        roundness=roundness(mask),
        fill=fill,
        background=background,
        fill_ok=fill == want_fill,
        background_ok=background == want_bg,
    )


def score_batch(
    images: Sequence[np.ndarray], conditions: Sequence[np.ndarray], prompts: Sequence[str]
) -> dict[str, float]:
    """Mean metrics over a batch: iou, roundness, colour_adherence (fill colour
    right), background_adherence."""
    if not (len(images) == len(conditions) == len(prompts)) or len(images) == 0:
        raise ValueError(
            f"need as many images ({len(images)}) as conditions ({len(conditions)}) and "
            f"prompts ({len(prompts)}), at least one"
        )
    scores = [score(i, c, p) for i, c, p in zip(images, conditions, prompts, strict=True)]
    return {
        "iou": float(np.mean([s.iou for s in scores])),
        "roundness": float(np.mean([s.roundness for s in scores])),
        "colour_adherence": float(np.mean([s.fill_ok for s in scores])),
        "background_adherence": float(np.mean([s.background_ok for s in scores])),
    }
