"""Condition-image annotators in pure JAX: canny, scribble, content shuffle, tile, grayscale.

A ControlNet is trained and sampled on a *condition image* computed from a photograph: its
edges, a binarised sketch, a warped copy, a blurred copy. The original ControlNet apps compute
these with OpenCV on the host; here they are `jax.numpy` functions, so they can run inside a
jitted data or sampling program, on a batch, on any device::

    edges = canny(images)                                  # (B, H, W, 3) uint8 -> (B, H, W, 1)
    edges = jax.jit(canny)(images, 50, 150)                # thresholds may be traced
    cond = annotate("canny", photo_hwc, low_threshold=100, high_threshold=200)  # CLI helper

Shapes: an image is ``(H, W)`` (grayscale) or ``(..., H, W, C)``; any leading dimensions are
batch dimensions and every image of a batch is processed independently (``jax.vmap`` works too).
Annotators that produce one channel (canny, scribble, grayscale) return ``(H, W)`` for an
``(H, W)`` input and ``(..., H, W, 1)`` otherwise; a batch of grayscale images is therefore
``(B, H, W, 1)``, not ``(B, H, W)``.

`canny` reproduces ``cv2.Canny(image, low, high)`` (aperture 3, L1 gradient: how the ControlNet
apps call it) step by step in integer arithmetic, including its handling of colour input (the
gradient of the channel with the largest magnitude, not a grayscale conversion), its border
rules and its ``>`` / ``>=`` tie-breaking; on photographs it agrees with OpenCV pixel for pixel
(see ``tests/test_annotators.py``). The other annotators follow the ControlNet / diffusers
preprocessors named in their docstrings.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cn_jax.data.transforms import image_to_float

# ---------------------------------------------------------------------------------------------
# Shapes and dtypes
# ---------------------------------------------------------------------------------------------


def _as_hwc(images: jax.Array) -> tuple[jax.Array, bool]:
    """View `images` as ``(..., H, W, C)``; the flag says whether the input was ``(H, W)``."""
    images = jnp.asarray(images)
    if images.ndim == 2:
        return images[..., None], True
    if images.ndim < 2:
        raise ValueError(f"an image must be (H, W) or (..., H, W, C); got shape {images.shape}")
    return images, False


def _single_channel_out(x: jax.Array, was_hw: bool) -> jax.Array:
    """``(..., H, W)`` -> ``(H, W)`` for an ``(H, W)`` input, else ``(..., H, W, 1)``."""
    return x if was_hw else x[..., None]


def _is_int(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_


def _cast_like(x: jax.Array, dtype: Any) -> jax.Array:
    """Float result back to the input dtype; integer images are rounded and clipped like cv2."""
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return jnp.clip(jnp.round(x), info.min, info.max).astype(dtype)
    return x.astype(dtype)


def _to_unit_float(x: jax.Array) -> jax.Array:
    """uint8 (0..255) or bool -> float32 in [0, 1]; floats are taken to be in [0, 1] already."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.float32)
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x.astype(jnp.float32) / 255.0
    return x.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Canny
# ---------------------------------------------------------------------------------------------

# cv2's fixed-point tan(22.5 deg): round(0.41421356 * 2**15). Its sector tests compare
# |dy| << 15 against |dx| * TG22, so they are exact integer comparisons; we do the same rather
# than compute an angle, which would flip the sector of pixels lying exactly on a boundary.
_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)
# Dilation steps per convergence test in the hysteresis loop. The test is a reduction over
# the whole batch (and, on GPUs, a device-to-host copy per iteration), so several steps share
# one; more steps unroll more code (compile time grows, run time barely changes past ~4).
_HYSTERESIS_STEPS = 4


def _shift_pad(x: jax.Array, mode: str, value: Any = 0) -> jax.Array:
    """Pad the H and W axes of ``(..., H, W)`` by one pixel."""
    widths = [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)]
    if mode == "constant":
        return jnp.pad(x, widths, mode="constant", constant_values=value)
    return jnp.pad(x, widths, mode=mode)


