"""Tests for cn_jax.data.annotators: canny against cv2.Canny on real photographs (the ones
bundled with scikit-image, no download), and the classical annotators on hand-made cases."""

from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import skimage.data

from cn_jax.data.annotators import (
    ANNOTATORS,
    annotate,
    canny,
    content_shuffle,
    grayscale,
    inpaint_mask,
    scribble,
    tile,
)

RGB_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
GRAY_PHOTOS = ("camera", "coins", "page", "moon", "text")
THRESHOLDS = ((50, 100), (100, 200), (150, 250))
MIN_F1 = 0.85

canny_jit = jax.jit(canny, static_argnames=("l2_gradient", "blur_sigma"))


def photo(name: str) -> np.ndarray:
    image = getattr(skimage.data, name)()
    assert image.dtype == np.uint8 and image.ndim in (2, 3), (name, image.dtype, image.shape)
    return image


def edge_f1(ours: np.ndarray, ref: np.ndarray) -> float:
    """2|A & B| / (|A| + |B|) over edge pixels (1.0 when both are empty)."""
    a, b = np.asarray(ours) > 0, np.asarray(ref) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def run_canny(image: np.ndarray, *args, **kwargs) -> np.ndarray:
    """Our canny on one HW / HWC image, as an (H, W) array like cv2.Canny's."""
    out = np.asarray(canny_jit(image, *args, **kwargs))
    return out.reshape(image.shape[:2])


# ---------------------------------------------------------------------------------------------
# Canny vs cv2.Canny
# ---------------------------------------------------------------------------------------------


def test_canny_matches_cv2_on_photographs():
    rows = []
    for name in RGB_PHOTOS + GRAY_PHOTOS:
        image = photo(name)
        for low, high in THRESHOLDS:
            ours = run_canny(image, low, high)
            ref = cv2.Canny(image, low, high)  # what the ControlNet apps call, RGB or gray
            assert ours.dtype == np.uint8 and set(np.unique(ours)) <= {0, 255}
            rows.append(
                (name, image.ndim, low, high, edge_f1(ours, ref), np.mean(ours == ref), ref.sum())
            )
    print("\ncanny vs cv2.Canny (aperture 3, L1)")
    print(f"{'photo':22s} {'kind':4s} {'low':>4s} {'high':>4s} {'F1':>8s} {'exact px':>9s}")
    for name, ndim, low, high, f1, exact, _ in rows:
        kind = "rgb" if ndim == 3 else "gray"
        print(f"{name:22s} {kind:4s} {low:4d} {high:4d} {f1:8.5f} {exact:9.6f}")
    f1s = np.array([r[4] for r in rows])
    exact = np.array([r[5] for r in rows])
    print(
        f"F1 min {f1s.min():.5f} mean {f1s.mean():.5f}; exact-pixel agreement min "
        f"{exact.min():.6f} mean {exact.mean():.6f}"
    )
    assert all(r[6] > 0 for r in rows), "a photo with no cv2 edges tests nothing"
    bad = [(r[0], r[2], r[3], round(r[4], 4)) for r in rows if r[4] < MIN_F1]
    assert not bad, f"edge F1 below {MIN_F1}: {bad}"


@pytest.mark.parametrize(
    "name, low, high, kwargs",
    [
        ("astronaut", 100, 200, {"l2_gradient": True}),
        ("camera", 50, 150, {"l2_gradient": True}),
        ("coffee", 100, 200, {"blur_sigma": 1.4}),
        ("coins", 60, 120, {"blur_sigma": 2.0}),
        # cv2 swaps low > high and floors fractional thresholds.
        ("chelsea", 200, 100, {}),
        ("rocket", 99.7, 180.2, {}),
    ],
)
def test_canny_options_match_cv2(name, low, high, kwargs):
    image = photo(name)
    ours = run_canny(image, low, high, **kwargs)
    sigma = kwargs.get("blur_sigma", 0)
    blurred = cv2.GaussianBlur(image, (0, 0), sigma) if sigma else image
    ref = cv2.Canny(blurred, low, high, L2gradient=kwargs.get("l2_gradient", False))
    f1 = edge_f1(ours, ref)
    print(f"\n{name} {low}/{high} {kwargs}: F1 {f1:.5f}, exact {np.mean(ours == ref):.6f}")
    assert f1 >= MIN_F1


