"""Tests for cn_jax.data: synthetic fill50k, dataset sources, transforms and the Loader."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from cn_jax.data import (
    PALETTE,
    BadSampleError,
    DatasetError,
    Loader,
    decode_image,
    fill50k_truth,
    make_fill50k,
    open_dataset,
    preprocess_pair,
    read_fill50k_meta,
    sample_choices,
)
from cn_jax.data.transforms import I_MODE_MAX, image_to_float, resize_float

N_FILL = 24  # samples in the shared fill50k fixture
FILL_SIZE = 24


@pytest.fixture(scope="module")
def fill_dir(tmp_path_factory) -> Path:
    return make_fill50k(tmp_path_factory.mktemp("fill") / "fill50k", N_FILL, size=FILL_SIZE)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _memory_dataset(n: int, size: int = 4, captions=None) -> list[dict]:
    """Records held in memory as uint8 arrays; row i's pixels encode i (for checks)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        caption = f"caption {i}" if captions is None else captions
        out.append({"image": img, "conditioning_image": img.copy(), "caption": caption})
    return out


def _take(loader: Loader, k: int) -> list[dict]:
    return [next(loader) for _ in range(k)]


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], np.ndarray):
                assert x[key].dtype == y[key].dtype
                np.testing.assert_array_equal(x[key], y[key], err_msg=key)
            else:
                assert x[key] == y[key], key


# --------------------------------------------------------------------------- fill50k


def test_fill50k_is_deterministic(tmp_path, fill_dir):
    again = make_fill50k(tmp_path / "again", N_FILL, size=FILL_SIZE)
    other = make_fill50k(tmp_path / "other", N_FILL, size=FILL_SIZE, seed=1)
    files = sorted(p.relative_to(fill_dir) for p in fill_dir.rglob("*") if p.is_file())
    assert len(files) == 2 * N_FILL + 2  # images, prompt.json, fill50k_meta.json
    for f in files:
        assert (fill_dir / f).read_bytes() == (again / f).read_bytes(), f
    assert (fill_dir / "prompt.json").read_bytes() != (other / "prompt.json").read_bytes()
    # A smaller dataset with the same seed is a prefix of the larger one.
    prefix = make_fill50k(tmp_path / "prefix", 3, size=FILL_SIZE)
    assert (prefix / "target/2.png").read_bytes() == (fill_dir / "target/2.png").read_bytes()


def _outline_fit(source: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares circle through the outline's pixel centres (x^2 + y^2 + Dx + Ey + F = 0)."""
    ys, xs = np.nonzero(source[..., 0] == 255)
    x, y = xs + 0.5, ys + 0.5
    (d, e, f), *_ = np.linalg.lstsq(np.stack([x, y, np.ones_like(x)], 1), -(x**2 + y**2))
    center = np.array([-d / 2, -e / 2])
    return center, float(np.sqrt(center @ center - f))


def _disk_fit(mask: np.ndarray) -> tuple[np.ndarray, float]:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()]) + 0.5, float(np.sqrt(mask.sum() / np.pi))


def test_fill50k_geometry_and_colours(tmp_path):
    size, num = 64, 16
    folder = make_fill50k(tmp_path / "f", num, size=size, seed=3)
    assert read_fill50k_meta(folder)["seed"] == 3
    rows = [json.loads(line) for line in (folder / "prompt.json").read_text().splitlines()]
    assert len(rows) == num
    for i, row in enumerate(rows):
        assert row["source"] == f"source/{i}.png" and row["target"] == f"target/{i}.png"
        truth = fill50k_truth(i, size=size, seed=3)
        source = np.asarray(Image.open(folder / row["source"]))
        target = np.asarray(Image.open(folder / row["target"]))
        assert source.shape == target.shape == (size, size, 3)

        # The condition is a white outline on black, entirely inside the image.
        assert set(np.unique(source)) <= {0, 255}
        assert (source[..., 0] == source[..., 1]).all() and (source[..., 0] == source[..., 2]).all()
        border = np.concatenate([source[0], source[-1], source[:, 0], source[:, -1]])
        assert not border.any()

        # The prompt names the colours of the pixels: fill inside, background elsewhere.
        fill_name, rest = row["prompt"].split(" circle with ")
        bg_name = rest.removesuffix(" background")
        assert (fill_name, bg_name) == (truth.fill, truth.background) and fill_name != bg_name
        is_fill = (target == PALETTE[fill_name]).all(-1)
        is_bg = (target == PALETTE[bg_name]).all(-1)
        assert (is_fill | is_bg).all()
        assert not is_fill[0].any() and not is_fill[-1].any()

        # The filled disk sits exactly where the outline is.
        c_outline, r_outline = _outline_fit(source)
        c_disk, r_disk = _disk_fit(is_fill)
        np.testing.assert_allclose(c_outline, c_disk, atol=0.5)
        assert abs(r_outline - r_disk) < 0.5
        np.testing.assert_allclose(c_disk, truth.center, atol=0.5)
        assert abs(r_disk - truth.radius) < 0.5
        assert 0.1 * size <= truth.radius <= 0.4 * size
        # Pixels near the outline line are filled just inside and background just outside.
        cx, cy = truth.center
        inside = (int(cx + 0.5 * truth.radius), int(cy))
        assert is_fill[inside[1], inside[0]]


# --------------------------------------------------------------------------- sources