def _neighbours(padded: jax.Array) -> dict[str, jax.Array]:
    """The eight shifted views of a ``(..., H+2, W+2)`` padded map, keyed by compass offset."""
    h, w = padded.shape[-2] - 2, padded.shape[-1] - 2
    view = lambda dy, dx: padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    return {
        "l": view(0, -1),
        "r": view(0, 1),
        "u": view(-1, 0),
        "d": view(1, 0),
        "ul": view(-1, -1),
        "ur": view(-1, 1),
        "dl": view(1, -1),
        "dr": view(1, 1),
    }


def _sobel3(gray: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cv2.Sobel(ksize=3) x and y derivatives of ``(..., H, W)`` int32, BORDER_REPLICATE.

    cv2.Canny computes both derivatives with replicated borders (not Sobel's default
    reflect-101), so a step at the image border still has a gradient.
    """
    p = _shift_pad(gray, "edge")
    n = _neighbours(p)
    dx = (n["ur"] + 2 * n["r"] + n["dr"]) - (n["ul"] + 2 * n["l"] + n["dl"])
    dy = (n["dl"] + 2 * n["d"] + n["dr"]) - (n["ul"] + 2 * n["u"] + n["ur"])
    return dx, dy


def _gaussian_kernel_q8(sigma: float) -> np.ndarray:
    """cv2.GaussianBlur's 8-bit kernel for `sigma`: int64 weights in 1/256ths, summing to 256.

    Same size rule (``round(6 sigma + 1) | 1``), same sampled and normalised Gaussian
    (``getGaussianKernelBitExact``), and the same error-diffused rounding to 8 fractional bits
    (``getGaussianKernelFixedPoint_ED``: round half to even, carrying the rounding error
    outwards-in, the centre taking whatever makes the sum exact).
    """
    n = int(round(sigma * 3 * 2 + 1)) | 1
    half = n // 2
    x = np.arange(1 - n, 0, 2, dtype=np.float64)  # 2 * (i - half), i < half
    side = np.exp(x * x * (-0.125 / (sigma * sigma)))
    k = np.concatenate([side, [1.0], side[::-1]]) / (2.0 * side.sum() + 1.0)
    q = np.zeros(n, np.int64)
    err = 0.0
    for i in range(half):
        adj = k[i] * 256.0 + err
        q[i] = q[n - 1 - i] = int(np.rint(adj))
        err = adj - q[i]
    q[half] = 256 - 2 * q[:half].sum()
    return q


def _gaussian_blur_uint8(images: jax.Array, sigma: float) -> jax.Array:
    """``cv2.GaussianBlur(images, (0, 0), sigma)`` for ``(..., H, W, C)`` uint8, bit-exact.

    cv2 blurs 8-bit images in fixed point: rows with the 8.8 kernel (exact, kept with 8
    fractional bits), then columns (16 fractional bits), rounded half up once at the end;
    borders are BORDER_REFLECT_101 (numpy's "reflect"). The same integer arithmetic here gives
    the same bytes (checked against cv2 in the tests).
    """
    q = _gaussian_kernel_q8(sigma)
    r = len(q) // 2
    x = images.astype(jnp.int32)
    lead = [(0, 0)] * (x.ndim - 3)
    h, w = x.shape[-3], x.shape[-2]
    xp = jnp.pad(x, lead + [(0, 0), (r, r), (0, 0)], mode="reflect")
    x = sum(int(q[i]) * xp[..., :, i : i + w, :] for i in range(len(q)))  # <= 255 * 256
    xp = jnp.pad(x, lead + [(r, r), (0, 0), (0, 0)], mode="reflect")
    x = sum(int(q[i]) * xp[..., i : i + h, :, :] for i in range(len(q)))  # <= 255 * 2**16
    return jnp.minimum((x + (1 << 15)) >> 16, 255).astype(jnp.uint8)


def _canny_threshold(t: Any, l2_gradient: bool) -> jax.Array:
    """cv2's integer threshold: ``floor(t)``, or ``floor(min(t, 32767)**2)`` for L2 (if t > 0).

    Python numbers are converted in double precision exactly like cv2; traced values in float32
    (exact for integer thresholds, which is what everybody passes).
    """
    if isinstance(t, int | float | np.integer | np.floating):
        t = float(t)
        if l2_gradient:
            t = min(32767.0, t)
            t = t * t if t > 0 else t
        return jnp.asarray(math.floor(t), jnp.int32)
    t = jnp.asarray(t, jnp.float32)
    if l2_gradient:
        t = jnp.minimum(t, 32767.0)
        t = jnp.where(t > 0, t * t, t)
    return jnp.floor(t).astype(jnp.int32)


def _hysteresis(candidate: jax.Array, strong: jax.Array) -> jax.Array:
    """Keep the candidates 8-connected (through candidates) to a strong pixel.

    cv2 follows edges from each strong pixel with an explicit stack; the parallel equivalent
    is to dilate the edge set by one pixel (3x3) inside the candidate set until it stops
    growing. The fixed point is the same set: every candidate whose 8-connected component of
    candidates holds a strong pixel.
    """

    def dilate(edges: jax.Array) -> jax.Array:
        # A 3x3 box dilation, separable: OR over the row neighbours, then the column ones.
        p = jnp.pad(edges, [(0, 0)] * (edges.ndim - 1) + [(1, 1)])
        edges = p[..., :-2] | p[..., 1:-1] | p[..., 2:]
        p = jnp.pad(edges, [(0, 0)] * (edges.ndim - 2) + [(1, 1), (0, 0)])
        return p[..., :-2, :] | p[..., 1:-1, :] | p[..., 2:, :]

    def body(state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        edges, _ = state
        new = edges
        for _ in range(_HYSTERESIS_STEPS):
            new = dilate(new) & candidate
        return new, jnp.any(new != edges)

    edges, _ = jax.lax.while_loop(lambda s: s[1], body, (strong, jnp.asarray(True)))
    return edges


def canny(
    images: jax.Array,
    low_threshold: float | jax.Array = 100,
    high_threshold: float | jax.Array = 200,
    *,
    l2_gradient: bool = False,
    blur_sigma: float = 0.0,
) -> jax.Array:
    """Canny edges with ``cv2.Canny(image, low_threshold, high_threshold)``'s semantics.

    The ControlNet canny apps (``annotator/canny``) pass the RGB uint8 image straight to
    ``cv2.Canny`` with aperture 3 and the default L1 gradient; this does the same steps:

    1. optionally ``cv2.GaussianBlur(image, (0, 0), blur_sigma)``, bit-exact (off by default,
       as in the apps);
    2. 3x3 Sobel derivatives per channel, replicated border;
    3. magnitude ``|dx| + |dy|`` (``l2_gradient``: ``dx^2 + dy^2`` against squared
       thresholds); with several channels, each pixel keeps the derivatives of the channel of
       largest magnitude (the first on ties), as cv2 does; there is no grayscale conversion;
    4. non-maximum suppression in one of four directions, quantised with cv2's fixed-point
       ``tan(22.5 deg)`` tests: horizontal and vertical directions need ``m > previous`` and
       ``m >= next`` (so a two-pixel plateau keeps exactly one pixel), diagonals ``>`` both;
       outside the image the magnitude is 0;
    5. candidates ``m > low``, strong ``m > high`` (both strict, integer ``floor`` of the
       thresholds; swapped if ``low > high``);
    6. hysteresis: the candidates 8-connected to a strong pixel (a ``lax.while_loop`` of
       dilations until convergence).

    Args:
      images: uint8 (or other integer, values 0..255) array, ``(H, W)`` or ``(..., H, W, C)``.
        Floating-point images are refused: cv2.Canny takes 8-bit images only and the
        thresholds are on that scale.
      low_threshold: lower hysteresis threshold: a Python number, a traced scalar, or an array
        of the batch shape (one threshold per image).
      high_threshold: upper hysteresis threshold, likewise.
      l2_gradient: use the L2 gradient norm (cv2's ``L2gradient=True``). Static.
      blur_sigma: Gaussian blur sigma applied first; 0 (default) means no blur. Static.

    Returns:
      uint8 edges, 255 on an edge and 0 elsewhere, ``(H, W)`` or ``(..., H, W, 1)``.
    """
    images, was_hw = _as_hwc(images)
    if not _is_int(images):
        raise TypeError(
            f"canny takes 8-bit images like cv2.Canny (values 0..255); got dtype {images.dtype}. "
            "Convert first, e.g. (x * 255).round().astype(jnp.uint8)."
        )
    if blur_sigma < 0:
        raise ValueError(f"blur_sigma must be >= 0; got {blur_sigma}")
    if blur_sigma > 0:
        images = _gaussian_blur_uint8(jnp.clip(images, 0, 255), blur_sigma)
    low = _canny_threshold(low_threshold, l2_gradient)
    high = _canny_threshold(high_threshold, l2_gradient)
    low, high = jnp.minimum(low, high), jnp.maximum(low, high)  # cv2 swaps them

    # Sobel per channel: move channels next to the batch so H, W are the last two axes.
    chans = jnp.moveaxis(images.astype(jnp.int32), -1, -3)  # (..., C, H, W)
    dx, dy = _sobel3(chans)
    if l2_gradient:
        mag = dx * dx + dy * dy
    else:
        mag = jnp.abs(dx) + jnp.abs(dy)
    # Colour input: the channel of largest magnitude, first on ties (cv2 loops with `>`).
    best = jnp.argmax(mag, axis=-3, keepdims=True)
    pick = lambda a: jnp.take_along_axis(a, best, axis=-3)[..., 0, :, :]
    mag, dx, dy = pick(mag), pick(dx), pick(dy)

    # Non-maximum suppression, in cv2's integer arithmetic.
    n = _neighbours(_shift_pad(mag, "constant", 0))
    ax = jnp.abs(dx)
    ay = jnp.abs(dy) << _CANNY_SHIFT
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << (_CANNY_SHIFT + 1))
    horizontal = ay < tg22x  # gradient mostly along x: compare left / right
    vertical = ~horizontal & (ay > tg67x)  # mostly along y: compare up / down
    # Diagonal: same signs (s = 1) -> up-left / down-right, opposite signs -> up-right / down-left.
    same_sign = (dx ^ dy) >= 0
    diag_a = jnp.where(same_sign, n["ul"], n["ur"])
    diag_b = jnp.where(same_sign, n["dr"], n["dl"])
    is_max = jnp.where(
        horizontal,
        (mag > n["l"]) & (mag >= n["r"]),
        jnp.where(
            vertical,
            (mag > n["u"]) & (mag >= n["d"]),
            (mag > diag_a) & (mag > diag_b),
        ),
    )
    low = jnp.reshape(low, low.shape + (1, 1))
    high = jnp.reshape(high, high.shape + (1, 1))
    candidate = is_max & (mag > low)
    strong = candidate & (mag > high)

    edges = _hysteresis(candidate, strong)
    out = jnp.where(edges, jnp.uint8(255), jnp.uint8(0))
    return _single_channel_out(out, was_hw)


# ---------------------------------------------------------------------------------------------
# Classical annotators
# ---------------------------------------------------------------------------------------------


def scribble(
    images: jax.Array, threshold: float | None = None, *, dark_strokes: bool = True
) -> jax.Array:
    """Binarise a drawing into the scribble ControlNet's condition: white strokes on black.

    ControlNet's ``gradio_scribble2image.py`` marks a pixel as stroke when the *smallest* of
    its channels is below 127 (dark pen on white paper); its interactive canvas app, where the
    user paints white on black, when the smallest channel is above 127 (``dark_strokes=False``).

    Args:
      images: ``(H, W)`` or ``(..., H, W, C)``, uint8 (0..255) or float (0..1).
      threshold: stroke threshold on the input's scale; default 127 for integer images and
        127/255 for float ones.
      dark_strokes: strokes are darker than the paper (default) or brighter.

    Returns:
      uint8, 255 on strokes and 0 elsewhere, ``(H, W)`` or ``(..., H, W, 1)``.
    """
    images, was_hw = _as_hwc(images)
    if threshold is None:
        threshold = 127 if _is_int(images) else 127 / 255
    lowest = jnp.min(images, axis=-1)
    stroke = lowest < threshold if dark_strokes else lowest > threshold
    return _single_channel_out(jnp.where(stroke, jnp.uint8(255), jnp.uint8(0)), was_hw)


def grayscale(images: jax.Array) -> jax.Array:
    """Luma like ``cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)``: 0.299 R + 0.587 G + 0.114 B.

    uint8 images use cv2's fixed-point formula (coefficients scaled by 2^15, rounded half up),
    so the result equals cv2's bit for bit; float images use the real coefficients. A fourth
    (alpha) channel is ignored; a one-channel image is returned as it is.

    Args:
      images: ``(H, W)`` or ``(..., H, W, C)`` with C in {1, 3, 4}, RGB order.

    Returns:
      Same dtype, ``(H, W)`` or ``(..., H, W, 1)``.
    """
    images, was_hw = _as_hwc(images)
    c = images.shape[-1]
    if c == 1:
        return _single_channel_out(images[..., 0], was_hw)
    if c not in (3, 4):
        raise ValueError(f"grayscale takes 1, 3 or 4 channels (RGB[A]); got shape {images.shape}")
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    if images.dtype == jnp.uint8:
        # cv2's RGB2GRAY for 8 bits: (R*9798 + G*19235 + B*3735 + 2^14) >> 15. A float
        # weighted sum rounds differently on ~0.05% of pixels (those at x.5).
        r, g, b = (v.astype(jnp.int32) for v in (r, g, b))
        y = ((r * 9798 + g * 19235 + b * 3735 + (1 << 14)) >> 15).astype(jnp.uint8)
    else:
        y = _cast_like(0.299 * r + 0.587 * g + 0.114 * b, images.dtype)
    return _single_channel_out(y, was_hw)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of area (box) down-sampling, like cv2's INTER_AREA.

    Output pixel i covers input span [i*s, (i+1)*s) with s = n_in / n_out; each input pixel is
    weighted by its overlap with that span. For an integer factor this is the plain mean of
    s x s blocks.
    """
    s = n_in / n_out
    lo = np.arange(n_out)[:, None] * s
    hi = lo + s
    px = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0.0, None)
    return (overlap / s).astype(np.float32)


def tile(images: jax.Array, factor: float = 4.0, *, upsample: str = "cubic") -> jax.Array:
    """The tile ControlNet's condition: the image down-sampled by `factor`, then back up.

    The tile model is trained to restore detail into a blurry, low-resolution tile; its
    preprocessors (sd-webui-controlnet's ``tile_resample``, diffusers' tile example) make one
    by shrinking with area interpolation and enlarging again. Down-sampling is area averaging
    (cv2's INTER_AREA) to ``round(H / factor) x round(W / factor)`` (at least 1 x 1); the way
    back up is `jax.image.resize` with `upsample` (``"cubic"``, ``"linear"``, ``"nearest"``,
    ``"lanczos3"``...).

    Args:
      images: ``(H, W)`` or ``(..., H, W, C)``, any dtype; integer images are rounded and
        clipped back to their dtype.
      factor: down-sampling factor, >= 1. Static.
      upsample: `jax.image.resize` method for the way back up. Static.

    Returns:
      The same shape and dtype as `images`.
    """
    if factor < 1:
        raise ValueError(f"tile factor must be >= 1; got {factor}")
    images, was_hw = _as_hwc(images)
    h, w = images.shape[-3], images.shape[-2]
    sh, sw = max(1, round(h / factor)), max(1, round(w / factor))
    x = images.astype(jnp.float32)
    # Area down-sampling as two small matrix products (separable, exact box weights); HIGHEST
    # precision so GPUs/TPUs do not average in bf16/TF32.
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("ih,...hwc->...iwc", _area_matrix(h, sh), x, precision=hi)
    x = jnp.einsum("jw,...iwc->...ijc", _area_matrix(w, sw), x, precision=hi)
    x = jax.image.resize(x, images.shape, method=upsample)
    out = _cast_like(x, images.dtype)
    return out[..., 0] if was_hw else out


def _bilinear_remap(images: jax.Array, map_x: jax.Array, map_y: jax.Array) -> jax.Array:
    """``cv2.remap(images, map_x, map_y, INTER_LINEAR)`` for in-range maps, float32 result.

    images ``(..., H, W, C)``; maps ``(..., H, W)`` of source coordinates inside the image.
    """
    h, w, c = images.shape[-3:]
    flat = images.reshape(images.shape[:-3] + (h * w, c)).astype(jnp.float32)
    x0 = jnp.clip(jnp.floor(map_x), 0, w - 1)
    y0 = jnp.clip(jnp.floor(map_y), 0, h - 1)
    fx, fy = (map_x - x0)[..., None], (map_y - y0)[..., None]
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    x1, y1 = jnp.minimum(x0 + 1, w - 1), jnp.minimum(y0 + 1, h - 1)

    def at(yy: jax.Array, xx: jax.Array) -> jax.Array:
        idx = (yy * w + xx).reshape(yy.shape[:-2] + (h * w, 1))
        return jnp.take_along_axis(flat, idx, axis=-2).reshape(yy.shape + (c,))

    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    return top * (1 - fy) + bottom * fy


def _noise_disk(rng: jax.Array, batch: tuple[int, ...], h: int, w: int, f: int) -> jax.Array:
    """ControlNet's ``make_noise_disk``: smooth noise in [0, 1], one field per batch element.

    Uniform noise on a coarse ``(h // f + 2, w // f + 2)`` grid, enlarged bicubically to
    ``(h + 2f, w + 2f)``, the central ``h x w`` kept (the margin hides the resize's border),
    then stretched to span exactly [0, 1] (min -> 0, max -> 1, per image).
    """
    coarse = jax.random.uniform(rng, batch + (h // f + 2, w // f + 2), jnp.float32)
    fine = jax.image.resize(coarse, batch + (h + 2 * f, w + 2 * f), method="cubic")
    fine = fine[..., f : f + h, f : f + w]
    lo = jnp.min(fine, axis=(-2, -1), keepdims=True)
    hi = jnp.max(fine, axis=(-2, -1), keepdims=True)
    return (fine - lo) / jnp.maximum(hi - lo, 1e-12)


def content_shuffle(
    images: jax.Array, rng: jax.Array, f: int = 256, *, interpolation: str = "linear"
) -> jax.Array:
    """ControlNet 1.1's ContentShuffleDetector: a random, smooth re-arrangement of the image.

    Not a displacement: each output pixel (i, j) *samples* the input at the absolute position
    ``(x, y) = (nx(i, j) * (W - 1), ny(i, j) * (H - 1))``, where ``nx`` and ``ny`` are two
    independent smooth noise fields stretched to cover [0, 1] (``_noise_disk``; the coarse grid
    has one random value per `f` pixels, so ``f=256`` on a 512 image gives a 4x4 grid: large
    swirls). Colours and textures survive, layout does not, which is what the shuffle
    ControlNet conditions on. Every image of a batch gets its own fields, all drawn from `rng`
    (for one key per image, ``jax.vmap(content_shuffle, (0, 0))``); the result is a
    deterministic function of (images, rng).

    Differences from the original (numpy RNG, cv2): the noise comes from `jax.random`, and the
    bicubic enlargement is `jax.image.resize`'s Keys cubic (a = -0.5) instead of cv2's
    INTER_CUBIC (a = -0.75); both give a smooth field, but not the same numbers for a seed.

    Args:
      images: ``(H, W)`` or ``(..., H, W, C)``, any dtype (integer results are rounded).
      rng: a JAX PRNG key.
      f: noise grid spacing in pixels (the original's ``f``, default 256). Static.
      interpolation: ``"linear"`` (cv2.remap's INTER_LINEAR, as the original) or
        ``"nearest"`` (every output pixel is a copy of an input pixel). Static.

    Returns:
      The same shape and dtype as `images`.
    """
    if f < 1:
        raise ValueError(f"content_shuffle f must be >= 1; got {f}")
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest'; got {interpolation!r}")
    images, was_hw = _as_hwc(images)
    batch, (h, w) = images.shape[:-3], images.shape[-3:-1]
    kx, ky = jax.random.split(rng)
    map_x = _noise_disk(kx, batch, h, w, f) * float(w - 1)
    map_y = _noise_disk(ky, batch, h, w, f) * float(h - 1)
    if interpolation == "nearest":
        map_x, map_y = jnp.round(map_x), jnp.round(map_y)
    out = _cast_like(_bilinear_remap(images, map_x, map_y), images.dtype)
    return out[..., 0] if was_hw else out


def inpaint_mask(images: jax.Array, mask: jax.Array) -> jax.Array:
    """The inpainting ControlNet's condition: the image with masked pixels set to -1.

    As diffusers' ``make_inpaint_condition``: image in [0, 1], mask in [0, 1], and every
    channel of a pixel whose mask value is > 0.5 becomes -1 (a value no real pixel has, so the
    model can tell "to be painted" from black).

    Args:
      images: ``(..., H, W, C)`` float in [0, 1], or uint8 (divided by 255).
      mask: ``(..., H, W)`` or ``(..., H, W, 1)``, float in [0, 1], uint8 (divided by 255) or
        bool; broadcast against `images`.

    Returns:
      float32, the shape of `images` broadcast with the mask's leading dimensions.
    """
    images = jnp.asarray(images)
    mask = jnp.asarray(mask)
    if images.ndim < 3:
        raise ValueError(f"inpaint_mask images must be (..., H, W, C); got {images.shape}")
    if mask.ndim < 3 or mask.shape[-1] != 1 or mask.shape[-3:-1] != images.shape[-3:-1]:
        mask = mask[..., None]
    if mask.shape[-3:-1] != images.shape[-3:-1]:
        raise ValueError(
            f"inpaint_mask: mask {mask.shape[:-1]} does not match the images' (H, W) "
            f"{images.shape[-3:-1]}"
        )
    return jnp.where(_to_unit_float(mask) > 0.5, -1.0, _to_unit_float(images))


# ---------------------------------------------------------------------------------------------
# Registry and the CLI helper
# ---------------------------------------------------------------------------------------------

ANNOTATORS: dict[str, Callable[..., jax.Array]] = {
    "canny": canny,
    "scribble": scribble,
    "shuffle": content_shuffle,
    "tile": tile,
    "grayscale": grayscale,
}
"""Annotators that need only the image (and options): name -> function. ``"shuffle"`` also
takes a PRNG key, which `annotate` makes from its ``seed`` option."""


def annotate_input(image: Any) -> np.ndarray:
    """Any image `annotate` accepts -> uint8 ``(H, W, 1)`` or ``(H, W, 3)``, alpha dropped.

    A uint8 array is kept bit for bit; everything else goes through
    `transforms.image_to_float` (each source scaled by its own range) and is rounded to 8 bits.
    """
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] in (2, 4):  # gray + alpha, RGB + alpha
            image = image[..., :-1]
        if image.shape[-1] not in (1, 3):
            raise ValueError(f"annotate takes 1 to 4 channels; got shape {image.shape}")
        return image
    unit = image_to_float(image, source="annotate input")
    return np.rint(unit * 255).astype(np.uint8)


def annotate(name: str, image: Any, **options: Any) -> np.ndarray:
    """Run one annotator on one image, for the ``cn-jax annotate`` command.

    The annotators work on 8-bit pixels (canny is cv2's 8-bit algorithm), so the image is read
    by `transforms.image_to_float` on its *own* range and rounded to 8 bits: a 16-bit PNG or
    a uint16 array is divided by 65535 (never clipped at 255), a float array must lie in
    [0, 1]. A uint8 array is used as it is.

    Args:
      name: a key of `ANNOTATORS`.
      image: a file path, encoded bytes, a PIL image (any mode: 16-bit "I;16", "P", "RGBA",
        ...) or an array ``(H, W)`` / ``(H, W, C)`` with C in {1, 2, 3, 4}: uint8, uint16, or
        float in [0, 1]. Alpha is dropped; gray stays one channel.
      **options: keyword arguments of that annotator, e.g. ``low_threshold=100,
        high_threshold=200`` for canny or ``factor=4`` for tile; ``shuffle`` takes ``seed``
        (int, default 0) instead of a key.

    Returns:
      uint8 ``(H, W, 3)``: one-channel results are repeated over three channels, the layout of
      a ControlNet condition image (what the original apps save).

    Raises:
      ValueError: unknown annotator or option, or an image that cannot be read (a
        `BadSampleError` naming the file, dtype or range).
    """
    if name not in ANNOTATORS:
        raise ValueError(f"unknown annotator {name!r}; choose from {sorted(ANNOTATORS)}")
    fn = ANNOTATORS[name]
    image = annotate_input(image)

    options = dict(options)
    args: tuple[Any, ...] = ()
    if fn is content_shuffle:
        args = (jax.random.key(int(options.pop("seed", 0))),)
    params = inspect.signature(fn).parameters
    allowed = list(params)[1 + len(args) :]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        extra = ["seed"] if fn is content_shuffle else []
        raise ValueError(
            f"annotator {name!r} has no option(s) {unknown}; its options are {allowed + extra}"
        )

    # Options are compile-time constants here: one image, one compilation.
    out = jax.jit(lambda x, *a: fn(x, *a, **options))(jnp.asarray(image), *args)
    out = np.asarray(out)
    if out.dtype != np.uint8:
        out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out