def _hand_made_images() -> dict[str, np.ndarray]:
    """Small images whose edges hinge on cv2's tie-breaking and border rules."""
    cases = {}
    step = np.zeros((8, 10), np.uint8)
    step[:, 5:] = 200
    cases["vertical step"] = step
    cases["horizontal step"] = step.T.copy()
    yy, xx = np.mgrid[:12, :12]
    cases["diagonal step"] = np.where(xx > yy, 200, 0).astype(np.uint8)
    cases["anti-diagonal step"] = np.where(xx + yy > 11, 200, 0).astype(np.uint8)
    cases["border step"] = np.pad(np.full((6, 6), 180, np.uint8), ((0, 0), (0, 3)))
    cases["one pixel"] = np.pad(np.full((1, 1), 255, np.uint8), 4)
    # A faint step edge (weak only) touching a strong one: kept only through hysteresis. Its
    # magnitude is exactly 4 * 25 = 100, the low threshold of one pair: cv2 needs m > low.
    hyst = np.zeros((16, 16), np.uint8)
    hyst[:, 8:] = 25
    hyst[12:, 8:] = 200
    cases["hysteresis chain"] = hyst
    # Straight edges close to the 22.5 / 67.5 degree sector boundaries (cv2's fixed-point
    # tan(22.5) decides between the horizontal and the diagonal comparison).
    # Soft (sigmoid) profiles, so the gradient direction is that of the edge's normal.
    for slope in (0.38, 0.45, 2.3, 2.5):
        soft = 220 / (1 + np.exp(-(xx + slope * yy - 3 - 2 * slope) / 1.5))
        cases[f"oblique edge {slope}"] = np.round(soft).astype(np.uint8)
    rgb = np.zeros((9, 9, 3), np.uint8)
    rgb[:, 4:, 0] = 120  # red step, vertical edge
    rgb[5:, :, 2] = 160  # blue step, horizontal edge, stronger
    cases["colour channels"] = rgb
    return cases


@pytest.mark.parametrize("case", list(_hand_made_images()))
def test_canny_tie_breaking_equals_cv2(case):
    """Exact equality on small constructed images: plateaus (two pixels of equal magnitude),
    diagonals, borders, hysteresis and per-channel maxima all follow cv2's rules."""
    image = _hand_made_images()[case]
    # (100, 300) leaves weak-only pixels; (99, 300) and (100, 300) straddle a magnitude of 100.
    for low, high in ((50, 100), (99, 300), (100, 300)):
        np.testing.assert_array_equal(run_canny(image, low, high), cv2.Canny(image, low, high))


def test_canny_plateau_keeps_the_first_pixel():
    # A vertical step between columns 4 and 5 gives two columns of equal |dx|; cv2's
    # `m > left && m >= right` keeps the left one only (independent of cv2).
    step = np.zeros((8, 10), np.uint8)
    step[:, 5:] = 200
    edges = np.asarray(canny_jit(step, 50, 100))
    assert edges.shape == (8, 10)
    assert np.all(edges[:, 4] == 255) and edges.sum() == 255 * 8
    # Same for a horizontal step: `m > up && m >= down` keeps the upper row.
    edges = np.asarray(canny_jit(step.T.copy(), 50, 100))
    assert np.all(edges[4, :] == 255) and edges.sum() == 255 * 8


def test_canny_hysteresis_keeps_whole_components():
    """The defining property of hysteresis, checked without cv2: with the same NMS, the
    candidates are edges(low, low), the strong pixels edges(high, high), and edges(low, high)
    is exactly the union of the 8-connected components of candidates that hold a strong pixel.
    """
    image = photo("camera")
    low, high = 40, 200
    candidates = run_canny(image, low, low) > 0
    strong = run_canny(image, high, high) > 0
    edges = run_canny(image, low, high) > 0
    labels, n = scipy.ndimage.label(candidates, structure=np.ones((3, 3)))
    seeded = np.zeros(n + 1, bool)
    seeded[labels[strong]] = True
    seeded[0] = False
    expected = seeded[labels]
    assert strong.sum() < expected.sum() < candidates.sum()  # hysteresis adds and drops pixels
    np.testing.assert_array_equal(edges, expected)