def _decoded(ds) -> list[tuple[np.ndarray, np.ndarray, object]]:
    return [
        (
            np.asarray(decode_image(r["image"], "RGB")),
            np.asarray(decode_image(r["conditioning_image"], "RGB")),
            r["caption"],
        )
        for r in ds
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_every_format_gives_the_same_records(tmp_path, fill_dir):
    reference = open_dataset(fill_dir)
    assert reference.column_names == ["image", "conditioning_image", "caption"]
    assert len(reference) == N_FILL
    assert reference[5]["image"] == str((fill_dir / "target/5.png").resolve())
    prompts = [
        json.loads(x)["prompt"] for x in (fill_dir / "prompt.json").read_text().split("\n") if x
    ]
    targets = [(fill_dir / f"target/{i}.png").read_bytes() for i in range(N_FILL)]
    sources = [(fill_dir / f"source/{i}.png").read_bytes() for i in range(N_FILL)]

    # imagefolder + metadata.jsonl with the default column names, files in subfolders.
    folder = tmp_path / "imagefolder"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    for i in range(N_FILL):
        (folder / f"a/t{i}.png").write_bytes(targets[i])
        (folder / f"b/s{i}.png").write_bytes(sources[i])
    _write_jsonl(
        folder / "metadata.jsonl",
        [
            {"image": f"a/t{i}.png", "conditioning_image": f"b/s{i}.png", "text": prompts[i]}
            for i in range(N_FILL)
        ],
    )

    # save_to_disk with embedded datasets.Image bytes.
    feats = datasets.Features(
        image=datasets.Image(), conditioning_image=datasets.Image(), text=datasets.Value("string")
    )
    embedded = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": b, "path": None} for b in targets],
            "conditioning_image": [{"bytes": b, "path": None} for b in sources],
            "text": prompts,
        },
        features=feats,
    )
    embedded.save_to_disk(str(tmp_path / "disk_bytes"))

    # save_to_disk with relative path strings and custom column names.
    paths = datasets.Dataset.from_dict(
        {
            "tgt": [f"a/t{i}.png" for i in range(N_FILL)],
            "src": [f"b/s{i}.png" for i in range(N_FILL)],
            "prompt": prompts,
        }
    )
    paths.save_to_disk(str(tmp_path / "disk_paths"))
    shutil.copytree(folder / "a", tmp_path / "disk_paths/a")
    shutil.copytree(folder / "b", tmp_path / "disk_paths/b")

    # parquet with the embedded images, split over two files in a folder.
    (tmp_path / "pq").mkdir()
    embedded.select(range(10)).to_parquet(str(tmp_path / "pq/part0.parquet"))
    embedded.select(range(10, N_FILL)).to_parquet(str(tmp_path / "pq/part1.parquet"))

    opened = {
        "imagefolder": open_dataset(folder),
        "disk_bytes": open_dataset(tmp_path / "disk_bytes"),
        "disk_paths": open_dataset(
            tmp_path / "disk_paths",
            image_column="tgt",
            conditioning_image_column="src",
            caption_column="prompt",
        ),
        "parquet": open_dataset(tmp_path / "pq", cache_dir=tmp_path / "cache"),
    }
    expected = _decoded(reference)
    for name, ds in opened.items():
        assert ds.column_names == ["image", "conditioning_image", "caption"], name
        got = _decoded(ds)
        assert len(got) == len(expected), name
        for i, (a, b) in enumerate(zip(got, expected)):
            np.testing.assert_array_equal(a[0], b[0], err_msg=f"{name} row {i} image")
            np.testing.assert_array_equal(a[1], b[1], err_msg=f"{name} row {i} condition")
            assert a[2] == b[2], f"{name} row {i} caption"
    assert opened["disk_paths"][0]["image"] == str((tmp_path / "disk_paths/a/t0.png").resolve())

    # The same data gives the same batches through the loader, whatever the format.
    def first_batch(ds):
        with Loader(ds, 4, 16, seed=1, random_crop=True, random_flip=True) as loader:
            return [next(loader)]

    _assert_batches_equal(first_batch(reference), first_batch(opened["parquet"]))


def test_imagefolder_file_name_fallback_and_caption_lists(tmp_path, fill_dir):
    folder = tmp_path / "d"
    shutil.copytree(fill_dir / "target", folder / "target")
    shutil.copytree(fill_dir / "source", folder / "source")
    _write_jsonl(
        folder / "metadata.jsonl",
        [
            {
                "file_name": "target/0.png",
                "conditioning_image_file_name": "source/0.png",
                "text": ["a", "b"],
            },
            {
                "file_name": "target/1.png",
                "conditioning_image_file_name": "source/1.png",
                "text": "c",
            },
        ],
    )
    ds = open_dataset(folder)
    assert [r["caption"] for r in ds] == [["a", "b"], ["c"]]
    assert ds[1]["conditioning_image"].endswith("source/1.png")


UNSAFE = {
    "absolute": lambda root: str(root.parent / "outside.png"),
    "absolute_inside": lambda root: str(root / "source/0.png"),
    "dotdot": lambda root: "../outside.png",
    "nested_dotdot": lambda root: "target/../../outside.png",
    "symlink": lambda root: "target/link.png",
    "symlinked_dir": lambda root: "linkdir/outside.png",
}


