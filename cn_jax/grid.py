"""Image grids a person can read: the figures of `cn-jax sample --compare-base`
(the README's), and the training run's validation grids.

Small images are scaled up by a whole factor with nearest neighbour (pixels
stay sharp squares) until a cell is at least `min_cell` pixels; the columns get
a header band and the rows a label column (the prompts: word-wrapped, cut with
"..." where they do not fit), in PIL's default font.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 128  # px: smaller images are scaled up to at least this
LABEL_WIDTH = 160  # px: the least width of the row-label column
GAP = 2  # px of white between cells
PAD = 4  # px around a label
FONT_SIZE = 13
ELLIPSIS = "..."


def labelled_grid(
    rows: Sequence[Sequence[Image.Image | np.ndarray]],
    columns: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    min_cell: int = MIN_CELL,
) -> Image.Image:
    """Rows of equally sized images -> one RGB image with labels.

    Args:
      rows: PIL images or uint8 HWC arrays (1 or 3 channels), all one size.
      columns: a header per column (None: no header band).
      row_labels: a label per row, e.g. its prompt (None: no label column).
      min_cell: scale cells up (nearest neighbour, a whole factor) until both
        sides are at least this; 0 keeps the images' size.
    """
    cells = [[_rgb(im) for im in row] for row in rows]
    if not cells or not all(cells):
        raise ValueError("labelled_grid: no images (every row needs at least one)")
    w, h = cells[0][0].size
    for r, row in enumerate(cells):
        for c, im in enumerate(row):
            if im.size != (w, h):
                raise ValueError(
                    f"image ({r}, {c}) is {im.size[0]}x{im.size[1]}; the first {w}x{h}"
                )
    n_cols = max(len(row) for row in cells)
    if columns is not None and len(columns) != n_cols:
        raise ValueError(f"{len(columns)} column labels for {n_cols} columns")
    if row_labels is not None and len(row_labels) != len(cells):
        raise ValueError(f"{len(row_labels)} row labels for {len(cells)} rows")
    k = max(1, -(-min_cell // min(w, h))) if min_cell else 1
    cw, ch = w * k, h * k

    font = _font()
    line = _line_height(font)
    heads = [_wrap(t, font, cw - 2 * PAD, 2) for t in columns or ()]
    top = max(len(x) for x in heads) * line + 2 * PAD + GAP if heads else 0
    left = max(cw, LABEL_WIDTH) + GAP if row_labels is not None else 0
    size = (left + n_cols * (cw + GAP) - GAP, top + len(cells) * (ch + GAP) - GAP)
    out = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(out)
    for c, lines in enumerate(heads):
        x0 = left + c * (cw + GAP)
        for i, text in enumerate(lines):
            x = x0 + (cw - font.getlength(text)) / 2
            draw.text((x, PAD + i * line), text, fill="black", font=font)
    for r, row in enumerate(cells):
        y0 = top + r * (ch + GAP)
        if row_labels is not None:
            lines = _wrap(row_labels[r], font, left - GAP - 2 * PAD, max(1, (ch - 2 * PAD) // line))
            for i, text in enumerate(lines):
                draw.text((PAD, y0 + PAD + i * line), text, fill="black", font=font)
        for c, im in enumerate(row):
            out.paste(im.resize((cw, ch), Image.NEAREST), (left + c * (cw + GAP), y0))
    return out


def _rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


def _font():
    try:
        return ImageFont.load_default(size=FONT_SIZE)  # Pillow >= 10.1; bitmap without FreeType
    except TypeError:
        return ImageFont.load_default()


def _line_height(font) -> int:
    return int(font.getbbox("Ag|")[3]) + 3


def _wrap(text: str, font, width: float, max_lines: int) -> list[str]:
    """`text` in lines of at most `width` px (words kept whole unless one alone is
    too wide); past `max_lines`, the last line kept ends in "..."."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        joined = f"{current} {word}" if current else word
        if font.getlength(joined) <= width:
            current = joined
            continue
        if current:
            lines.append(current)
        while len(word) > 1 and font.getlength(word) > width:  # a word wider than a line
            n = 1
            while n < len(word) - 1 and font.getlength(word[: n + 1]) <= width:
                n += 1
            lines.append(word[:n])
            word = word[n:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + ELLIPSIS) > width:
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last.rstrip() + ELLIPSIS]
    return lines
