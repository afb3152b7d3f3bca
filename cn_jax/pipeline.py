"""`ControlNetPipeline`: frozen Stable Diffusion + one or more ControlNets -> images.

A call runs in steps: `prepare` checks and converts the inputs on the host
(conditions, token ids, sampler, guidance windows, initial noise) into a `Job`;
one jitted program then runs `encode` (text), `denoise` (the loop,
`cn_jax.diffusion.guidance.denoise`) and `decode` (VAE), compiled once per
(shapes, sampler, options) and reused: a second call with the same shapes does
not recompile. The batch is split over all local devices when it divides
evenly (the training mesh code). `cn-jax bench sample` times the same three
steps as separate programs.

Semantics follow diffusers' `StableDiffusionControlNetPipeline`: classifier-free
guidance with [negative; positive] in one batch, `controlnet_conditioning_scale`
per ControlNet, `control_guidance_start/end` windows, guess mode (the ControlNet
sees only the conditional half) and several ControlNets summed. An SDXL base
(a UNet with `addition_embed_type: text_time`) follows diffusers'
`StableDiffusionXLControlNetPipeline`: two tokenizers and text encoders
(`prompt_2`, `negative_prompt_2`), the size numbers (`original_size`,
`crops_coords_top_left`, `target_size` and their negative versions) and
`force_zeros_for_empty_prompt` (no negative prompt: zero embeddings, not those of "").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cn_jax.config import MAX_SEED
from cn_jax.data.transforms import decode_planes, planes_to_array
from cn_jax.diffusion.guidance import (
    Control,
    control_keep,
    decode_latents,
    denoise,
    encode_prompts,
    size_time_ids,
)
from cn_jax.diffusion.samplers import make_sampler
from cn_jax.kernels import Kernels
from cn_jax.models.controlnet import ControlNet
from cn_jax.train import sharding as shd

# A Job's static fields: they pick the program.
_OPTIONS = ("cfg", "guess_mode", "zero_negative")
_PER_ROW = ("ids", "neg_ids", "time_ids", "neg_time_ids", "latents")  # split over devices


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["ids", "neg_ids", "conds", "scales", "keep", "guidance_scale", "latents",
                 "sampler", "rng", "time_ids", "neg_time_ids"],
    meta_fields=list(_OPTIONS),
)  # fmt: skip
@dataclasses.dataclass(frozen=True)
class Job:
    """One call's inputs, ready for the generation program (`ControlNetPipeline.prepare`).

    A pytree: the arrays and the sampler are traced, `cfg` and `guess_mode` are
    static (they choose the program)."""

    ids: jax.Array  # (B, L) token ids of the prompts; SDXL (B, 2, L), one row per tokenizer
    neg_ids: jax.Array  # the same of the negative prompts
    conds: list[jax.Array]  # per ControlNet: (B, H, W, C) in [0, 1]
    scales: jax.Array  # (nets,) conditioning scales
    keep: jax.Array  # (nets, steps): 1 where a ControlNet acts (its guidance window)
    guidance_scale: jax.Array  # () CFG weight
    latents: jax.Array  # (B, h, w, C) initial noise, times the sampler's init_noise_sigma
    sampler: Any
    rng: jax.Array  # for stochastic samplers
    cfg: bool  # classifier-free guidance (guidance_scale > 1)
    guess_mode: str | None  # None, or the kind of guess-mode scales
    zero_negative: bool = False  # SDXL, no negative prompt: zero unconditional embeddings
    time_ids: jax.Array | None = None  # SDXL: (B, 6) size numbers of the prompts
    neg_time_ids: jax.Array | None = None  # SDXL: of the negative prompts

    @property
    def batch(self) -> int:
        return int(self.ids.shape[0])


class ControlNetPipeline:
    """Generate images from prompts and condition images.

    Build with `ControlNetPipeline.from_pretrained(base_path, controlnet=...)`
    or from a loaded `StableDiffusion` bundle and `(ControlNet, params)` pairs.
    """

    def __init__(
        self,
        sd,
        controlnets: Sequence[tuple[ControlNet, Any]],
        dtype=jnp.float32,
        kernels: Kernels | None = None,
    ):
        """`kernels`: the attention and convolution kernels (`cn_jax.Kernels`) for the
        UNet, VAE and ControlNets; None keeps each module's own."""
        if sd.tokenizer is None:
            raise ValueError("the base model has no tokenizer: pass tokenizer=<tokenizer folder>")
        if kernels is not None:
            sd = sd.with_kernels(kernels)
            controlnets = [(c.clone(kernels=kernels), p) for c, p in controlnets]
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
        self.scaling_factor = 1.0 if self.vae is None else self.vae.config.scaling_factor
        for c in self.controlnets:
            if c.config.has_text_time != self.unet.config.has_text_time:
                base = "an SDXL" if self.unet.config.has_text_time else "an SD 1.x/2.x"
                net = "an SDXL" if c.config.has_text_time else "an SD 1.x/2.x"
                raise ValueError(f"{net} ControlNet cannot steer {base} base model")
            if c.config.latent_factor != self.latent_factor:
                raise ValueError(
                    f"a ControlNet expects latent factor {c.config.latent_factor}, the base "
                    f"model has {self.latent_factor}"
                )
        self._compiled: dict = {}
        self.trace_count = 0  # how many times the generation program was traced
        self.sharded_batches: set[int] = set()  # batch sizes split over the local devices

    @property
    def is_sdxl(self) -> bool:
        """An SDXL base (`addition_embed_type: text_time`): two text encoders, size numbers."""
        return self.sd.is_sdxl

    @classmethod
    def from_pretrained(
        cls,
        base_path: str | os.PathLike,
        controlnet: str | os.PathLike | Sequence[str | os.PathLike] = (),
        dtype=jnp.float32,
        base_config: str | None = None,
        tokenizer: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        kernels: Kernels | None = None,
        revision: str | None = None,
        variant: str | None = None,
    ) -> ControlNetPipeline:
        """Load a base model (diffusers folder or one checkpoint + `base_config`)
        and one ControlNet path or a list of them, weights stored and computed in
        `dtype` (float32, or bfloat16 / float16 on accelerators). `kernels` (default:
        `Kernels()` settled for this backend) computes attention and convolutions.

        Every path may be a Hugging Face Hub repo id ("org/name", or
        "org/name/file.safetensors" for one file), fetched into the Hugging Face
        cache (`weights.hub`; a local path that exists wins). `revision` (branch,
        tag or commit) and `variant` (e.g. "fp16") are the base's; the ControlNets
        are read at their repos' main with their default weights (plain, else fp16)."""
        from cn_jax.weights.folders import load_controlnet
        from cn_jax.weights.sd import load_pipeline

        # Weights stored in the compute dtype: half the memory in bfloat16, no cast a step.
        stored = dict(dtype=dtype, param_dtype=dtype, allow_pickle=allow_pickle)
        sd = load_pipeline(
            base_path, config=base_config, tokenizer=tokenizer, revision=revision,
            variant=variant, **stored,
        )  # fmt: skip
        paths = [controlnet] if isinstance(controlnet, str | os.PathLike) else list(controlnet)
        nets = [load_controlnet(p, **stored) for p in paths]
        kernels = Kernels().for_platform() if kernels is None else kernels
        return cls(sd, nets, dtype=dtype, kernels=kernels)

    # -- a call: prepare, run the program, convert ----------------------------------
    def __call__(self, prompt: str | Sequence[str], image: Any = None, *,
                 output_type: str = "pil", **options):  # fmt: skip
        """Generate images (see the module docstring for the semantics).

        Args:
          prompt, image, **options: as `prepare` takes them.
          output_type: "pil" (list of PIL images) or "np" (NHWC float in [0, 1]).

        Returns:
          A list of PIL images or an NHWC numpy array.
        """
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        out = self.run(self.prepare(prompt, image, **options))
        if output_type == "np":
            return out
        u8 = np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)
        return [Image.fromarray(x.squeeze(-1) if x.shape[-1] == 1 else x) for x in u8]

    def prepare(
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
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        guess_mode_scales_kind: str = "diffusers",
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
    ) -> Job:
        """Check one call's inputs and turn them into the program's `Job`.

        Args:
          prompt: a string or a list of strings.
          image: the control image (PIL, array in [0, 1] or uint8, or a path),
            or a list with one per ControlNet; None for a pipeline without
            ControlNets (the base model alone, at the UNet's sample size unless
            height/width are given).
          latents: NHWC initial noise (B * num_images_per_prompt, h, w, C),
            scaled by the sampler's `init_noise_sigma` as diffusers does.
          guess_mode_scales_kind: per-resolution scales in guess mode:
            "diffusers" (logspace(-1, 0, 13)), "original" (0.825 ** (12 - i)),
            or "paper" (64 / h_i at the block's spatial size).
          prompt_2, negative_prompt_2: SDXL: the second text encoder's prompts
            (default: `prompt` and `negative_prompt`).
          original_size, crops_coords_top_left, target_size: SDXL's size numbers, each
            (height, width) / (top, left); the sizes default to the output's (H, W).
          negative_original_size, negative_crops_coords_top_left, negative_target_size:
            the unconditional half's, used when both negative sizes are given (else the
            prompts'), as diffusers.
        """
        sdxl = self.is_sdxl
        sizes = dict(
            original_size=original_size, crops_coords_top_left=crops_coords_top_left,
            target_size=target_size, negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
        )  # fmt: skip
        given = [k for k, v in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2))
                 if v is not None]  # fmt: skip
        given += [k for k, v in sizes.items() if v is not None and tuple(v) != (0, 0)]
        if given and not sdxl:
            raise ValueError(f"{', '.join(given)}: SDXL options, and this base is not SDXL")
        for name, pair in sizes.items():
            if pair is not None:
                if len(pair) != 2:
                    raise ValueError(f"{name}={pair!r}: expected two numbers")
                for v in pair:
                    _check_number(name, v, low=0)
        n_nets = len(self.controlnets)
        _check_number("guidance_scale", guidance_scale)
        _check_number("num_inference_steps", num_inference_steps, low=1, integer=True)
        _check_number("num_images_per_prompt", num_images_per_prompt, low=1, integer=True)
        _check_number("seed", seed, low=0, high=MAX_SEED, integer=True)
        zero_negative = sdxl and negative_prompt is None and self.sd.force_zeros_for_empty_prompt
        prompts, negatives = _prompt_lists(prompt, negative_prompt)
        prompts_2 = negatives_2 = None
        if sdxl:
            prompts_2, _ = _prompt_lists(prompt if prompt_2 is None else prompt_2, None)
            second_negative = negative_prompt if negative_prompt_2 is None else negative_prompt_2
            _, negatives_2 = _prompt_lists(prompts_2, second_negative)
            if len(prompts_2) != len(prompts):
                raise ValueError(f"{len(prompts_2)} prompt_2 entries for {len(prompts)} prompts")
        images = self._control_images(image)
        h, w = self._output_size(images, height, width)
        batch = len(prompts) * num_images_per_prompt
        conds = [self._condition(img, i, (h, w)) for i, img in enumerate(images)]
        sampler = make_sampler(scheduler, self.sd.schedule, num_inference_steps)
        starts = _per_net(control_guidance_start, n_nets, "control_guidance_start", 0.0, 1.0)
        ends = _per_net(control_guidance_end, n_nets, "control_guidance_end", 0.0, 1.0)
        keep = [control_keep(s, e, len(sampler)) for s, e in zip(starts, ends)]
        scales = _per_net(controlnet_conditioning_scale, n_nets, "controlnet_conditioning_scale")
        noise = self._initial_noise(latents, seed, (batch, h, w))
        time_ids = neg_time_ids = None
        if sdxl:
            time_ids = size_time_ids(batch, original_size or (h, w), crops_coords_top_left,
                                     target_size or (h, w))  # fmt: skip
            neg_time_ids = time_ids
            if negative_original_size is not None and negative_target_size is not None:
                neg_time_ids = size_time_ids(
                    batch, negative_original_size, negative_crops_coords_top_left,
                    negative_target_size,
                )  # fmt: skip
        return Job(
            ids=jnp.asarray(self._token_ids(prompts, num_images_per_prompt, prompts_2)),
            neg_ids=jnp.asarray(self._token_ids(negatives, num_images_per_prompt, negatives_2)),
            conds=[jnp.asarray(np.broadcast_to(c, (batch, *c.shape)).copy()) for c in conds],
            scales=jnp.asarray(scales, jnp.float32),
            keep=jnp.asarray(np.reshape(keep, (n_nets, len(sampler)))),
            guidance_scale=jnp.float32(guidance_scale),
            latents=jnp.asarray(noise, jnp.float32) * sampler.init_noise_sigma,
            sampler=sampler,
            rng=jax.random.PRNGKey(seed + 1),
            cfg=guidance_scale > 1.0,
            guess_mode=guess_mode_scales_kind if guess_mode else None,
            zero_negative=bool(zero_negative),
            time_ids=None if time_ids is None else jnp.asarray(time_ids),
            neg_time_ids=None if neg_time_ids is None else jnp.asarray(neg_time_ids),
        )

    def run(self, job: Job) -> np.ndarray:
        """The generation program on a prepared job -> NHWC float32 images in [0, 1]."""
        return np.asarray(self._program(job)(self.params, job), np.float32)

    # -- the program's three steps (pure; `cn-jax bench sample` times each) ---------
    def encode(self, params, job: Job) -> tuple:
        """Text: (conditioning, unconditional conditioning; None without CFG), each a
        `guidance.TextCond`."""
        neg_ids = job.neg_ids if job.cfg else None
        return encode_prompts(
            self.text_encoder, params["text_encoder"], job.ids, neg_ids, job.time_ids,
            job.neg_time_ids, job.zero_negative,
        )  # fmt: skip

    def denoise(self, params, job: Job, context, uncond_context) -> jax.Array:
        """The denoising loop (`guidance.denoise`) with the job's ControlNets -> latents."""
        nets = zip(self.controlnets, params["controlnets"], job.conds)
        controls = [
            Control(n, p, c, job.scales[k], job.keep[k]) for k, (n, p, c) in enumerate(nets)
        ]
        return denoise(
            self.unet, params["unet"], controls, context, uncond_context, job.latents,
            job.sampler, job.guidance_scale, job.rng, job.guess_mode,
        )  # fmt: skip

    def decode(self, params, latents: jax.Array) -> jax.Array:
        """Latents -> NHWC float32 images in [0, 1]."""
        x = decode_latents(self.vae, params["vae"], latents, self.scaling_factor)
        return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    def _program(self, job: Job):
        """The jitted generation program for the job's options and batch (cached)."""
        key = (*(getattr(job, f) for f in _OPTIONS), job.batch)
        if key in self._compiled:
            return self._compiled[key]

        def generate(params, job):
            self.trace_count += 1  # runs at trace time only
            context, uncond_context = self.encode(params, job)
            return self.decode(params, self.denoise(params, job, context, uncond_context))

        n_dev = len(jax.local_devices())
        if n_dev > 1 and job.batch % n_dev == 0 and jax.process_count() == 1:
            mesh = shd.make_mesh(1, jax.local_devices())
            self.sharded_batches.add(job.batch)
            bs, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
            per_row = {k: None if getattr(job, k) is None else bs for k in _PER_ROW}
            per_row["conds"] = [bs] * len(job.conds)
            shared = dict(scales=rep, keep=rep, guidance_scale=rep, sampler=rep, rng=rep)
            job_shardings = dataclasses.replace(job, **per_row, **shared)
            fn = jax.jit(generate, in_shardings=(rep, job_shardings), out_shardings=bs)
        else:
            fn = jax.jit(generate)
        self._compiled[key] = fn
        return fn

    # -- inputs ---------------------------------------------------------------------
    def _control_images(self, image) -> list:
        """One control image per ControlNet (none for the base alone)."""
        n_nets = len(self.controlnets)
        if n_nets == 0 and image is None:
            images = []
        elif isinstance(image, list | tuple) and n_nets > 1:
            images = list(image)
        else:
            images = [image]
        if len(images) != n_nets:
            raise ValueError(f"{len(images)} control images for {n_nets} ControlNets")
        return images

    def _condition(self, image, index: int, size: tuple[int, int] | None) -> np.ndarray:
        """One control image -> float32 (H, W, C) in [0, 1] at `size` (H, W)."""
        channels = self.controlnets[index].config.conditioning_channels
        want = channels if channels in (1, 3) else None

        def wrong_shape(shape) -> ValueError:
            return ValueError(
                f"control image {index} has shape {tuple(shape)}; ControlNet {index} expects "
                f"(H, W, {channels})"
            )

        if not isinstance(image, str | os.PathLike | Image.Image):  # an array: as given
            shape = np.shape(image)
            if len(shape) not in (2, 3) or (shape[-1] if len(shape) == 3 else 1) != channels:
                raise wrong_shape(shape)
        # Each source scaled by its own range (uint8 / 255, 16-bit / 65535, float as is).
        planes, scale = decode_planes(image, want, source=f"control image {index}")
        if size is not None and planes[0].size != (size[1], size[0]):
            planes = [p.resize((size[1], size[0]), Image.LANCZOS) for p in planes]
        arr = planes_to_array(planes, scale, want) / np.float32(scale)
        arr = arr[..., None] if arr.ndim == 2 else arr
        if arr.shape[-1] != channels:
            raise wrong_shape(arr.shape)
        return arr

    def _output_size(self, images: list, height, width) -> tuple[int, int]:
        """(H, W): given, else the first condition's, else the UNet's sample size;
        rounded down to a multiple of 8 (of the latent factor if larger)."""
        if images:
            first_hw = self._condition(images[0], 0, None).shape[:2]
        elif height and width:
            first_hw = (height, width)
        else:  # no condition to take the size from: the UNet's own
            if self.unet.config.sample_size is None:
                raise ValueError("no control image and no UNet sample_size: pass height and width")
            side = self.unet.config.sample_size * self.latent_factor
            first_hw = (side, side)
        m = max(8, self.latent_factor)  # diffusers: a multiple of 8
        h, w = height or first_hw[0], width or first_hw[1]
        h2, w2 = h - h % m, w - w % m
        if (h2, w2) != (h, w):
            warnings.warn(
                f"output size {h}x{w} is not a multiple of {m}; using {h2}x{w2}", stacklevel=4
            )
        return h2, w2

    def _token_ids(self, prompts: list[str], repeats: int, prompts_2=None) -> np.ndarray:
        from cn_jax.tokenizer import tokenize

        max_len = self.text_encoder.config.max_position_embeddings
        rep = lambda ps: None if ps is None else [p for p in ps for _ in range(repeats)]  # noqa: E731
        return tokenize(self.sd.tokenizer, rep(prompts), max_len, rep(prompts_2))

    def _initial_noise(self, latents, seed: int, size: tuple[int, int, int]) -> jax.Array:
        """The given latents (checked) or N(0, 1) noise from `seed`, (B, h, w, C)."""
        batch, h, w = size
        f = self.latent_factor
        want = (batch, h // f, w // f, self.unet.config.in_channels)
        if latents is None:
            return jax.random.normal(jax.random.PRNGKey(seed), want)
        if tuple(np.shape(latents)) != want:
            raise ValueError(f"latents have shape {tuple(np.shape(latents))}; expected {want}")
        return latents


def _prompt_lists(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    elif isinstance(negative_prompt, str):
        negatives = [negative_prompt] * len(prompts)
    else:
        negatives = list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    return prompts, negatives


def _check_number(name: str, value, low=None, high=None, integer: bool = False) -> None:
    """Refuse a non-finite, non-numeric or out-of-range option, by name (a NaN scale
    would otherwise give black images, a NaN guidance no guidance at all)."""
    ok = isinstance(value, int | float | np.number) and not isinstance(value, bool)
    if ok and not isinstance(value, int | np.integer):  # Python ints are exact, any size
        ok = math.isfinite(value) and (not integer or float(value).is_integer())
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        kind = "an integer" if integer else "a finite number"
        if low is not None and high is not None:
            bounds = f" in [{low}, {high}]"
        else:
            bounds = f" >= {low}" if low is not None else f" <= {high}" if high is not None else ""
        raise ValueError(f"{name}={value!r}: expected {kind}{bounds}")


def _per_net(value, n: int, name: str, low=None, high=None) -> list[float]:
    values = [value] * n if np.isscalar(value) else list(value)
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} ControlNets")
    for v in values:
        _check_number(name, v, low, high)
    return [float(v) for v in values]
