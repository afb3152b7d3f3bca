"""Sampling speed: sampler steps per second with CFG and one or two ControlNets.

What `ControlNetPipeline` runs, as three programs compiled ahead of time and
timed on their own: the pipeline's own steps `encode` (the prompts and the
empty negative prompts), `denoise` (the project's one loop,
`cn_jax.diffusion.guidance.denoise`: one `lax.scan` whose step runs each
ControlNet and the UNet on the 2B batch of the CFG pair, then the sampler
step) and `decode` (the VAE), on a `Job` made by the pipeline's `prepare`.
it/s counts loop steps only, as diffusers' progress bar does; images/s divides
the batch by the sum of the three. (`cn-jax sample` fuses the three into one
program; its time is about that sum.)

Weights are stored in the compute dtype (`train.precision`), as a bfloat16
inference deployment would keep them.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cn_jax.bench import measure
from cn_jax.config import Config
from cn_jax.models.controlnet import ControlNet, init_controlnet_from_unet
from cn_jax.pipeline import ControlNetPipeline
from cn_jax.runtime import release_after_setup
from cn_jax.train.loop import controlnet_config, kernels_of, load_base

PROMPT = "a red circle on a blue background"  # fits the tiny model's 16 tokens


def _load(config: Config, dtype):
    """The base as `cn-jax train` loads it (`loop.load_base`), weights in `dtype`."""
    return load_base(config, dtype, param_dtype=dtype).with_kernels(kernels_of(config))


def _controlnets(config: Config, sd, n: int, dtype) -> list[tuple[ControlNet, Any]]:
    """`n` ControlNets for the base: the config's file, or copies of the base UNet."""
    if config.model.controlnet:
        from cn_jax.weights.folders import load_controlnet

        m = config.model
        net, params = load_controlnet(m.controlnet, dtype=dtype, revision=m.controlnet_revision)
        nets = [(net, params)] * n
    else:
        lf = 1 if sd.vae is None else sd.vae.config.latent_factor
        ccfg = controlnet_config(config, sd.unet.config, lf)
        nets = [
            (
                ControlNet(ccfg, dtype=dtype, param_dtype=dtype),
                init_controlnet_from_unet(
                    sd.unet_params, ccfg, jax.random.PRNGKey(config.train.seed + 1 + k), dtype
                ),
            )
            for k in range(n)
        ]
    cast = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), t)  # noqa: E731
    return [(net.clone(dtype=dtype, kernels=sd.unet.kernels), cast(p)) for net, p in nets]


class SampleBench:
    """The compiled text, loop and decode programs of one sampling configuration.

    Attributes:
      compile_s: seconds to lower + compile each program ("decode" None without a VAE).
      memory: `measure.program_memory` of the loop program.
    """

    def __init__(
        self,
        config: Config,
        batch: int = 1,
        steps: int = 20,
        controlnets: int = 1,
        sampler: str = "ddim",
        guidance_scale: float = 7.5,
        seed: int = 0,
    ):
        if controlnets not in (1, 2):
            raise ValueError(f"controlnets={controlnets}: expected 1 or 2")
        self.config, self.batch, self.steps = config, batch, steps
        self.n_nets, self.sampler_name, self.guidance_scale = controlnets, sampler, guidance_scale
        dtype = jnp.bfloat16 if config.train.precision == "bfloat16" else jnp.float32
        self.device = jax.devices()[0]

        # == Models and inputs ==
        t0 = time.perf_counter()
        sd = _load(config, dtype)
        self.pipe = pipe = ControlNetPipeline(
            sd, _controlnets(config, sd, controlnets, dtype), dtype
        )
        rng = np.random.default_rng(seed)
        r, lf = config.data.resolution, pipe.latent_factor
        conds = [
            rng.uniform(0, 1, (r, r, n.config.conditioning_channels)).astype(np.float32)
            for n in pipe.controlnets
        ]
        noise = rng.standard_normal((batch, r // lf, r // lf, pipe.unet.config.in_channels))
        self.job = pipe.prepare(
            [PROMPT] * batch, conds if controlnets > 1 else conds[0], num_inference_steps=steps,
            guidance_scale=guidance_scale, scheduler=sampler, seed=seed, latents=noise,
        )  # fmt: skip
        self.params = pipe.params
        self.setup_s = time.perf_counter() - t0

        # == Compile each program ahead of time ==
        self.compile_s: dict[str, float | None] = {}

        def compile_(name, fn, *args):
            t = time.perf_counter()
            compiled = jax.jit(fn).lower(*args).compile()
            self.compile_s[name] = time.perf_counter() - t
            return compiled

        self._encode = compile_("text", pipe.encode, self.params, self.job)
        self.contexts = self._encode(self.params, self.job)
        self._loop = compile_("loop", pipe.denoise, self.params, self.job, *self.contexts)
        self.memory = measure.program_memory(self._loop)
        self._decode = None
        self.compile_s["decode"] = None
        if pipe.vae is not None:
            self._decode = compile_("decode", pipe.decode, self.params, self.job.latents)
        # What set-up and the compiler freed, and the traced init programs: every
        # function run from here on is compiled ahead of time (cn_jax.runtime).
        release_after_setup()

    def run_text(self) -> float:
        return measure.timed(lambda: self._encode(self.params, self.job))[0]

    def run_loop(self) -> float:
        """One full denoising loop (`steps` sampler steps); seconds."""
        seconds, self.final = measure.timed(
            lambda: self._loop(self.params, self.job, *self.contexts)
        )
        return seconds

    def run_decode(self) -> float:
        if self._decode is None:
            return 0.0
        return measure.timed(lambda: self._decode(self.params, self.final))[0]

    def summary(self) -> dict[str, Any]:
        c = self.config
        return {
            "architecture": c.model.architecture if c.model.base is None else c.model.base,
            "attention": c.model.attention,
            "convolution": c.model.convolution,
            "precision": c.train.precision,
            "resolution": c.data.resolution,
            "batch": self.batch,
            "steps": self.steps,
            "controlnets": self.n_nets,
            "sampler": self.sampler_name,
            "guidance_scale": self.guidance_scale,
            **measure.device_info([self.device]),
            "setup_s": self.setup_s,
            "compile_s": dict(self.compile_s),
            "compile_total_s": sum(v for v in self.compile_s.values() if v),
            "memory": self.memory,
        }


def bench_sample(config: Config, repeats: int = 3, warmup: int = 1, **options) -> dict[str, Any]:
    """Time `repeats` sampling runs (after `warmup` untimed ones) of the `SampleBench`
    that `options` (batch, steps, controlnets, sampler, guidance_scale) describe."""
    b = SampleBench(config, **options)
    runners = {"text": b.run_text, "loop": b.run_loop, "decode": b.run_decode}
    measure.interleave(runners, warmup)
    times = measure.interleave(runners, repeats)
    text, loop, dec = (measure.median(times[k]) for k in ("text", "loop", "decode"))
    out = {"bench": "sample", **b.summary()}
    out.update(
        repeats=repeats,
        loop_s=loop,
        loop_times_s=times["loop"],
        text_s=text,
        decode_s=dec,
        it_per_s=b.steps / loop,
        images_per_s=b.batch / (text + loop + dec),
        device_peak_bytes_in_use=measure.device_peak_bytes([b.device]),
    )
    return out
