"""A synthetic fill50k: the toy ControlNet task of "fill the outlined circle".

lllyasviel's fill50k teaches a ControlNet to paint a filled circle exactly where the
condition draws its outline, in the colours the prompt names. This module writes a
dataset with the original layout, at any size and count, deterministically from a seed::

    out_dir/
      prompt.json        one JSON object per line:
                         {"source": "source/0.png", "target": "target/0.png",
                          "prompt": "red circle with navy blue background"}
      source/N.png       the condition: a white circle outline (about 1.5 px) on black, RGB
      target/N.png       the same circle filled with one palette colour on a background of
                         another, RGB
      fill50k_meta.json  {"num", "size", "seed", "palette"}: not in the original layout; it
                         lets an evaluation recover the ground truth without re-deriving it

Each sample is drawn from its own generator seeded by (seed, index), so `fill50k_truth`
returns the ground truth of any index without generating the others, and a dataset of 100
samples is the first 100 samples of one of 50,000 with the same seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

# Named colours (CSS values) used for fills and backgrounds. Chosen to be pairwise far apart
# in RGB (the closest pair, blue / navy blue, differ by 127 on one channel) so an evaluation
# can name the colour of a generated region by its nearest palette entry.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "orange": (255, 165, 0),
    "yellow": (255, 255, 0),
    "green": (0, 128, 0),
    "cyan": (0, 255, 255),
    "blue": (0, 0, 255),
    "navy blue": (0, 0, 128),
    "purple": (128, 0, 128),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}

# The outline is the band |distance - radius| <= LINE_HALF_WIDTH: 1 to 2 px wide depending on
# where the circle crosses the pixel grid, like the original's thin white line.
LINE_HALF_WIDTH = 0.75
# Radius bounds as fractions of the image side: small enough that the circle fits with room
# to move, large enough that the outline of a 64 px image is still a visible ring.
MIN_RADIUS_FRACTION = 0.1
MAX_RADIUS_FRACTION = 0.4
META_NAME = "fill50k_meta.json"
PROGRESS_MIN = 1000  # show a progress bar from this many samples on


@dataclass(frozen=True)
class CircleTruth:
    """The ground truth of one fill50k sample.

    Coordinates are continuous pixel coordinates: pixel (x, y) covers [x, x+1) x [y, y+1),
    so its centre is at (x + 0.5, y + 0.5).

    Attributes:
      center: (x, y) of the circle's centre.
      radius: the circle's radius in pixels.
      fill: palette name of the disk's colour.
      background: palette name of the background's colour (never equal to `fill`).
    """

    center: tuple[float, float]
    radius: float
    fill: str
    background: str

    @property
    def prompt(self) -> str:
        """The sample's prompt, e.g. "red circle with navy blue background"."""
        return f"{self.fill} circle with {self.background} background"


def fill50k_truth(index: int, size: int = 64, seed: int = 0) -> CircleTruth:
    """The ground truth (centre, radius, fill and background colour) of sample `index`.

    Args:
      index: the sample index (>= 0).
      size: the image side the dataset was generated at.
      seed: the seed the dataset was generated with.

    Returns:
      The `CircleTruth` that `make_fill50k(..., size=size, seed=seed)` drew for `index`.
    """
    _check_args(size, seed)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, index])
    # Upper bound also capped so that the outline plus margin fits even at the smallest size.
    max_radius = min(MAX_RADIUS_FRACTION * size, size / 2 - LINE_HALF_WIDTH - 1.0)
    radius = float(rng.uniform(MIN_RADIUS_FRACTION * size, max_radius))
    # Keep the whole outline band (and one pixel of margin) inside the image.
    margin = radius + LINE_HALF_WIDTH + 1.0
    cx, cy = (float(v) for v in rng.uniform(margin, size - margin, size=2))
    names = list(PALETTE)
    fill, background = rng.choice(len(names), size=2, replace=False)
    return CircleTruth((cx, cy), radius, names[int(fill)], names[int(background)])


def render_fill50k(truth: CircleTruth, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one sample's (source, target) images as uint8 RGB arrays of shape (size, size, 3).

    The disk is the set of pixels whose centre lies within `radius` of the circle's centre,
    with hard edges, so every target pixel is exactly its fill or background colour.
    """
    coords = np.arange(size, dtype=np.float64) + 0.5
    dist = np.hypot(coords[None, :] - truth.center[0], coords[:, None] - truth.center[1])
    source = np.zeros((size, size, 3), np.uint8)
    source[np.abs(dist - truth.radius) <= LINE_HALF_WIDTH] = 255
    target = np.empty((size, size, 3), np.uint8)
    target[...] = PALETTE[truth.background]
    target[dist <= truth.radius] = PALETTE[truth.fill]
    return source, target


def make_fill50k(out_dir: str | os.PathLike, num: int, size: int = 64, seed: int = 0) -> Path:
    """Write a synthetic fill50k dataset in the original layout.

    The output is byte-identical for the same (num, size, seed). Existing files of the same
    names are overwritten. `prompt.json` is written last (atomically), so an interrupted run
    never leaves a folder that looks complete.

    Args:
      out_dir: the folder to write (created if needed).
      num: the number of samples (>= 1).
      size: the image side in pixels (>= 16).
      seed: the seed (>= 0); sample i is drawn from a generator seeded by (seed, i).

    Returns:
      The dataset folder as a `Path`.
    """
    _check_args(size, seed)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    out = Path(out_dir)
    (out / "source").mkdir(parents=True, exist_ok=True)
    (out / "target").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in tqdm(range(num), desc="fill50k", unit="img", disable=num < PROGRESS_MIN):
        truth = fill50k_truth(i, size, seed)
        source, target = render_fill50k(truth, size)
        # Fixed PNG options: the encoder is deterministic, so the bytes are too.
        Image.fromarray(source).save(out / "source" / f"{i}.png", format="PNG")
        Image.fromarray(target).save(out / "target" / f"{i}.png", format="PNG")
        lines.append(
            json.dumps(
                {"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": truth.prompt}
            )
        )
    meta = {
        "num": num,
        "size": size,
        "seed": seed,
        "palette": {k: list(v) for k, v in PALETTE.items()},
    }
    (out / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    tmp = out / "prompt.json.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "prompt.json")
    return out


def read_fill50k_meta(folder: str | os.PathLike) -> dict:
    """Read `fill50k_meta.json` ({"num", "size", "seed", "palette"}) of a generated dataset.

    Pass its size and seed to `fill50k_truth` to get any sample's ground truth.

    Raises:
      FileNotFoundError: the folder was not written by `make_fill50k` (the message names it).
    """
    path = Path(folder) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} not found: only datasets written by make_fill50k carry their "
            "ground truth"
        )
    return json.loads(path.read_text())


def _check_args(size: int, seed: int) -> None:
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
