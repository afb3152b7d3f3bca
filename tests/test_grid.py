"""Labelled grids (`cn_jax.grid`): small cells scaled up by nearest neighbour,
column headers and row labels drawn, long labels wrapped and cut."""

import numpy as np
import pytest
from PIL import Image

from cn_jax.grid import ELLIPSIS, GAP, MIN_CELL, _font, _wrap, labelled_grid


def _cell(seed, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_small_cells_are_scaled_up_and_labelled():
    rows = [[_cell(3 * r + c) for c in range(3)] for r in range(2)]
    columns = ["condition", "base alone", "with the ControlNet"]
    prompts = ["red circle with navy blue background", "green circle with black background"]
    plain = np.asarray(labelled_grid(rows, min_cell=0))
    assert plain.shape == (2 * 32 + GAP, 3 * 32 + 2 * GAP, 3)  # as they are, 2 px gaps
    out = np.asarray(labelled_grid(rows, columns, prompts))
    k = -(-MIN_CELL // 32)  # a whole factor: 4
    cell = 32 * k
    top = out.shape[0] - (2 * cell + GAP)  # the header band
    left = out.shape[1] - (3 * cell + 2 * GAP)  # the row-label column
    assert cell >= MIN_CELL and top > 0 and left >= cell
    for r in range(2):
        for c in range(3):
            y, x = top + r * (cell + GAP), left + c * (cell + GAP)
            want = np.repeat(np.repeat(rows[r][c], k, axis=0), k, axis=1)  # nearest neighbour
            np.testing.assert_array_equal(out[y : y + cell, x : x + cell], want)
    header, labels = out[:top, left:], out[top:, :left]
    for band in (header, labels):  # text drawn on white: dark pixels, not one colour
        assert band.min() < 100 and band.max() == 255
    for c in range(3):  # every column has its own header
        assert header[:, c * (cell + GAP) : c * (cell + GAP) + cell].min() < 100
    for r in range(2):
        assert labels[r * (cell + GAP) : r * (cell + GAP) + cell].min() < 100


def test_large_cells_keep_their_size_and_gray_images_become_rgb():
    rows = [[_cell(0, 160)[..., :1], Image.fromarray(_cell(1, 160))]]
    out = labelled_grid(rows)
    assert out.mode == "RGB" and out.size == (2 * 160 + GAP, 160)


def test_long_labels_are_wrapped_and_cut_with_an_ellipsis():
    font = _font()
    prompt = "a photograph of an astronaut riding a horse on the moon, " * 10
    lines = _wrap(prompt, font, 150, 4)
    assert len(lines) == 4 and lines[-1].endswith(ELLIPSIS)
    assert all(font.getlength(line) <= 150 for line in lines)
    assert _wrap("short prompt", font, 150, 4) == ["short prompt"]
    word = _wrap("x" * 200, font, 60, 3)  # one word wider than a line is broken
    assert len(word) == 3 and all(font.getlength(line) <= 60 for line in word)
    tall = labelled_grid([[_cell(0)]], row_labels=[prompt])  # still one row high
    assert tall.size[1] == -(-MIN_CELL // 32) * 32


def test_mismatches_are_errors():
    with pytest.raises(ValueError, match=r"image \(0, 1\) is 16x16; the first 32x32"):
        labelled_grid([[_cell(0), _cell(1, 16)]])
    with pytest.raises(ValueError, match="2 column labels for 1 columns"):
        labelled_grid([[_cell(0)]], ["a", "b"])
    with pytest.raises(ValueError, match="1 row labels for 2 rows"):
        labelled_grid([[_cell(0)], [_cell(1)]], row_labels=["a"])
    with pytest.raises(ValueError, match="no images"):
        labelled_grid([])
