"""`cn-jax bench data`: samples/s of the host input pipeline, against a bare decode loop.

The pipeline measured is the one training builds (`cn_jax.data.Loader` over
`open_dataset`, the config's resolution, crops, flips, dropout and tokenizer), on a
generated fill50k dataset of `size` px PNGs (512 by default: what SD 1.5 trains on).
Beside it, in the same run and over the same files, a bare loop on one thread decodes
each pair with PIL and resizes it to the resolution, nothing else: the most one core
can do with this decoder. The ratio of the two, per worker, is the pipeline's
efficiency (the issue's target: >= 0.9); what remains is the loader's own cost
(float conversion, threads, tokenizing). `cores_per_gpu` turns the per-worker rate
into the host cores one GPU needs at `gpu_samples_per_s` (an H100 trains SD 1.5
ControlNet at about 25-40 samples/s at 512 px).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cn_jax.config import Config

# An H100's SD 1.5 ControlNet rate at 512 px, the top of the issue's 25-40 samples/s.
GPU_SAMPLES_PER_S = 40.0
MAX_LEN = 77  # CLIP's token ids per prompt in every SD base


def bare_decode(files: list[tuple[Path, Path]], resolution: int) -> float:
    """Samples/s of decoding each (target, condition) PNG pair with PIL on this thread and
    resizing it to `resolution` (bicubic, as the loader) into uint8 arrays: the floor cost."""
    start = time.perf_counter()
    for target, source in files:
        for path in (target, source):
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != (resolution, resolution):
                    img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
                np.asarray(img)
    return len(files) / (time.perf_counter() - start)


def loader_rate(config: Config, dataset: Any, workers: int, batch: int, tokenize) -> float:
    """Samples/s of one epoch of the real `Loader` with `workers` decode threads (timed
    from the first batch's request to the last batch's arrival: thread start included)."""
    from cn_jax.data import Loader

    d = config.data
    loader = Loader(
        dataset, global_batch_size=batch, resolution=d.resolution, seed=config.train.seed,
        proportion_empty_prompts=d.proportion_empty_prompts,
        conditioning_channels=config.model.conditioning_channels, random_crop=d.random_crop,
        random_flip=d.random_flip, on_bad_sample=d.on_bad_sample, num_workers=workers,
        prefetch=d.prefetch, tokenize=None if d.cache_latents else tokenize, num_epochs=1,
    )  # fmt: skip
    with loader:
        start = time.perf_counter()
        rows = sum(len(b["index"]) for b in loader)
        return rows / (time.perf_counter() - start)


def _tokenizer_folder(config: Config) -> Path:
    """The tokenizer training would use, where it can be found without loading weights:
    `model.tokenizer`, a local base folder's, else the bundled tiny one (a CLIP BPE
    tokenizer too: its cost per caption is what is measured)."""
    from cn_jax.weights.sd import BUNDLED_TOKENIZER

    m = config.model
    if m.tokenizer:
        return Path(m.tokenizer)
    if m.base and (Path(m.base) / "tokenizer").is_dir():
        return Path(m.base) / "tokenizer"
    return Path(BUNDLED_TOKENIZER)


def bench_data(
    config: Config,
    workers: list[int] | None = None,
    data_dir: str | os.PathLike | None = None,
    samples: int = 256,
    size: int = 512,
    batch: int | None = None,
    gpu_samples_per_s: float = GPU_SAMPLES_PER_S,
) -> dict[str, Any]:
    """Measure the input pipeline; returns the JSON-ready result.

    Args:
      config: the training config (its data section and tokenizer are used).
      workers: the loader's worker counts to measure; default 1 and 2.
      data_dir: where the generated dataset is (or is written); a temporary folder if None.
        A folder already holding a fill50k set of `samples` rows at `size` is reused.
      samples: rows in the generated dataset (one epoch is timed per measurement).
      size: the generated images' side in pixels.
      batch: the loader's batch size; default min(train.batch_size, samples).
      gpu_samples_per_s: the training rate one GPU needs, for `cores_per_gpu`.
    """
    from cn_jax.data import open_dataset
    from cn_jax.data.fill50k import make_fill50k
    from cn_jax.tokenizer import load_tokenizer, tokenize

    workers = workers or [1, 2]
    if any(w < 1 for w in workers):
        raise ValueError(f"--workers must be >= 1, got {workers}")
    batch = min(batch or config.train.batch_size, samples)
    resolution = config.data.resolution
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cn_jax-bench-data-")
        data_dir = tmp.name
    data_dir = Path(data_dir)
    try:
        start = time.perf_counter()
        stamp = data_dir / "bench_meta.txt"
        want = f"fill50k samples={samples} size={size}\n"
        if not (stamp.is_file() and stamp.read_text() == want):
            make_fill50k(data_dir, samples, size=size)
            stamp.write_text(want)
        generate_s = time.perf_counter() - start
        files = [(data_dir / "target" / f"{i}.png", data_dir / "source" / f"{i}.png")
                 for i in range(samples)]  # fmt: skip
        dataset = open_dataset(data_dir, format="fill50k")
        tok_folder = _tokenizer_folder(config)
        tok = load_tokenizer(tok_folder)

        def tok_fn(prompts):
            return tokenize(tok, prompts, MAX_LEN)

        bare_decode(files[: min(8, samples)], resolution)  # warm the page cache and PIL
        bare = bare_decode(files, resolution)
        rows = []
        for w in workers:
            rate = loader_rate(config, dataset, w, batch, tok_fn)
            rows.append({
                "workers": w,
                "samples_per_s": rate,
                "samples_per_s_per_worker": rate / w,
                "efficiency_per_worker": rate / (w * bare),
            })  # fmt: skip
        # Bare rate after the loaders too: the machine's load may have changed meanwhile.
        bare_after = bare_decode(files, resolution)
    finally:
        if tmp is not None:
            tmp.cleanup()
    bare_rate = (bare + bare_after) / 2
    for r in rows:
        r["efficiency_per_worker"] = r["samples_per_s"] / (r["workers"] * bare_rate)
    per_core = max(r["samples_per_s_per_worker"] for r in rows)
    return {
        "bench": "data",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores visible, {platform.node()}",
        "resolution": resolution,
        "image_size": size,
        "samples": samples,
        "batch_size": batch,
        "conditioning_channels": config.model.conditioning_channels,
        "cache_latents": config.data.cache_latents,
        "tokenizer": str(tok_folder),
        "generate_s": generate_s,
        "bare_samples_per_s": bare_rate,
        "bare_samples_per_s_runs": [bare, bare_after],
        "loader": rows,
        "gpu_samples_per_s": gpu_samples_per_s,
        "cores_per_gpu": math.ceil(gpu_samples_per_s / per_core),
        "cores_per_gpu_bare": math.ceil(gpu_samples_per_s / bare_rate),
    }


def format_data(r: dict) -> str:
    lines = [
        f"bench data: {r['resolution']} px from {r['image_size']} px PNGs, {r['samples']} "
        f"samples, batch {r['batch_size']}, {r['machine']}",
        f"  bare decode+resize (1 thread)  {r['bare_samples_per_s']:.4g} samples/s",
    ]
    for row in r["loader"]:
        lines.append(
            f"  Loader, {row['workers']} worker(s)          {row['samples_per_s']:.4g} "
            f"samples/s ({row['samples_per_s_per_worker']:.4g} per worker, efficiency "
            f"{row['efficiency_per_worker']:.2f} per worker)"
        )
    lines.append(
        f"  host cores one GPU needs at {r['gpu_samples_per_s']:g} samples/s: "
        f"{r['cores_per_gpu']} (bare decode: {r['cores_per_gpu_bare']})"
    )
    return "\n".join(lines)