@pytest.mark.parametrize("kind", sorted(UNSAFE))
@pytest.mark.parametrize("fmt", ["fill50k", "imagefolder", "disk"])
def test_paths_outside_the_dataset_are_refused(tmp_path, fill_dir, kind, fmt):
    root = tmp_path / "ds"
    shutil.copytree(fill_dir / "target", root / "target")
    shutil.copytree(fill_dir / "source", root / "source")
    (tmp_path / "outside.png").write_bytes((fill_dir / "target/0.png").read_bytes())
    os.symlink(tmp_path / "outside.png", root / "target/link.png")
    os.symlink(tmp_path, root / "linkdir")
    bad = UNSAFE[kind](root)
    rows = [
        {"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": "p"} for i in range(4)
    ]
    rows[2]["source"] = bad
    if fmt == "fill50k":
        _write_jsonl(root / "prompt.json", rows)
        where = "prompt.json: row 2"
    elif fmt == "imagefolder":
        _write_jsonl(
            root / "metadata.jsonl",
            [
                {"image": r["target"], "conditioning_image": r["source"], "text": r["prompt"]}
                for r in rows
            ],
        )
        where = "metadata.jsonl: row 2"
    else:
        cols = {k: [r[k] for r in rows] for k in rows[0]}
        datasets.Dataset.from_dict(cols).save_to_disk(str(root / "saved"))
        for sub in ("target", "source"):  # the images beside the saved table
            shutil.copytree(root / sub, root / "saved" / sub, symlinks=True)
        os.symlink(tmp_path, root / "saved/linkdir")
        root = root / "saved"
        where = "row 2"
    kwargs = {}
    if fmt == "disk":
        kwargs = dict(
            image_column="target", conditioning_image_column="source", caption_column="prompt"
        )
    with pytest.raises(DatasetError) as info:
        open_dataset(root, **kwargs)
    message = str(info.value)
    assert where in message and repr(bad) in message
    assert ("absolute" in message) == kind.startswith("absolute")


def test_safe_relative_paths_and_inside_symlinks_are_accepted(tmp_path, fill_dir):
    root = tmp_path / "ds"
    shutil.copytree(fill_dir / "target", root / "target")
    shutil.copytree(fill_dir / "source", root / "source")
    os.symlink(root / "source/1.png", root / "source/alias.png")  # stays inside
    _write_jsonl(
        root / "prompt.json",
        [
            {"source": "source/alias.png", "target": "source/../target/1.png", "prompt": "p"},
        ],
    )
    ds = open_dataset(root)
    assert ds[0]["image"] == str((root / "target/1.png").resolve())


def test_malformed_datasets_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="cannot tell the dataset format"):
        open_dataset(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "prompt.json").write_text(
        '{"source": "s.png", "target": "t.png", "prompt": "x"}\n{oops\n'
    )
    with pytest.raises(DatasetError, match=r"line 2 \(row 1\) is not JSON"):
        open_dataset(bad)
    (bad / "prompt.json").write_bytes(  # issue 21: Latin-1, not UTF-8, on line 2
        b'{"source": "s.png", "target": "t.png", "prompt": "x"}\n{"prompt": "caf\xe9"}\n'
    )
    with pytest.raises(DatasetError, match=r"prompt.json: line 2 \(row 1\) is not UTF-8"):
        open_dataset(bad)
    (bad / "prompt.json").write_text('{"source": "s.png", "prompt": "x"}\n')
    with pytest.raises(DatasetError, match=r"row 0 .*'target'"):
        open_dataset(bad)
    datasets.Dataset.from_dict({"image": ["a.png"], "text": ["x"]}).save_to_disk(
        str(tmp_path / "saved")
    )
    with pytest.raises(DatasetError, match="conditioning_image"):
        open_dataset(tmp_path / "saved")


# --------------------------------------------------------------------------- transforms