def test_canny_jit_batch_and_vmap_equal_per_image():
    crops = np.stack([photo(n)[:96, :128] for n in ("astronaut", "coffee", "chelsea", "rocket")])
    per_image = np.stack([np.asarray(canny_jit(c, 80, 160)) for c in crops])
    np.testing.assert_array_equal(np.asarray(canny(crops[0], 80, 160)), per_image[0])  # eager
    batched = np.asarray(canny_jit(crops, 80, 160))
    assert batched.shape == (4, 96, 128, 1) and batched.dtype == np.uint8
    np.testing.assert_array_equal(batched, per_image)
    vmapped = np.asarray(jax.jit(jax.vmap(lambda x: canny(x, 80, 160)))(crops))
    np.testing.assert_array_equal(vmapped, per_image)
    # Two batch dimensions; thresholds as traced arrays (one compilation for any thresholds).
    two = np.asarray(canny_jit(crops.reshape(2, 2, 96, 128, 3), jnp.int32(80), jnp.float32(160)))
    np.testing.assert_array_equal(two.reshape(per_image.shape), per_image)
    # One threshold pair per image.
    lows, highs = np.array([50, 80, 100, 150]), np.array([100, 160, 200, 250])
    each = np.asarray(canny_jit(crops, lows, highs))
    for crop, low, high, edges in zip(crops, lows, highs, each):
        np.testing.assert_array_equal(edges[..., 0], cv2.Canny(crop, int(low), int(high)))
    # Grayscale: (H, W) -> (H, W); a batch of grayscale is (B, H, W, 1).
    gray = photo("camera")[:64, :80]
    assert canny_jit(gray).shape == (64, 80)
    np.testing.assert_array_equal(
        np.asarray(canny_jit(np.stack([gray, gray])[..., None]))[1, ..., 0],
        np.asarray(canny_jit(gray)),
    )


def test_canny_higher_thresholds_give_a_subset():
    # NMS does not depend on the thresholds, and raising them shrinks both the candidate and
    # the strong sets, so the edges of higher thresholds are exactly a subset.
    for name in ("astronaut", "camera", "coffee"):
        image = photo(name)
        edges = [run_canny(image, lo, hi) > 0 for lo, hi in THRESHOLDS]
        counts = [e.sum() for e in edges]
        assert counts[0] > counts[1] > counts[2] > 0, (name, counts)
        for lower, higher in zip(edges, edges[1:]):
            assert not np.any(higher & ~lower), name


def test_canny_refuses_float_images():
    with pytest.raises(TypeError, match="8-bit"):
        canny(np.zeros((8, 8, 3), np.float32))


# ---------------------------------------------------------------------------------------------
# Classical annotators
# ---------------------------------------------------------------------------------------------


def test_grayscale_equals_cv2_and_hand_made():
    for name in ("astronaut", "coffee", "chelsea"):
        image = photo(name)
        gray = np.asarray(grayscale(image))
        assert gray.shape == image.shape[:2] + (1,) and gray.dtype == np.uint8
        np.testing.assert_array_equal(gray[..., 0], cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)
    np.testing.assert_array_equal(np.asarray(grayscale(pixels))[0, :, 0], [76, 150, 29, 255])
    floats = np.asarray(grayscale(pixels.astype(np.float32) / 255))
    np.testing.assert_allclose(floats[0, :, 0], [0.299, 0.587, 0.114, 1.0], atol=1e-6)
    batch = np.stack([pixels, pixels[:, ::-1]])
    assert grayscale(batch).shape == (2, 1, 4, 1)
    assert grayscale(pixels[..., 0]).shape == (1, 4)  # (H, W) is already gray
    rgba = np.concatenate([pixels, np.zeros_like(pixels[..., :1])], -1)
    np.testing.assert_array_equal(np.asarray(grayscale(rgba)), np.asarray(grayscale(pixels)))


def test_scribble_hand_made():
    paper = np.full((6, 7, 3), 250, np.uint8)
    paper[2, 1:6] = (10, 20, 30)  # a dark stroke
    paper[4, 3] = (250, 250, 100)  # one dark channel is enough (min over channels)
    out = np.asarray(scribble(paper))
    assert out.shape == (6, 7, 1) and out.dtype == np.uint8
    expected = np.zeros((6, 7), np.uint8)
    expected[2, 1:6] = 255
    expected[4, 3] = 255
    np.testing.assert_array_equal(out[..., 0], expected)
    # White strokes on a black canvas (the interactive app) and float input.
    canvas = (255 - paper[..., 0]).astype(np.float32) / 255
    np.testing.assert_array_equal(
        np.asarray(scribble(canvas, dark_strokes=False)), (canvas > 127 / 255) * 255
    )
    assert scribble(np.stack([paper] * 3)).shape == (3, 6, 7, 1)
    np.testing.assert_array_equal(np.asarray(jax.jit(scribble)(paper)), out)


