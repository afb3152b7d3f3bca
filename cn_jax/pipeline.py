"""`ControlNetPipeline`: frozen Stable Diffusion + one or more ControlNets -> images.

Text encoding, the whole denoising loop (`lax.scan`) and the VAE decode are one
jitted program, compiled once per (shapes, sampler, steps, options) and reused:
a second call with the same shapes does not recompile. The batch is split over
all local devices when it divides evenly (the training mesh code).

Semantics follow diffusers' `StableDiffusionControlNetPipeline`: classifier-free
guidance with [negative; positive] in one batch, `controlnet_conditioning_scale`
per ControlNet, `control_guidance_start/end` windows, guess mode (the ControlNet
sees only the conditional half) and several ControlNets summed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cn_jax.diffusion.guidance import guess_mode_scales
from cn_jax.diffusion.samplers import make_sampler
from cn_jax.models.controlnet import ControlNet
from cn_jax.train import sharding as shd


class ControlNetPipeline:
    """Generate images from prompts and condition images.

    Build with `ControlNetPipeline.from_pretrained(base_path, controlnet=...)`
    or from a loaded `StableDiffusion` bundle and `(ControlNet, params)` pairs.
    """

    def __init__(self, sd, controlnets: Sequence[tuple[ControlNet, Any]], dtype=jnp.float32):
        if sd.tokenizer is None:
            raise ValueError("the base model has no tokenizer: pass tokenizer=<tokenizer folder>")
        self.sd = sd
        self.dtype = jnp.dtype(dtype)
        self.unet = sd.unet.clone(dtype=self.dtype)
        self.vae = sd.vae.clone(dtype=self.dtype) if sd.vae is not None else None
        self.text_encoder = sd.text_encoder.clone(dtype=self.dtype)
        self.controlnets = [c.clone(dtype=self.dtype) for c, _ in controlnets]
        self.params = {
            "unet": sd.unet_params,
            "vae": sd.vae_params,
            "text_encoder": sd.text_encoder_params,
            "controlnets": [p for _, p in controlnets],
        }
        self.latent_factor = 1 if self.vae is None else self.vae.config.latent_factor
        for c in self.controlnets:
            if c.config.latent_factor != self.latent_factor:
                raise ValueError(
                    f"a ControlNet expects latent factor {c.config.latent_factor}, the base "
                    f"model has {self.latent_factor}"
                )
        self._compiled: dict = {}
        self.trace_count = 0  # how many times the generation program was traced
        self.sharded_batches: set[int] = set()  # batch sizes split over the local devices

    @classmethod
    def from_pretrained(
        cls,
        base_path: str | os.PathLike,
        controlnet: str | os.PathLike | Sequence[str | os.PathLike] = (),
        dtype=jnp.float32,
        base_config: str | None = None,
        tokenizer: str | os.PathLike | None = None,
        allow_pickle: bool = False,
    ) -> ControlNetPipeline:
        """Load a base model (diffusers folder or one checkpoint + `base_config`)
        and one ControlNet path or a list of them."""
        from cn_jax.weights.folders import load_controlnet
        from cn_jax.weights.sd import load_pipeline

        sd = load_pipeline(
            base_path, config=base_config, tokenizer=tokenizer, allow_pickle=allow_pickle
        )
        paths = [controlnet] if isinstance(controlnet, str | os.PathLike) else list(controlnet)
        nets = [load_controlnet(p, allow_pickle=allow_pickle) for p in paths]
        return cls(sd, nets, dtype=dtype)

    # -- inputs ---------------------------------------------------------------------
    def _condition(self, image, index: int, size: tuple[int, int] | None) -> np.ndarray:
        """One control image -> float32 (H, W, C) in [0, 1] at `size` (H, W)."""
        channels = self.controlnets[index].config.conditioning_channels
        if isinstance(image, str | os.PathLike):
            try:
                image = Image.open(image)
                image.load()
            except (OSError, ValueError) as e:
                raise ValueError(f"control image {image}: not a readable image ({e})") from None
        if isinstance(image, Image.Image):
            image = image.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(image, np.float32) / 255.0
        else:
            arr = np.asarray(image, np.float32)
            if arr.max(initial=0.0) > 1.0:  # uint8-style values
                arr = arr / 255.0
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[-1] != channels:
            raise ValueError(
                f"control image {index} has shape {arr.shape}; ControlNet {index} expects "
                f"(H, W, {channels})"
            )
        if size is not None and arr.shape[:2] != size:
            u8 = np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8)
            pil = Image.fromarray(u8[..., 0] if channels == 1 else u8)
            arr = np.asarray(pil.resize((size[1], size[0]), Image.LANCZOS), np.float32) / 255.0
            arr = arr[..., None] if arr.ndim == 2 else arr
        return arr

    def _size(self, first_hw: tuple[int, int], height, width) -> tuple[int, int]:
        m = max(8, self.latent_factor)  # diffusers: a multiple of 8
        h, w = height or first_hw[0], width or first_hw[1]
        h2, w2 = h - h % m, w - w % m
        if (h2, w2) != (h, w):
            warnings.warn(
                f"output size {h}x{w} is not a multiple of {m}; using {h2}x{w2}", stacklevel=3
            )
        return h2, w2

    # -- generation -----------------------------------------------------------------
    def __call__(
        self,
        prompt: str | Sequence[str],
        image: Any = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        scheduler: str = "ddim",
        seed: int = 0,
        latents: np.ndarray | None = None,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        guess_mode_scales_kind: str = "diffusers",
    ):
        """Generate images (see the module docstring for the semantics).

        Args:
          prompt: a string or a list of strings.
          image: the control image (PIL, array in [0, 1] or uint8, or a path),
            or a list with one per ControlNet; None for a pipeline without
            ControlNets (the base model alone, at the UNet's sample size unless
            height/width are given).
          latents: NHWC initial noise (B * num_images_per_prompt, h, w, C),
            scaled by the sampler's `init_noise_sigma` as diffusers does.
          output_type: "pil" (list of PIL images) or "np" (NHWC float in [0, 1]).
          guess_mode_scales_kind: per-resolution scales in guess mode:
            "diffusers" (logspace(-1, 0, 13)), "original" (0.825 ** (12 - i)),
            or "paper" (64 / h_i at the block's spatial size).

        Returns:
          A list of PIL images or an NHWC numpy array.
        """
        n_nets = len(self.controlnets)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if n_nets == 0 and image is None:  # the base model alone
            images = []
        elif isinstance(image, list | tuple) and n_nets > 1:
            images = list(image)
        else:
            images = [image]
        if len(images) != n_nets:
            raise ValueError(f"{len(images)} control images for {n_nets} ControlNets")
        scales = _per_net(controlnet_conditioning_scale, n_nets, "controlnet_conditioning_scale")
        starts = _per_net(control_guidance_start, n_nets, "control_guidance_start")
        ends = _per_net(control_guidance_end, n_nets, "control_guidance_end")

        if images:
            first_hw = self._condition(images[0], 0, None).shape[:2]
        elif height and width:
            first_hw = (height, width)
        else:  # no condition to take the size from: the UNet's own
            if self.unet.config.sample_size is None:
                raise ValueError("no control image and no UNet sample_size: pass height and width")
            side = self.unet.config.sample_size * self.latent_factor
            first_hw = (side, side)
        h, w = self._size(first_hw, height, width)
        conds = [self._condition(img, i, (h, w)) for i, img in enumerate(images)]
        batch = len(prompts) * num_images_per_prompt
        conds = [np.broadcast_to(c, (batch, *c.shape)).copy() for c in conds]

        from cn_jax.tokenizer import tokenize

        max_len = self.text_encoder.config.max_position_embeddings
        rep = lambda xs: [x for x in xs for _ in range(num_images_per_prompt)]  # noqa: E731
        ids = tokenize(self.sd.tokenizer, rep(prompts), max_len)
        neg_ids = tokenize(self.sd.tokenizer, rep(negatives), max_len)

        sampler = make_sampler(scheduler, self.sd.schedule, num_inference_steps)
        n_steps = len(sampler)
        # diffusers' controlnet_keep: a net acts at step i iff i/n >= start and (i+1)/n <= end.
        steps = np.arange(n_steps)
        keep = np.zeros((n_nets, n_steps), np.float32)  # (nets, steps)
        for k, (s, e) in enumerate(zip(starts, ends)):
            keep[k] = 1.0 - ((steps / n_steps < s) | ((steps + 1) / n_steps > e))
        channels = self.unet.config.in_channels
        lh, lw = h // self.latent_factor, w // self.latent_factor
        if latents is None:
            latents = jax.random.normal(jax.random.PRNGKey(seed), (batch, lh, lw, channels))
        elif tuple(np.shape(latents)) != (batch, lh, lw, channels):
            want = (batch, lh, lw, channels)
            raise ValueError(f"latents have shape {tuple(np.shape(latents))}; expected {want}")
        cfg = guidance_scale > 1.0
        static = (cfg, bool(guess_mode), guess_mode_scales_kind, h, w)
        fn = self._program(static, batch)
        block_scales = None
        if guess_mode:
            block_scales = guess_mode_scales(
                guess_mode_scales_kind, self.controlnets[0].config, (lh, lw), 1.0
            )
        out = fn(
            self.params,
            jnp.asarray(latents, jnp.float32) * sampler.init_noise_sigma,
            jnp.asarray(ids),
            jnp.asarray(neg_ids),
            [jnp.asarray(c) for c in conds],
            jnp.asarray(scales, jnp.float32),
            jnp.asarray(keep),
            jnp.float32(guidance_scale),
            sampler,
            None if block_scales is None else jnp.asarray(block_scales, jnp.float32),
            jax.random.PRNGKey(seed + 1),
        )
        out = np.asarray(out, np.float32)
        if output_type == "np":
            return out
        if output_type != "pil":
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        u8 = np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)
        return [Image.fromarray(x.squeeze(-1) if x.shape[-1] == 1 else x) for x in u8]

    def _program(self, static: tuple, batch: int):
        """The jitted generation program for these static options (cached)."""
        key = (static, batch)
        if key in self._compiled:
            return self._compiled[key]
        cfg, guess_mode, _, _, _ = static
        unet, vae, te, nets = self.unet, self.vae, self.text_encoder, self.controlnets
        scaling = vae.config.scaling_factor if vae is not None else 1.0

        def generate(params, latents, ids, neg_ids, conds, scales, keep, g, sampler, bscales, rng):
            self.trace_count += 1  # runs at trace time only
            encode = lambda x: te.apply({"params": params["text_encoder"]}, x)[0]  # noqa: E731
            ctx = encode(ids)
            full_ctx = jnp.concatenate([encode(neg_ids), ctx]) if cfg else ctx
            # In guess mode the ControlNets see only the conditional half.
            net_ctx = ctx if guess_mode else full_ctx
            net_conds = conds
            if cfg and not guess_mode:
                net_conds = [jnp.concatenate([c, c]) for c in conds]
            state = sampler.init_state(latents, rng)

            def body(carry, i):
                state, x = carry
                scaled = sampler.scale_model_input(x, i)
                inp = jnp.concatenate([scaled, scaled]) if cfg else scaled
                t = sampler.model_timestep(i)
                net_in = scaled if guess_mode else inp
                down = mid = None
                for k, net in enumerate(nets):
                    s = scales[k] * keep[k, i]
                    tt = jnp.full((net_in.shape[0],), t, jnp.float32)
                    if bscales is not None:  # guess mode: per-resolution scales
                        d, m = net.apply(
                            {"params": params["controlnets"][k]}, net_in, tt, net_ctx, net_conds[k]
                        )
                        d = [r * (s * bscales[j]).astype(r.dtype) for j, r in enumerate(d)]
                        m = m * (s * bscales[-1]).astype(m.dtype)
                    else:
                        d, m = net.apply(
                            {"params": params["controlnets"][k]}, net_in, tt, net_ctx,
                            net_conds[k], conditioning_scale=s,
                        )  # fmt: skip
                    down = d if down is None else [a + b for a, b in zip(down, d)]
                    mid = m if mid is None else mid + m
                if guess_mode and cfg and down is not None:
                    down = [jnp.concatenate([jnp.zeros_like(r), r]) for r in down]
                    mid = jnp.concatenate([jnp.zeros_like(mid), mid])
                tb = jnp.full((inp.shape[0],), t, jnp.float32)
                out = unet.apply(
                    {"params": params["unet"]}, inp, tb, full_ctx,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid,
                ).astype(jnp.float32)  # fmt: skip
                if cfg:
                    uncond, cond = jnp.split(out, 2)
                    out = uncond + g * (cond - uncond)
                state, x = sampler.step(state, i, out, x)
                return (state, x), None

            (_, x), _ = jax.lax.scan(body, (state, latents), jnp.arange(len(sampler)))
            if vae is not None:
                x = vae.apply({"params": params["vae"]}, x / scaling, method="decode")
            return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

        n_dev = len(jax.local_devices())
        if n_dev > 1 and batch % n_dev == 0 and jax.process_count() == 1:
            mesh = shd.make_mesh(1, jax.local_devices())
            self.sharded_batches.add(batch)
            bs, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
            fn = jax.jit(
                generate,
                in_shardings=(rep, bs, bs, bs, bs, rep, rep, rep, rep, rep, rep),
                out_shardings=bs,
            )
        else:
            fn = jax.jit(generate)
        self._compiled[key] = fn
        return fn


def _per_net(value, n: int, name: str) -> list[float]:
    values = [float(value)] * n if np.isscalar(value) else [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} ControlNets")
    return values


def save_grid(images: Sequence[Image.Image], path: str | os.PathLike, cols: int | None = None):
    """Tile images into one PNG (a row of up to `cols`)."""
    cols = cols or min(len(images), 4)
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid
