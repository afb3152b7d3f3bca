"""`data.cache_latents: true`: the frozen encoders run once over the dataset.

The VAE encoder costs about half a ControlNet step in FLOPs and the text
encoder a little more, and both are frozen: their outputs for a sample never
change. The cache keeps, per dataset row, the VAE posterior (mean and
log-variance, so each step still draws a fresh latent sample, as without the
cache) and the caption's text embedding, plus the embedding of the empty
prompt used for prompt dropout; SDXL adds the pooled embedding of both
(`text_embeds`, `empty_text_embeds`; the size numbers come from the loader). It is
written under `<workdir>/latent_cache/` and reused on resume. Host memory:
(2 * latent size + L * D) floats a row, e.g. about 360 KB a row for SD 1.5 at 512 px,
about 1.2 MB for SDXL at 1024 px.

Needs a fixed crop (no random crop or flip: the latent of a flipped image is
not the flipped latent) and one caption per row.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cn_jax.data.transforms import preprocess_pair
from cn_jax.models.clip_text import encode_text
from cn_jax.tokenizer import tokenize
from cn_jax.train import sharding as shd

CACHE_DIR = "latent_cache"
_FILES = ("mean", "logvar", "context", "empty_context", "text_embeds", "empty_text_embeds")


def check_cacheable(config) -> None:
    if config.data.random_crop or config.data.random_flip:
        raise ValueError(
            "data.cache_latents needs a fixed crop: set data.random_crop and data.random_flip "
            "to false (a cached latent cannot be re-cropped or flipped)"
        )


def build_cache(config, models, params: dict, sd, dataset, workdir: Path, batch_size: int = 16):
    """Compute (or load) the cache; returns a dict of numpy arrays indexed by row."""
    out = Path(workdir) / CACHE_DIR
    n = len(dataset)
    meta = {"rows": n, "resolution": config.data.resolution, "path": str(config.data.path)}
    sdxl = models.unet.config.has_text_time
    if sdxl:  # two text encoders and a pooled embedding: another cache
        meta["sdxl"] = True
    if (out / "meta.json").is_file() and json.loads((out / "meta.json").read_text()) == meta:
        files = [k for k in _FILES if (out / f"{k}.npy").exists()]
        return {k: np.load(out / f"{k}.npy", mmap_mode="r") for k in files}
    check_cacheable(config)
    max_len = sd.text_encoder.config.max_position_embeddings

    def text(ids):
        ctx, pooled = encode_text(models.text_encoder, params["text_encoder"], ids)
        return ctx, pooled if sdxl else None

    @jax.jit
    def encode(pixels, ids):
        ctx, pooled = text(ids)
        if models.vae is None:
            return None, None, ctx, pooled
        mean, logvar = models.vae.apply({"params": params["vae"]}, pixels, method="encode")
        return mean, logvar, ctx, pooled

    chunks: dict[str, list] = {"mean": [], "logvar": [], "context": [], "text_embeds": []}
    from tqdm import tqdm

    for start in tqdm(range(0, n, batch_size), desc="caching latents", unit="batch"):
        rows = range(start, min(start + batch_size, n))
        pixels, ids = [], []
        for i in rows:
            row = dataset[i]
            cap = row["caption"]
            if not isinstance(cap, str):
                raise ValueError(
                    f"data.cache_latents: row {i} has {len(cap)} captions; the cache needs one "
                    "caption per row"
                )
            img, _ = preprocess_pair(
                row["image"], row["conditioning_image"], config.data.resolution,
                conditioning_channels=config.model.conditioning_channels, row=i,
            )  # fmt: skip
            pixels.append(img)
            ids.append(cap)
        mean, logvar, ctx, pooled = encode(
            jnp.asarray(np.stack(pixels)), tokenize(sd.tokenizer, ids, max_len)
        )
        # Every process encodes every row (the frozen encoders may be split over them
        # all, mesh.fsdp); to_host gathers what another process's devices hold.
        chunks["context"].append(shd.to_host(ctx))
        if pooled is not None:
            chunks["text_embeds"].append(shd.to_host(pooled))
        if mean is not None:
            chunks["mean"].append(shd.to_host(mean))
            chunks["logvar"].append(shd.to_host(logvar))
    empty, empty_pooled = text(tokenize(sd.tokenizer, [""], max_len))
    cache = {k: np.concatenate(v) for k, v in chunks.items() if v}
    cache["empty_context"] = shd.to_host(empty[0])
    if empty_pooled is not None:
        cache["empty_text_embeds"] = shd.to_host(empty_pooled[0])
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        for k, v in cache.items():
            np.save(out / f"{k}.npy", v)
        (out / "meta.json").write_text(json.dumps(meta))
    return cache


def cached_batch(cache: dict, local: dict, has_vae: bool) -> dict:
    """Replace a loader batch's images/captions by the cached encodings.

    `local` comes from a loader without a tokenizer: `captions` (with dropped
    prompts already "") and `index` (dataset rows); for a latent model, from one
    that reads no target images (``Loader(images=False)``: no ``pixel_values``).
    """
    index = np.asarray(local.pop("index"))
    captions = local.pop("captions")
    dropped = np.array([c == "" for c in captions])
    ctx = np.asarray(cache["context"][index])
    ctx[dropped] = cache["empty_context"]
    local["encoder_hidden_states"] = ctx
    if "text_embeds" in cache:  # SDXL
        pooled = np.asarray(cache["text_embeds"][index])
        pooled[dropped] = cache["empty_text_embeds"]
        local["text_embeds"] = pooled
    if has_vae:
        local.pop("pixel_values", None)
        local["latent_mean"] = np.asarray(cache["mean"][index])
        local["latent_logvar"] = np.asarray(cache["logvar"][index])
    return local