def test_tile_hand_made_and_against_cv2():
    checker = (np.indices((8, 12)).sum(0) % 2 * 200).astype(np.uint8)[..., None].repeat(3, -1)
    out = np.asarray(tile(checker, 2))
    assert out.shape == checker.shape and out.dtype == np.uint8
    assert np.all(out == 100)  # every 2x2 block averages to 100
    blocks = np.kron(np.arange(6, dtype=np.uint8).reshape(2, 3) * 40, np.ones((4, 4), np.uint8))
    np.testing.assert_array_equal(np.asarray(tile(blocks, 4, upsample="nearest")), blocks)
    # Area down-sampling + nearest up-sampling is cv2's INTER_AREA then INTER_NEAREST.
    image = photo("coffee")
    ref = cv2.resize(cv2.resize(image, (150, 100), interpolation=cv2.INTER_AREA), (600, 400),
                     interpolation=cv2.INTER_NEAREST)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(tile(image, 4, upsample="nearest")), ref)
    # Blurrier than the photo, same overall colour; floats stay floats; batches work.
    smooth = np.asarray(tile(image, 8)).astype(np.float64)
    assert (
        np.abs(np.diff(smooth, axis=1)).mean() < 0.5 * np.abs(np.diff(image * 1.0, axis=1)).mean()
    )
    np.testing.assert_allclose(smooth.mean((0, 1)), image.mean((0, 1)), atol=1.5)
    floats = np.asarray(tile(image.astype(np.float32) / 255, 3.5))
    assert floats.dtype == np.float32 and floats.shape == image.shape
    assert tile(np.stack([image, image])[:, :64, :64], 4).shape == (2, 64, 64, 3)
    with pytest.raises(ValueError, match="factor"):
        tile(image, 0.5)


def test_inpaint_mask_hand_made():
    image = np.full((2, 3, 3), 0.25, np.float32)
    mask = np.array([[0.0, 0.6, 0.5], [1.0, 0.2, 0.51]], np.float32)
    out = np.asarray(inpaint_mask(image, mask))
    assert out.shape == (2, 3, 3) and out.dtype == np.float32
    expected = np.where((mask > 0.5)[..., None], -1.0, 0.25)
    np.testing.assert_array_equal(out, np.broadcast_to(expected, out.shape))
    # uint8 image and mask are scaled by 1/255 first; (H, W, 1) masks and batches work.
    out8 = np.asarray(
        inpaint_mask((image * 255).astype(np.uint8), (mask * 255).astype(np.uint8)[..., None])
    )
    expected8 = np.where(expected == -1, -1.0, 63 / 255)
    np.testing.assert_allclose(out8, np.broadcast_to(expected8, out8.shape), atol=1e-7)
    batch = np.asarray(inpaint_mask(np.stack([image] * 4), np.stack([mask] * 4)))
    assert batch.shape == (4, 2, 3, 3) and batch.min() == -1 and batch.max() == np.float32(0.25)
    with pytest.raises(ValueError, match="mask"):
        inpaint_mask(image, np.zeros((3, 2)))


def _histogram(image: np.ndarray, bins: int = 16) -> np.ndarray:
    return np.stack(
        [np.histogram(image[..., c], bins=bins, range=(0, 256))[0] / image[..., c].size
         for c in range(image.shape[-1])]
    )  # fmt: skip