def _gradient(w: int, h: int) -> np.ndarray:
    """An image whose every pixel is distinct: R = x, G = y, B = x + y (mod 256)."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return np.stack([x * 5 % 256, y * 7 % 256, (x + 2 * y) % 256], -1).astype(np.uint8)


def test_preprocess_ranges_shapes_and_channels():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # H=24, W=40
    img[0, 0] = 0
    img[0, 1] = 255
    pixels, cond = preprocess_pair(img, img, 24, crop=(0.0, 0.0))
    assert pixels.shape == (24, 24, 3) and cond.shape == (24, 24, 3)
    assert pixels.dtype == cond.dtype == np.float32
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    assert cond.min() == 0.0 and cond.max() == 1.0
    _, gray = preprocess_pair(img, img, 16, conditioning_channels=1)
    assert gray.shape == (16, 16, 1) and gray.dtype == np.float32
    expected = np.asarray(Image.fromarray(img).convert("L").resize((27, 16), Image.BICUBIC))
    np.testing.assert_allclose(gray[..., 0], expected[:, 6:22] / 255.0, atol=1e-6)
    # Smaller images are upscaled.
    small, _ = preprocess_pair(img[:8, :8], img[:8, :8], 16)
    assert small.shape == (16, 16, 3)


@pytest.mark.parametrize("crop", [(0.0, 0.0), (1.0, 1.0), (0.3, 0.8)])
@pytest.mark.parametrize("flip", [False, True])
def test_crop_and_flip_are_the_same_for_image_and_condition(crop, flip):
    img = _gradient(40, 24)
    pixels, cond = preprocess_pair(img, img, 24, crop=crop, flip=flip)
    np.testing.assert_allclose(cond * 2 - 1, pixels, atol=1e-6)
    # The crop box: no resize (shorter side == resolution), slack 16 on x, 0 on y.
    left = int(np.floor(crop[0] * 16 + 0.5))
    expected = img[:, left : left + 24]
    if flip:
        expected = expected[:, ::-1]
    np.testing.assert_allclose(pixels, expected / 127.5 - 1, atol=1e-6)


def test_condition_of_another_size_is_resized_to_the_image():
    img = _gradient(48, 32)
    # Same aspect ratio at twice the size, and a square (stretched) one.
    for size in [(96, 64), (60, 60)]:
        other = np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))
        pixels, cond = preprocess_pair(img, other, 32, crop=(1.0, 0.0), flip=True)
        np.testing.assert_allclose(cond * 2 - 1, pixels, atol=0.1, err_msg=str(size))


def test_bad_images_raise_bad_sample_error_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not a png")
    truncated = tmp_path / "truncated.png"
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    truncated.write_bytes(_png(noisy)[:2000])
    for path in (garbage, truncated, tmp_path / "missing.png"):
        with pytest.raises(BadSampleError, match=str(path)):
            preprocess_pair(_gradient(8, 8), str(path), 8, row=7)
    with pytest.raises(BadSampleError, match="row 5, image"):
        preprocess_pair(b"junk", _gradient(8, 8), 8, row=5)
    with pytest.raises(BadSampleError, match="row 5, image"):
        decode_image({"bytes": b"junk", "path": "x.png"}, "RGB", row=5, column="image")


def _old_preprocess(image, cond, resolution, channels, crop, flip):
    """The 8-bit path as it was before 16-bit support (PIL convert, resize, crop, / 255)."""

    def decode(v, mode):
        img = (
            v
            if isinstance(v, Image.Image)
            else (Image.fromarray(v) if isinstance(v, np.ndarray) else Image.open(io.BytesIO(v)))
        )
        img.load()
        return img if img.mode == mode else img.convert(mode)

    def shorter(img):
        w, h = img.size
        if min(w, h) == resolution:
            return img
        s = resolution / min(w, h)
        nw = resolution if w <= h else max(resolution, round(w * s))
        nh = resolution if h < w else max(resolution, round(h * s))
        return img.resize((nw, nh), Image.BICUBIC)

    img, c = decode(image, "RGB"), decode(cond, "RGB" if channels == 3 else "L")
    if c.size != img.size:
        c = c.resize(img.size, Image.BICUBIC)
    img, c = shorter(img), shorter(c)
    w, h = img.size
    left = int(np.floor(crop[0] * (w - resolution) + 0.5))
    top = int(np.floor(crop[1] * (h - resolution) + 0.5))
    box = (left, top, left + resolution, top + resolution)
    img, c = img.crop(box), c.crop(box)
    if flip:
        img, c = img.transpose(Image.FLIP_LEFT_RIGHT), c.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    condition = np.asarray(c, dtype=np.float32) / 255.0
    return pixels, condition[:, :, None] if condition.ndim == 2 else condition


def _eight_bit_sources() -> dict:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    gray = rng.integers(0, 256, (41, 29), dtype=np.uint8)
    return {
        "rgb array": rgb,
        "rgba array": rgba,
        "gray array": gray,
        "rgb png": _png(rgb),
        "gray png": _png(gray),
        "rgba png": _png(rgba),
        "LA": Image.fromarray(rgba[..., :2].copy(), "LA"),
        "P": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE),
        "1": Image.fromarray(gray).convert("1"),
    }


@pytest.mark.parametrize("name", list(_eight_bit_sources()))
def test_eight_bit_images_are_decoded_bit_for_bit_as_before(name):
    value = _eight_bit_sources()[name]
    for channels in (1, 3):
        for res, crop, flip in [
            (16, (0.5, 0.5), False),
            (24, (0.2, 0.9), True),
            (64, (1, 0), False),
        ]:
            got = preprocess_pair(value, value, res, conditioning_channels=channels, crop=crop,
                                  flip=flip)  # fmt: skip
            want = _old_preprocess(value, value, res, channels, crop, flip)
            for g, w in zip(got, want):
                assert g.dtype == w.dtype == np.float32
                np.testing.assert_array_equal(g, w, err_msg=f"{name} {channels} {res}")


def _depth_png(path: Path, width: int = 64, height: int = 16, byteorder: str = "<") -> np.ndarray:
    """A 16-bit grayscale PNG whose values run 0..65535 across the width."""
    row = np.linspace(0, 65535, width).round().astype(np.uint16)
    depth = np.tile(row, (height, 1)).astype(byteorder + "u2")
    Image.fromarray(depth).save(path)
    assert Image.open(path).mode.startswith("I;16")
    return depth.astype(np.float64) / 65535


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_gradient_survives_training_decoding(tmp_path, channels):
    """PIL's convert("RGB") clips a 16-bit depth map at 255 (a gradient reads 0, 1, 1, 1...);
    the decoder divides it by 65535 instead."""
    want = _depth_png(tmp_path / "depth.png")
    photo = _gradient(64, 16)
    _, cond = preprocess_pair(photo, str(tmp_path / "depth.png"), 16, crop=(0.0, 0.0),
                              conditioning_channels=channels)  # fmt: skip
    assert cond.shape == (16, 16, channels) and cond.dtype == np.float32
    # No resize (the shorter side is 16), crop at x = 0: the first 16 columns, unquantised.
    for c in range(channels):
        np.testing.assert_allclose(cond[:, :, c], want[:, :16], atol=1e-6)
    assert np.all(np.diff(cond[0, :, 0]) > 0.015)  # a gradient, not 0, 1, 1, 1...
    # Resized (bicubic on float planes): still increasing, still in [0, 1].
    _, small = preprocess_pair(_gradient(128, 32), str(tmp_path / "depth.png"), 8,
                               conditioning_channels=channels)  # fmt: skip
    assert np.all(np.diff(small[4, :, 0]) > 0) and 0 <= small.min() and small.max() <= 1
    # The 16-bit source as the target image too: [-1, 1].
    pixels, _ = preprocess_pair(str(tmp_path / "depth.png"), photo, 16, crop=(0.0, 0.0))
    np.testing.assert_allclose(pixels[..., 1], want[:, :16] * 2 - 1, atol=1e-6)


def test_image_to_float_scales_every_mode_by_its_own_range(tmp_path):
    want = _depth_png(tmp_path / "le.png")
    _depth_png(tmp_path / "be.tiff", byteorder=">")
    for path in ("le.png", "be.tiff"):
        got = image_to_float(str(tmp_path / path))
        assert got.shape == (16, 64, 1) and got.dtype == np.float32
        np.testing.assert_allclose(got[..., 0], want, atol=1e-7, err_msg=path)
    np.testing.assert_allclose(image_to_float(str(tmp_path / "le.png"), 3)[..., 2], want,
                               atol=1e-7)  # fmt: skip
    u16 = np.random.default_rng(0).integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    np.testing.assert_array_equal(image_to_float(u16), u16.astype(np.float32) / 65535)
    np.testing.assert_array_equal(image_to_float(u16[..., 0]), u16[..., :1] / np.float32(65535))
    gray = image_to_float(u16, 1)[..., 0]  # ITU-R 601 luma, as PIL's convert("L")
    np.testing.assert_allclose(gray, (u16 / 65535.0) @ [0.299, 0.587, 0.114], atol=1e-6)
    # Mode "I" (32-bit ints) is read as 16-bit: 0..I_MODE_MAX.
    ints = np.array([[0, 1000, I_MODE_MAX]], np.int32)
    np.testing.assert_allclose(image_to_float(Image.fromarray(ints))[0, :, 0],
                               ints[0] / I_MODE_MAX)  # fmt: skip
    # Mode "F" and float arrays are taken as [0, 1] already; alpha is dropped.
    f = np.array([[0.0, 0.25, 1.0]], np.float32)
    np.testing.assert_array_equal(image_to_float(Image.fromarray(f))[..., 0], f)
    rgba = np.random.default_rng(1).random((3, 4, 4))
    np.testing.assert_array_equal(image_to_float(rgba), rgba[..., :3].astype(np.float32))
    # 8-bit modes: exactly PIL's conversion / 255; gray stays 1 channel, colour 3.
    u8 = np.random.default_rng(2).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    for img, channels in [(Image.fromarray(u8), 3), (Image.fromarray(u8[..., :2], "LA"), 1),
                          (Image.fromarray(u8[..., 0]), 1)]:  # fmt: skip
        got = image_to_float(img)
        assert got.shape[-1] == channels
        want8 = np.asarray(img.convert("L" if channels == 1 else "RGB"), np.float32) / 255.0
        np.testing.assert_array_equal(got, want8.reshape(got.shape))
    # A 16-bit source read as 8-bit PIL (decode_image) is rounded, never clipped at 255.
    eight = np.asarray(decode_image(str(tmp_path / "le.png"), "L"))
    np.testing.assert_array_equal(eight, np.rint(want * 255).astype(np.uint8))


def test_resize_float_keeps_16bit_precision():
    ramp = np.linspace(0, 1, 512, dtype=np.float32)[None, :, None].repeat(4, 0)
    out = resize_float(ramp, (4, 1024))
    assert out.shape == (4, 1024, 1) and out.dtype == np.float32
    assert len(np.unique(out[0])) > 1000  # a uint8 round trip would leave 256 levels
    assert 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize(
    "value, message",
    [
        (np.full((4, 4), np.nan, np.float32), "a float32 array image holds NaN or infinite values"),
        (np.full((4, 4), np.inf), "a float64 array image holds NaN or infinite values"),
        (
            np.full((4, 4), 255.0, np.float32),
            "a float32 array image holds values in [255, 255]; a float image must lie in [0, 1] "
            "(pass 8-bit values as uint8, 16-bit as uint16)",
        ),
        (
            np.zeros((4, 4), np.int64),
            "an array image must be uint8 (0..255), uint16 (0..65535), bool or float in [0, 1]; "
            "got int64 (its range is ambiguous: convert it to one of those)",
        ),
        (
            np.zeros((4, 4, 5), np.uint16),
            "an array image must be (H, W) or (H, W, C) with C in 1..4; got shape (4, 4, 5)",
        ),
        (
            Image.fromarray(np.array([[-1, 70000]], np.int32)),
            "a mode 'I' image holds values in [-1, 70000]; it is read as 16-bit (0..65535), "
            "so save it as a 16-bit PNG or scale it first",
        ),
        (
            Image.fromarray(np.array([[0.5, 1.5]], np.float32)),
            "a mode 'F' image holds values in [0.5, 1.5]; a float image must lie in [0, 1] "
            "(pass 8-bit values as uint8, 16-bit as uint16)",
        ),
    ],
)
def test_image_values_out_of_their_range_are_refused_naming_the_source(value, message):
    with pytest.raises(BadSampleError, match=re.escape(f"control image 0: {message}") + "$"):
        image_to_float(value, 3, source="control image 0")
    with pytest.raises(
        BadSampleError, match=r"row 4, conditioning_image \(in-memory \w+\): " + re.escape(message)
    ):
        preprocess_pair(_gradient(4, 4), value, 4, row=4)


def test_unreadable_file_error_names_the_label_and_path(tmp_path):
    path = tmp_path / "missing.png"
    with pytest.raises(BadSampleError) as info:
        image_to_float(str(path), source="control image 1")
    assert str(info.value) == (
        f"control image 1 ({str(path)!r}): not a readable image (FileNotFoundError: file not found)"
    )


# --------------------------------------------------------------------------- loader


def test_order_is_deterministic_and_independent_of_threads(fill_dir):
    ds = open_dataset(fill_dir)
    steps = N_FILL // 4
    runs = []
    for workers, prefetch in [(0, 1), (1, 1), (3, 3)]:
        with Loader(
            ds,
            4,
            16,
            seed=5,
            num_workers=workers,
            prefetch=prefetch,
            random_crop=True,
            random_flip=True,
        ) as loader:
            assert loader.steps_per_epoch == steps
            runs.append(_take(loader, steps + 2))
    _assert_batches_equal(runs[0], runs[1])
    _assert_batches_equal(runs[0], runs[2])
    epoch0 = np.concatenate([b["index"] for b in runs[0][:steps]])
    assert sorted(epoch0) == list(range(N_FILL))  # each example exactly once per epoch
    epoch1 = np.concatenate([b["index"] for b in runs[0][steps:]])
    assert not np.array_equal(epoch0[:8], epoch1)  # a new permutation each epoch
    with Loader(ds, 4, 16, seed=6, num_workers=0) as loader:
        assert not np.array_equal(next(loader)["index"], runs[0][0]["index"])


@pytest.mark.parametrize("first", [2, 5])
def test_resume_is_exact(fill_dir, first):
    ds = open_dataset(fill_dir)
    kwargs = dict(random_crop=True, random_flip=True, num_workers=2)
    with Loader(ds, 4, 16, seed=2, **kwargs) as loader:
        straight = _take(loader, first + 2)
    with Loader(ds, 4, 16, seed=2, **kwargs) as loader:
        head = _take(loader, first)
        position = json.loads(json.dumps(loader.position))
    assert position["epoch"] == 0 and position["batch"] == first
    with Loader(ds, 4, 16, seed=2, start_position=position, **kwargs) as loader:
        tail = _take(loader, 2)
        assert loader.position["epoch"] == (first + 2) // (N_FILL // 4)
    _assert_batches_equal(straight, head + tail)
    with pytest.raises(ValueError, match="global_batch_size"):
        Loader(ds, 8, 16, seed=2, start_position=position)


def test_process_shards_concatenate_to_the_global_batch(fill_dir):
    ds = open_dataset(fill_dir)
    kwargs = dict(random_crop=True, random_flip=True, num_workers=1)
    with Loader(ds, 4, 8, seed=3, **kwargs) as whole:
        full = _take(whole, 3)
    halves = []
    for p in range(2):
        with Loader(ds, 4, 8, seed=3, process_index=p, process_count=2, **kwargs) as loader:
            halves.append(_take(loader, 3))
    for b, h0, h1 in zip(full, *halves):
        assert h0["pixel_values"].shape == (2, 8, 8, 3)
        for key in ("pixel_values", "conditioning_pixel_values", "index"):
            np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), b[key])
        assert h0["captions"] + h1["captions"] == b["captions"]
    with pytest.raises(ValueError, match="divisible"):
        Loader(ds, 5, 8, seed=3, process_count=2)


def test_prompt_dropout_rate_and_determinism():
    n = 2000
    ds = _memory_dataset(n)
    with Loader(ds, n, 4, seed=0, num_workers=0) as loader:
        batch = next(loader)
    captions = batch["captions"]
    dropped = np.array([c == "" for c in captions])
    assert abs(dropped.mean() - 0.5) < 0.05
    kept = [(i, c) for i, c in zip(batch["index"], captions) if c]
    assert all(c == f"caption {i}" for i, c in kept)
    # The same rows are dropped in a fresh loader, whatever the batch size; not in another epoch.
    with Loader(ds, 500, 4, seed=0, num_workers=2) as loader:
        again = [c for b in _take(loader, 4) for c in b["captions"]]
    assert again == captions
    dropped_by_index = {int(i): c == "" for i, c in zip(batch["index"], captions)}
    assert dropped_by_index == {
        i: sample_choices(0, 0, i, 0.5, False, False).drop_prompt for i in range(n)
    }
    epoch1 = {i: sample_choices(0, 1, i, 0.5, False, False).drop_prompt for i in range(n)}
    assert epoch1 != dropped_by_index
    for p, expected in [(0.0, 0), (1.0, 40)]:
        with Loader(ds[:40], 40, 4, seed=0, num_workers=0, proportion_empty_prompts=p) as ld:
            assert sum(c == "" for c in next(ld)["captions"]) == expected


def test_caption_lists_pick_among_them():
    ds = _memory_dataset(60, captions=["a", "b", "c"])
    runs = []
    for _ in range(2):
        with Loader(ds, 60, 4, seed=1, proportion_empty_prompts=0.0, num_workers=2) as ld:
            runs.append(next(ld)["captions"])
    assert runs[0] == runs[1]
    counts = {c: runs[0].count(c) for c in "abc"}
    assert sum(counts.values()) == 60 and min(counts.values()) >= 8, counts


def test_corrupt_image_raises_naming_the_file_or_is_skipped(tmp_path, fill_dir):
    root = tmp_path / "corrupt"
    shutil.copytree(fill_dir, root)
    (root / "target/3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = open_dataset(root)
    steps = N_FILL // 4
    with Loader(ds, 4, 8, seed=0, num_workers=2) as loader:
        with pytest.raises(BadSampleError, match=r"target/3\.png"):
            _take(loader, steps)
        with pytest.raises(RuntimeError, match="failed earlier"):
            next(loader)
    with Loader(ds, 4, 8, seed=0, num_workers=2, on_bad_sample="skip") as loader:
        batches = _take(loader, steps)
        assert loader.skipped == 1 and loader.position["skipped"] == 1
    seen = np.concatenate([b["index"] for b in batches])
    assert len(seen) == N_FILL and 3 not in seen
    assert sorted(set(seen.tolist())) == [i for i in range(N_FILL) if i != 3]
    # Bad bytes held in memory are named by their row.
    mem = _memory_dataset(4)
    mem[2]["conditioning_image"] = b"junk"
    with Loader(mem, 4, 4, seed=0, num_workers=1) as loader:
        with pytest.raises(BadSampleError, match="row 2, conditioning_image"):
            next(loader)


def test_outputs_tokenize_channels_wait_and_close(fill_dir):
    ds = open_dataset(fill_dir)

    import threading

    threads, inside, overlaps = set(), [], []

    def tokenize(captions):
        threads.add(threading.current_thread().name)
        inside.append(1)
        overlaps.append(len(inside))
        time.sleep(0.001)  # long enough for another worker to come in, were it let
        inside.pop()
        return np.array([[len(c), 1, 2] for c in captions], dtype=np.int64)

    loader = Loader(ds, 4, 8, seed=0, conditioning_channels=1, tokenize=tokenize, num_workers=3)
    batch = next(loader)
    assert batch["conditioning_pixel_values"].shape == (4, 8, 8, 1)
    assert batch["pixel_values"].shape == (4, 8, 8, 3)
    assert batch["pixel_values"].dtype == batch["conditioning_pixel_values"].dtype == np.uint8
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (4, 3)
    assert "captions" not in batch and batch["index"].dtype == np.int64
    with Loader(ds, 4, 8, seed=0, conditioning_channels=1, num_workers=0) as plain:
        captions = next(plain)["captions"]
    assert batch["input_ids"][:, 0].tolist() == [len(c) for c in captions]  # row order kept
    assert threads and all(t.startswith("cn_jax-decode") for t in threads)  # not this thread
    assert max(overlaps) == 1  # one call at a time: HF tokenizers keep state (see Loader)
    assert loader.wait_seconds > 0
    producer = loader._producer
    loader.close()
    assert not producer.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_small_dataset_last_batch_and_epochs():
    ds = _memory_dataset(10)
    with pytest.raises(ValueError, match="10 examples, fewer than global_batch_size 16"):
        Loader(ds, 16, 4, seed=0)
    with Loader(ds, 4, 4, seed=0, drop_last=False, num_epochs=2, num_workers=1) as loader:
        batches = list(loader)
    assert len(batches) == 6
    assert batches[2]["mask"].tolist() == [True, True, False, False]
    assert all(b["mask"].all() for b in batches[:2])
    epoch0 = np.concatenate([b["index"][b["mask"]] for b in batches[:3]])
    assert sorted(epoch0) == list(range(10))
    with Loader(ds, 4, 4, seed=0, num_epochs=1, num_workers=0) as loader:
        plain = list(loader)
    assert len(plain) == 2 and "mask" not in plain[0]


# --------------------------------------------------------------------------- transport


def _as_model_floats(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """A transported batch mapped to the models' floats by the train step's own functions."""
    import jax

    from cn_jax.train.step import condition_to_model_range, image_to_model_range

    to_image, to_cond = jax.jit(image_to_model_range), jax.jit(condition_to_model_range)
    return (
        np.asarray(to_image(batch["pixel_values"])),
        np.asarray(to_cond(batch["conditioning_pixel_values"])),
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_transport_is_bit_exact_to_float_batches(fill_dir, channels):
    """uint8 batches, mapped to floats inside the jitted step, equal the float32 batches the
    loader made on the host before (random crops and flips, a resize: 64 px -> 24 px)."""
    ds = open_dataset(fill_dir)
    kw = dict(random_crop=True, random_flip=True, num_workers=0, conditioning_channels=channels)
    with Loader(ds, 4, 24, seed=7, **kw) as loader:
        ints = _take(loader, 2)
    with Loader(ds, 4, 24, seed=7, image_dtype="float32", condition_dtype="float32", **kw) as ld:
        floats = _take(ld, 2)
    for a, b in zip(ints, floats):
        assert a["pixel_values"].dtype == a["conditioning_pixel_values"].dtype == np.uint8
        assert b["pixel_values"].dtype == np.float32
        image, cond = _as_model_floats(a)
        np.testing.assert_array_equal(image, b["pixel_values"])
        np.testing.assert_array_equal(cond, b["conditioning_pixel_values"])
        np.testing.assert_array_equal(a["index"], b["index"])


def test_16_bit_conditions_travel_as_uint16(caplog):
    """A 16-bit condition keeps its depth: "auto" sends it as uint16 (the 8-bit target as
    uint8), exact where no resize interpolates; uint8 asked for rounds it, with a warning."""
    rng = np.random.default_rng(0)
    rows = [
        {
            "image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
            "conditioning_image": rng.integers(0, 65536, (8, 8), dtype=np.uint16),
            "caption": "x",
        }
        for _ in range(8)
    ]
    kw = dict(conditioning_channels=1, num_workers=0)
    with Loader(rows, 4, 8, seed=0, **kw) as loader:
        assert (loader.image_dtype, loader.condition_dtype) == (np.uint8, np.uint16)
        batch = next(loader)
    with Loader(rows, 4, 8, seed=0, image_dtype="float32", condition_dtype="float32", **kw) as ld:
        want = next(ld)
    assert batch["conditioning_pixel_values"].dtype == np.uint16
    image, cond = _as_model_floats(batch)
    np.testing.assert_array_equal(image, want["pixel_values"])
    np.testing.assert_array_equal(cond, want["conditioning_pixel_values"])
    with caplog.at_level("WARNING", logger="cn_jax.data.loader"):
        with Loader(rows, 4, 8, seed=0, condition_dtype="uint8", **kw) as loader:
            coarse = next(loader)["conditioning_pixel_values"]
    assert "rounded to 8 bits" in caplog.text
    assert coarse.dtype == np.uint8
    _, coarse = _as_model_floats({**batch, "conditioning_pixel_values": coarse})
    np.testing.assert_allclose(coarse, want["conditioning_pixel_values"], atol=0.5 / 255 + 1e-6)
    with pytest.raises(ValueError, match="float32 together"):
        Loader(rows, 4, 8, seed=0, image_dtype="float32")


def test_images_false_reads_only_the_target_size(fill_dir, tmp_path):
    """Cached latents need no target pixels: ``images=False`` reads only each target's size
    (the condition's geometry is unchanged), so a target whose pixels are truncated still
    gives the same conditions, and batches carry no ``pixel_values``."""
    ds = [dict(r) for r in open_dataset(fill_dir)]
    truncated = tmp_path / "truncated.png"
    data = Path(ds[0]["image"]).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    for r in ds:
        r["image"] = str(truncated)
    kw = dict(random_crop=True, random_flip=True, num_workers=1)
    with Loader(open_dataset(fill_dir), 4, 24, seed=3, **kw) as loader:
        want = _take(loader, 2)
    with Loader(ds, 4, 24, seed=3, images=False, **kw) as loader:
        got = _take(loader, 2)
    for a, b in zip(got, want):
        assert "pixel_values" not in a
        np.testing.assert_array_equal(
            a["conditioning_pixel_values"], b["conditioning_pixel_values"]
        )
    with Loader(ds, 4, 24, seed=3, num_workers=0) as loader, pytest.raises(BadSampleError):
        next(loader)  # reading the pixels of that target fails


def test_images_false_keeps_the_geometry_of_a_condition_of_another_size():
    rng = np.random.default_rng(1)
    rows = [
        {
            "image": rng.integers(0, 256, (40, 50, 3), dtype=np.uint8),
            "conditioning_image": rng.integers(0, 256, (20, 25, 3), dtype=np.uint8),
            "caption": "x",
        }
        for _ in range(4)
    ]
    kw = dict(random_crop=True, random_flip=True, num_workers=0)
    with (
        Loader(rows, 4, 16, seed=0, **kw) as a,
        Loader(rows, 4, 16, seed=0, images=False, **kw) as b,
    ):
        np.testing.assert_array_equal(
            next(a)["conditioning_pixel_values"], next(b)["conditioning_pixel_values"]
        )


def test_prefetch_keeps_items_ahead_in_order():
    from cn_jax.data.loader import prefetch

    produced = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i

    it = prefetch(items(), 2)
    assert next(it) == 0 and produced == [0, 1, 2]  # two produced ahead of the consumer
    assert list(it) == [1, 2, 3, 4]


def test_real_tokenizer_from_worker_threads_gives_padded_ids(fill_dir):
    """The bundled CLIP tokenizer through `cn_jax.tokenizer.tokenize` from 4 worker threads:
    every row padded to the length asked (unlocked, concurrent calls returned unpadded ids)."""
    from cn_jax.tokenizer import load_tokenizer, tokenize
    from cn_jax.weights.sd import BUNDLED_TOKENIZER

    tok = load_tokenizer(BUNDLED_TOKENIZER)
    kw = dict(num_workers=4, num_epochs=8, tokenize=lambda p: tokenize(tok, p, 77))
    with Loader(open_dataset(fill_dir), 4, 8, seed=0, **kw) as loader:
        shapes = {b["input_ids"].shape for b in loader}
    assert shapes == {(4, 77)}
