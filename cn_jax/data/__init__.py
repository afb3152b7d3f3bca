"""Training data: local datasets in the common layouts, transforms, the host loader, and a
synthetic fill50k.

    ds = open_dataset("data/fill50k")            # or imagefolder, save_to_disk, parquet
    with Loader(ds, global_batch_size=64, resolution=512, seed=0, tokenize=tok) as loader:
        for batch in loader:                     # this process's share, numpy NHWC
            ...
            checkpoint["data"] = loader.position  # resume: Loader(..., start_position=...)
"""

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
from cn_jax.data.fill50k import (
    PALETTE,
    CircleTruth,
    fill50k_truth,
    make_fill50k,
    read_fill50k_meta,
    render_fill50k,
)
from cn_jax.data.loader import Loader, SampleChoices, epoch_order, pick_caption, sample_choices
from cn_jax.data.sources import DatasetError, detect_format, open_dataset, resolve_inside
from cn_jax.data.transforms import BadSampleError, decode_image, preprocess_pair

__all__ = [
    "ANNOTATORS",
    "annotate",
    "canny",
    "content_shuffle",
    "grayscale",
    "inpaint_mask",
    "scribble",
    "tile",
    "PALETTE",
    "BadSampleError",
    "CircleTruth",
    "DatasetError",
    "Loader",
    "SampleChoices",
    "decode_image",
    "detect_format",
    "epoch_order",
    "fill50k_truth",
    "make_fill50k",
    "open_dataset",
    "pick_caption",
    "preprocess_pair",
    "read_fill50k_meta",
    "render_fill50k",
    "resolve_inside",
    "sample_choices",
]