def test_content_shuffle():
    image = photo("astronaut")
    shuffle = jax.jit(content_shuffle, static_argnames=("f", "interpolation"))
    a = np.asarray(shuffle(image, jax.random.key(0)))
    assert a.shape == image.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, np.asarray(shuffle(image, jax.random.key(0))))
    assert np.mean(a != np.asarray(shuffle(image, jax.random.key(1)))) > 0.5
    assert np.mean(a != image) > 0.5  # the layout really changes
    # Permutation-like: the colours stay those of the photo. Averaged over keys the colour
    # histogram is close to the photo's (per channel L1 over 16 bins; another photo is > 0.6
    # away), and with nearest sampling every output pixel is a copy of an input pixel.
    outs = [a] + [np.asarray(shuffle(image, jax.random.key(s))) for s in range(1, 8)]
    h_in = _histogram(image)
    per_key = [np.abs(_histogram(o) - h_in).sum(1).max() for o in outs]
    mean_dist = np.abs(_histogram(np.concatenate(outs)) - h_in).sum(1)
    other = np.abs(_histogram(photo("coffee")) - h_in).sum(1)
    print(
        f"\nshuffle histogram L1: per key max {max(per_key):.3f}, "
        f"8-key mean {mean_dist.max():.3f}, coffee vs astronaut {other.min():.3f}"
    )
    assert mean_dist.max() < 0.15 and max(per_key) < other.min()
    nearest = np.asarray(shuffle(image, jax.random.key(3), interpolation="nearest"))
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert all(tuple(c) in colours for c in np.unique(nearest.reshape(-1, 3), axis=0))
    # A constant image stays constant; floats stay floats; (H, W) works.
    flat = np.full((40, 50, 3), 77, np.uint8)
    np.testing.assert_array_equal(np.asarray(shuffle(flat, jax.random.key(5), f=16)), flat)
    gray = np.asarray(shuffle(photo("camera").astype(np.float32), jax.random.key(2)))
    assert gray.shape == (512, 512) and gray.dtype == np.float32
    # A batch gets one field per image; per-image keys through vmap.
    pair = np.stack([image[:64, :64]] * 2)
    both = np.asarray(shuffle(pair, jax.random.key(0), f=16))
    assert both.shape == pair.shape and np.mean(both[0] != both[1]) > 0.3
    keys = jax.random.split(jax.random.key(0), 2)
    per = np.asarray(jax.jit(jax.vmap(lambda x, k: content_shuffle(x, k, f=16)))(pair, keys))
    np.testing.assert_array_equal(per[1], np.asarray(shuffle(pair[1], keys[1], f=16)))


# ---------------------------------------------------------------------------------------------
# Registry and annotate
# ---------------------------------------------------------------------------------------------


def test_annotate_for_the_cli():
    assert set(ANNOTATORS) == {"canny", "scribble", "shuffle", "tile", "grayscale"}
    image = photo("chelsea")
    out = annotate("canny", image, low_threshold=100, high_threshold=200)
    assert out.shape == image.shape[:2] + (3,) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(cv2.Canny(image, 100, 200)[..., None], 3, -1))
    rgba = np.concatenate([image, np.full_like(image[..., :1], 255)], -1)
    np.testing.assert_array_equal(
        annotate("canny", rgba, low_threshold=100, high_threshold=200), out
    )
    gray = annotate("grayscale", image)
    np.testing.assert_array_equal(gray[..., 1], cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
    assert annotate("scribble", photo("page")).shape == photo("page").shape + (3,)
    assert annotate("tile", image, factor=4).shape == image.shape
    shuffled = annotate("shuffle", image, seed=3)
    np.testing.assert_array_equal(shuffled, annotate("shuffle", image, seed=3))
    assert shuffled.shape == image.shape and shuffled.dtype == np.uint8
    with pytest.raises(ValueError, match="unknown annotator"):
        annotate("depth", image)
    with pytest.raises(ValueError, match="low"):
        annotate("canny", image, low=100)
    with pytest.raises(ValueError, match="uint8"):
        annotate("canny", image.astype(np.float32))


def test_annotate_reads_16bit_and_float_images_by_their_own_range(tmp_path):
    """A 16-bit depth map is annotated from its own range (divided by 65535, rounded to the
    annotators' 8 bits), not clipped at 255 as PIL's convert("RGB") would."""
    from PIL import Image

    image = photo("camera")  # uint8 (H, W)
    deep = image.astype(np.uint16) * 257  # the same picture on the 16-bit range
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    want = annotate("canny", image, low_threshold=100, high_threshold=200)
    for value in (str(tmp_path / "deep.png"), deep, image.astype(np.float32) / 255):
        got = annotate("canny", value, low_threshold=100, high_threshold=200)
        np.testing.assert_array_equal(got, want, err_msg=type(value).__name__)
    # An 8-bit file, an RGBA one and a palette one: what the command read before (RGB).
    rgb = photo("chelsea")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    want = annotate("scribble", rgb)
    for name in ("rgb.png", "rgba.png"):
        np.testing.assert_array_equal(annotate("scribble", str(tmp_path / name)), want)
    with pytest.raises(ValueError, match=r"^annotate input: a float64 array image holds NaN"):
        annotate("canny", np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match=r"^annotate input \('.*missing.png'\): not a readable"):
        annotate("canny", str(tmp_path / "missing.png"))
