"""Samplers: pure, `lax.scan`-able denoising steps equal to diffusers' schedulers.

Each sampler is a frozen dataclass registered as a pytree: the arrays of one
sampling run (model timesteps, sigmas, and every per-step scalar coefficient)
are computed once on the host in numpy, in float32 with the operation order of
the diffusers scheduler it mirrors, and become the pytree's leaves; what
changes the traced program (prediction type, eta, clipping) is static. A step
is then a few fused multiply-adds on the latent, gathered by the traced step
index `i`, with no Python control flow on traced values:

    sampler = make_sampler("dpmpp_2m", config, 20)

    def body(carry, i):
        x, state = carry
        model_in = sampler.scale_model_input(x, i)
        out = denoiser(model_in, sampler.model_timestep(i))
        state, x = sampler.step(state, i, out, x)
        return (x, state), None

    x = jax.random.normal(key, shape) * sampler.init_noise_sigma
    (x, _), _ = lax.scan(body, (x, sampler.init_state(x, rng)), jnp.arange(len(sampler)))

`state` is a dict pytree: the history a multistep solver needs (previous data
predictions, the last sample for UniPC's corrector) and, for stochastic
samplers, the base key `rng`; step i then draws its noise from
`fold_in(rng, i)`, unless `step` is given `noise` explicitly. Arithmetic is
float32; `step` returns the sample in the dtype it was given.

Options come from `config.sampler_options` (the sampler fields of a diffusers
`scheduler_config.json`, read as `Scheduler.from_config` would), overridden by
keyword arguments to `make_sampler`. Diffusers behaviour reproduced on purpose
(each sampler matches its scheduler's `step` to float32 rounding):

- Every scheduler family builds its own timesteps (`inference_timesteps`):
  DDIM's integer grid; Euler's float grid ("linspace" is not rounded); DPM-Solver
  and UniPC lay `num_inference_steps + 1` points for "linspace" and "leading" and
  drop the last (SD's leading 10 steps: DDIM 901, 801, ..., 1; DPM-Solver 901,
  811, ..., 91).
- DDIM always steps to `t - T // num_inference_steps`, whatever the spacing (a
  "linspace" or "trailing" schedule does not step to its own next timestep),
  and past t = 0 to `final_alpha_cumprod` (1 with `set_alpha_to_one`, else
  alpha_bar_0; SD configs set it False, the class default is True).
- Euler's "leading" spacing starts from sqrt(sigma_max^2 + 1) (`init_noise_sigma`),
  the other spacings from sigma_max.
- DPM-Solver++ takes a first-order step at i = 0 and, with the default
  `final_sigmas_type="zero"`, also at the last step (which returns the data
  prediction itself).
- UniPC converts the model output with the sample the model saw, before the
  corrector updates it; no corrector follows the last step.
- With `rescale_betas_zero_snr`, the sigma-based samplers set alpha_bar_T-1 to
  2^-24 (an infinite sigma otherwise); DDIM keeps the zero.

Beyond diffusers: Euler ancestral also takes "sample" predictions (diffusers
raises), and every sampler is one pytree that can be a `jax.jit` argument.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from cn_jax.diffusion.schedule import PREDICTION_TYPES, TIMESTEP_SPACINGS, NoiseScheduleConfig

F32 = np.float32
TIMESTEP_KINDS = ("ddim", "euler", "dpm")


# -- timesteps ---------------------------------------------------------------
def inference_timesteps(
    config: NoiseScheduleConfig,
    num_inference_steps: int,
    spacing: str | None = None,
    *,
    kind: str = "ddim",
    last_timestep: int | None = None,
) -> np.ndarray:
    """The model timesteps of a sampling run, as diffusers' `set_timesteps`.

    Args:
      config: the noise schedule (`num_train_timesteps`, `steps_offset`,
        `timestep_spacing`).
      num_inference_steps: number of denoising steps.
      spacing: "leading", "trailing" or "linspace"; default
        `config.timestep_spacing`.
      kind: whose `set_timesteps`: "ddim" (DDIMScheduler, PNDM; int64), "euler"
        (Euler and Euler ancestral; float32, "linspace" unrounded) or "dpm"
        (DPMSolverMultistep, UniPC; int64, a grid of `num_inference_steps + 1`
        points without its last for "linspace" and "leading").
      last_timestep: "dpm" only: the end of the grid (`num_train_timesteps`
        unless `lambda_min_clipped` cuts it).

    Returns:
      (num_inference_steps,) timesteps, decreasing.
    """
    T = config.num_train_timesteps
    n = int(num_inference_steps)
    spacing = config.timestep_spacing if spacing is None else spacing
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing={spacing!r}: expected one of {TIMESTEP_SPACINGS}")
    if kind not in TIMESTEP_KINDS:
        raise ValueError(f"timestep kind={kind!r}: expected one of {TIMESTEP_KINDS}")
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps={n}: expected 1..num_train_timesteps={T}")
    offset = config.steps_offset
    if kind == "ddim":
        if spacing == "linspace":
            return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        if spacing == "leading":
            return (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + offset
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    if kind == "euler":
        if spacing == "linspace":
            return np.linspace(0, T - 1, n, dtype=F32)[::-1].copy()
        if spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(F32)
            return ts + F32(offset)
        return np.arange(T, 0, -T / n).round().copy().astype(F32) - F32(1)
    last = T if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + offset
    return np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1


# -- sigma schedules (numpy, as diffusers computes them) ------------------------
def _train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sqrt((1 - alpha_bar) / alpha_bar) per training timestep, float32."""
    ac = alphas_cumprod.astype(F32)
    return np.sqrt((F32(1) - ac) / ac)


def _sigma_to_t(sigma, log_sigmas: np.ndarray):
    """Fractional timestep of a sigma: linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def _karras(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Karras et al. (2022) eq. 5 with rho = 7, float64."""
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _exponential(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _alpha_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VP (alpha_t, sigma_t) of a VE sigma, float32 as diffusers computes them."""
    alpha = F32(1) / np.sqrt(sigma * sigma + F32(1))
    return alpha, sigma * alpha


def _lambda(alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Half log-SNR, log(alpha_t) - log(sigma_t); +inf at sigma = 0."""
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma)


def _sigma_based_alphas_cumprod(config: NoiseScheduleConfig) -> np.ndarray:
    ac = config.alphas_cumprod()
    if config.rescale_betas_zero_snr:  # diffusers: avoid an infinite last sigma
        ac = ac.copy()
        ac[-1] = F32(2.0**-24)
    return ac


# -- options ---------------------------------------------------------------------
def _options(
    name: str,
    config: NoiseScheduleConfig,
    explicit: Mapping[str, Any],
    read: Mapping[str, Any],
    only: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Defaults, then `read` fields found in `config.sampler_options`, then
    the explicit keyword options (which must be known). `only`: options that
    are never read from the config."""
    only = only or {}
    unknown = sorted(set(explicit) - set(read) - set(only) - {"timestep_spacing"})
    if unknown:
        known = sorted({*read, *only, "timestep_spacing"})
        raise ValueError(f"sampler {name!r}: unknown option(s) {unknown}; known: {known}")
    out = {"timestep_spacing": config.timestep_spacing, **read, **only}
    out.update({k: v for k, v in config.sampler_options.items() if k in read})
    out.update(explicit)
    return out


def _require(name: str, opts: Mapping[str, Any], field: str, allowed: tuple) -> None:
    if opts[field] not in allowed:
        raise ValueError(
            f"sampler {name!r}: {field}={opts[field]!r} is not supported (supported: {allowed})"
        )


def _check_prediction_type(name: str, prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"sampler {name!r}: prediction_type={prediction_type!r}: "
            f"expected one of {PREDICTION_TYPES}"
        )


def _static(**kwargs):
    return dataclasses.field(metadata={"static": True}, **kwargs)


def _sampler(cls):
    """Frozen dataclass + pytree: arrays are leaves, `_static()` fields are aux data."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    return jax.tree_util.register_dataclass(
        cls,
        data_fields=[f.name for f in fields if not f.metadata.get("static")],
        meta_fields=[f.name for f in fields if f.metadata.get("static")],
    )


def _f32(x) -> jax.Array:
    return jnp.asarray(np.asarray(x, F32))


# -- the interface ------------------------------------------------------------------
class Sampler:
    """What every sampler provides (subclasses are frozen pytree dataclasses).

    Attributes:
      timesteps: (N,) what the model is given as its timestep at step i.
      init_noise_sigma: the standard deviation of the initial latent noise.
    """

    name: ClassVar[str]
    timesteps: jax.Array
    init_noise_sigma: float

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def stochastic(self) -> bool:
        """Whether `step` needs noise (an `rng` in the state, or `noise`)."""
        return False

    def model_timestep(self, i: jax.Array) -> jax.Array:
        """The model's timestep input at step i."""
        return self.timesteps[i]

    def scale_model_input(self, sample: jax.Array, i: jax.Array) -> jax.Array:
        """What the model is given as its sample at step i."""
        del i
        return sample

    def init_state(self, sample: jax.Array, rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """The state before step 0, for a sample of this shape.

        Args:
          sample: the initial latent (only its shape is used).
          rng: base key of a stochastic sampler's noise (step i draws from
            `fold_in(rng, i)`); unused by deterministic ones.
        """
        state = self._history(sample)
        if rng is not None:
            state["rng"] = rng
        return state

    def _history(self, sample: jax.Array) -> dict[str, jax.Array]:
        del sample
        return {}

    def _noise(self, state, i, noise, shape) -> jax.Array:
        if noise is not None:
            return jnp.asarray(noise, jnp.float32)
        if "rng" not in state:
            raise ValueError(
                f"sampler {self.name!r} is stochastic: pass `rng` to init_state or `noise` to step"
            )
        return jax.random.normal(jax.random.fold_in(state["rng"], i), shape, jnp.float32)

    def step(self, state, i, model_output, sample, noise=None):
        """One denoising step: (state, x_t) at step i -> (state, x_{t-1}).

        Args:
          state: from `init_state` or the previous step.
          i: step index, 0 <= i < len(self) (may be traced).
          model_output: the model's prediction for `scale_model_input(sample, i)`.
          sample: the current latent x_t.
          noise: standard normal noise of `sample`'s shape for stochastic
            samplers; default: drawn from `state["rng"]`.

        Returns:
          (new state, the previous sample) in `sample`'s dtype.
        """
        raise NotImplementedError


# -- DDIM ------------------------------------------------------------------------
@_sampler
class DDIM(Sampler):
    """DDIM (Song et al., 2021) as diffusers' `DDIMScheduler.step`; eta > 0 adds
    noise (eta = 1 is DDPM's posterior variance)."""

    name: ClassVar[str] = "ddim"
    timesteps: jax.Array  # (N,) int32
    sqrt_alpha: jax.Array  # sqrt(alpha_bar_t)
    sqrt_beta: jax.Array  # sqrt(1 - alpha_bar_t)
    sqrt_alpha_prev: jax.Array  # sqrt(alpha_bar_prev)
    direction: jax.Array  # sqrt(1 - alpha_bar_prev - std^2): weight of eps
    std: jax.Array  # eta * sqrt(posterior variance)
    prediction_type: str = _static()
    eta: float = _static(default=0.0)
    clip_sample_range: float | None = _static(default=None)  # None: no clipping
    init_noise_sigma: float = _static(default=1.0)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    @classmethod
    def build(cls, config: NoiseScheduleConfig, num_inference_steps: int, **options) -> DDIM:
        """Options: eta (0.0), timestep_spacing, and from the config
        set_alpha_to_one (True, diffusers' default), clip_sample (False),
        clip_sample_range (1.0), thresholding (False only)."""
        opts = _options(
            cls.name,
            config,
            options,
            read={
                "set_alpha_to_one": True,
                "clip_sample": False,
                "clip_sample_range": 1.0,
                "thresholding": False,
            },
            only={"eta": 0.0},
        )
        _require(cls.name, opts, "thresholding", (False,))
        _check_prediction_type(cls.name, config.prediction_type)
        if opts["eta"] < 0:
            raise ValueError(f"sampler 'ddim': eta={opts['eta']} must be >= 0")
        ts = inference_timesteps(config, num_inference_steps, opts["timestep_spacing"])
        ac = config.alphas_cumprod().astype(F32)
        final = F32(1.0) if opts["set_alpha_to_one"] else ac[0]
        prev = ts - config.num_train_timesteps // num_inference_steps
        a_t = ac[ts]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(F32)
        b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
        variance = (b_prev / b_t) * (F32(1) - a_t / a_prev)
        std = F32(opts["eta"]) * np.sqrt(variance)
        return cls(
            timesteps=jnp.asarray(ts, jnp.int32),
            sqrt_alpha=_f32(np.sqrt(a_t)),
            sqrt_beta=_f32(np.sqrt(b_t)),
            sqrt_alpha_prev=_f32(np.sqrt(a_prev)),
            direction=_f32(np.sqrt(F32(1) - a_prev - std**2)),
            std=_f32(std),
            prediction_type=config.prediction_type,
            eta=float(opts["eta"]),
            clip_sample_range=float(opts["clip_sample_range"]) if opts["clip_sample"] else None,
        )

    def step(self, state, i, model_output, sample, noise=None):
        x = sample.astype(jnp.float32)
        m = model_output.astype(jnp.float32)
        sa, sb = self.sqrt_alpha[i], self.sqrt_beta[i]
        if self.prediction_type == "epsilon":
            x0, eps = (x - sb * m) / sa, m
        elif self.prediction_type == "v_prediction":
            x0, eps = sa * x - sb * m, sa * m + sb * x
        else:  # sample
            x0 = m
            eps = (x - sa * x0) / sb
        if self.clip_sample_range is not None:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        prev = self.sqrt_alpha_prev[i] * x0 + self.direction[i] * eps
        if self.eta > 0:
            prev = prev + self.std[i] * self._noise(state, i, noise, x.shape)
        return state, prev.astype(sample.dtype)


# -- Euler (k-diffusion's sample_euler, diffusers EulerDiscreteScheduler) -------------
def _euler_schedule(config, n, opts, *, allow_custom: bool):
    """Timesteps (float32), sigmas (N+1, float32) and init_noise_sigma of
    Euler{,Ancestral}DiscreteScheduler.set_timesteps."""
    ts = inference_timesteps(config, n, opts["timestep_spacing"], kind="euler")
    table = _train_sigmas(_sigma_based_alphas_cumprod(config))
    sigmas = np.interp(ts, np.arange(0, len(table)), table)
    sigma_last = 0.0
    if allow_custom:
        if opts["use_karras_sigmas"] or opts["use_exponential_sigmas"]:
            log_sigmas = np.log(table)
            lo = opts["sigma_min"] if opts["sigma_min"] is not None else sigmas[-1].item()
            hi = opts["sigma_max"] if opts["sigma_max"] is not None else sigmas[0].item()
            convert = _karras if opts["use_karras_sigmas"] else _exponential
            sigmas = convert(lo, hi, n)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas]).astype(F32)
        if opts["final_sigmas_type"] == "sigma_min":
            sigma_last = table[0]
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)
    max_sigma = sigmas.max()
    if opts["timestep_spacing"] == "leading":
        init = float(np.sqrt(max_sigma**2 + F32(1)))
    else:
        init = float(max_sigma)
    return ts.astype(F32), sigmas, init


def _euler_x0(prediction_type, x, m, sigma, v_out, v_skip):
    if prediction_type == "epsilon":
        return x - sigma * m
    if prediction_type == "v_prediction":
        return m * v_out + x / v_skip
    return m


@_sampler
class Euler(Sampler):
    """Euler's method on the probability-flow ODE in sigma (Karras et al., 2022),
    as diffusers' `EulerDiscreteScheduler` (no churn)."""

    name: ClassVar[str] = "euler"
    timesteps: jax.Array  # (N,) float32 (fractional with karras/exponential sigmas)
    sigmas: jax.Array  # (N+1,) float32, the last 0 (or sigma_min)
    input_scale: jax.Array  # sqrt(sigma^2 + 1): the model sees x / input_scale
    v_out: jax.Array  # -sigma / sqrt(sigma^2 + 1)
    v_skip: jax.Array  # sigma^2 + 1
    dt: jax.Array  # sigma_{i+1} - sigma_i
    prediction_type: str = _static()
    init_noise_sigma: float = _static(default=1.0)

    @classmethod
    def build(cls, config: NoiseScheduleConfig, num_inference_steps: int, **options) -> Euler:
        """Options: timestep_spacing, and from the config use_karras_sigmas,
        use_exponential_sigmas, sigma_min, sigma_max, final_sigmas_type ("zero",
        "sigma_min"); interpolation_type "linear", timestep_type "discrete"."""
        opts = _options(
            cls.name,
            config,
            options,
            read={
                "use_karras_sigmas": False,
                "use_exponential_sigmas": False,
                "use_beta_sigmas": False,
                "sigma_min": None,
                "sigma_max": None,
                "final_sigmas_type": "zero",
                "interpolation_type": "linear",
                "timestep_type": "discrete",
            },
        )
        for field, allowed in (
            ("use_beta_sigmas", (False,)),
            ("final_sigmas_type", ("zero", "sigma_min")),
            ("interpolation_type", ("linear",)),
        ):
            _require(cls.name, opts, field, allowed)
        if opts["use_karras_sigmas"] and opts["use_exponential_sigmas"]:
            raise ValueError("sampler 'euler': use_karras_sigmas and use_exponential_sigmas")
        if opts["timestep_type"] != "discrete" and config.prediction_type == "v_prediction":
            _require(cls.name, opts, "timestep_type", ("discrete",))
        _check_prediction_type(cls.name, config.prediction_type)
        ts, sigmas, init = _euler_schedule(config, num_inference_steps, opts, allow_custom=True)
        arrays = _euler_arrays(ts, sigmas)
        return cls(**arrays, prediction_type=config.prediction_type, init_noise_sigma=init)

    def scale_model_input(self, sample, i):
        return (sample.astype(jnp.float32) / self.input_scale[i]).astype(sample.dtype)

    def step(self, state, i, model_output, sample, noise=None):
        x = sample.astype(jnp.float32)
        m = model_output.astype(jnp.float32)
        sigma = self.sigmas[i]
        x0 = _euler_x0(self.prediction_type, x, m, sigma, self.v_out[i], self.v_skip[i])
        derivative = (x - x0) / sigma
        prev = x + derivative * self.dt[i]
        return state, prev.astype(sample.dtype)


def _euler_arrays(ts: np.ndarray, sigmas: np.ndarray) -> dict[str, jax.Array]:
    s = sigmas[:-1]
    skip = s * s + F32(1)
    return dict(
        timesteps=_f32(ts),
        sigmas=_f32(sigmas),
        input_scale=_f32(np.sqrt(skip)),
        v_out=_f32(-s / np.sqrt(skip)),
        v_skip=_f32(skip),
        dt=_f32(sigmas[1:] - s),
    )


@_sampler
class EulerAncestral(Sampler):
    """Euler ancestral (k-diffusion's sample_euler_ancestral, eta = 1), as
    diffusers' `EulerAncestralDiscreteScheduler`: an Euler step to sigma_down,
    then fresh noise of scale sigma_up."""

    name: ClassVar[str] = "euler_a"
    timesteps: jax.Array  # (N,) float32
    sigmas: jax.Array  # (N+1,)
    input_scale: jax.Array
    v_out: jax.Array
    v_skip: jax.Array
    dt: jax.Array  # sigma_down - sigma
    sigma_up: jax.Array
    prediction_type: str = _static()
    init_noise_sigma: float = _static(default=1.0)

    @property
    def stochastic(self) -> bool:
        return True

    @classmethod
    def build(
        cls, config: NoiseScheduleConfig, num_inference_steps: int, **options
    ) -> EulerAncestral:
        """Options: timestep_spacing."""
        opts = _options(cls.name, config, options, read={})
        _check_prediction_type(cls.name, config.prediction_type)
        ts, sigmas, init = _euler_schedule(config, num_inference_steps, opts, allow_custom=False)
        arrays = _euler_arrays(ts, sigmas)
        s_from, s_to = sigmas[:-1], sigmas[1:]
        up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        down = np.sqrt(s_to**2 - up**2)
        arrays["dt"] = _f32(down - s_from)
        arrays["sigma_up"] = _f32(up)
        return cls(**arrays, prediction_type=config.prediction_type, init_noise_sigma=init)

    scale_model_input = Euler.scale_model_input

    def step(self, state, i, model_output, sample, noise=None):
        x = sample.astype(jnp.float32)
        m = model_output.astype(jnp.float32)
        sigma = self.sigmas[i]
        x0 = _euler_x0(self.prediction_type, x, m, sigma, self.v_out[i], self.v_skip[i])
        derivative = (x - x0) / sigma
        prev = x + derivative * self.dt[i]
        prev = prev + self._noise(state, i, noise, x.shape) * self.sigma_up[i]
        return state, prev.astype(sample.dtype)


# -- DPM-Solver++ 2M and UniPC (multistep, data prediction) ---------------------------
_SIGMA_OPTIONS = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "final_sigmas_type": "zero",
    "thresholding": False,
}


def _check_sigma_options(name: str, opts: Mapping[str, Any]) -> None:
    for field in ("use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "thresholding"):
        if field in opts:
            _require(name, opts, field, (False,))
    if "variance_type" in opts:
        _require(name, opts, "variance_type", (None,))
    _require(name, opts, "final_sigmas_type", ("zero", "sigma_min"))
    if opts["use_karras_sigmas"] and opts["use_exponential_sigmas"]:
        raise ValueError(f"sampler {name!r}: use_karras_sigmas and use_exponential_sigmas")


def _multistep_schedule(config, n, opts, *, unipc: bool):
    """Timesteps (int64) and sigmas (N+1, float32) of DPMSolverMultistep /
    UniPCMultistep `set_timesteps`."""
    ac = _sigma_based_alphas_cumprod(config)
    last = None
    if not unipc and opts["lambda_min_clipped"] > -math.inf:
        lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(F32(1) - ac))
        last = config.num_train_timesteps - int(
            np.searchsorted(lam[::-1], F32(opts["lambda_min_clipped"]))
        )
    ts = inference_timesteps(config, n, opts["timestep_spacing"], kind="dpm", last_timestep=last)
    table = _train_sigmas(ac)
    log_sigmas = np.log(table)
    custom = opts["use_karras_sigmas"] or opts["use_exponential_sigmas"]
    if custom:
        desc = table[::-1].copy()
        convert = _karras if opts["use_karras_sigmas"] else _exponential
        sigmas = convert(desc[-1].item(), desc[0].item(), n)
        ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        # Karras timesteps are rounded (by DPM-Solver except for the cosine
        # schedule); exponential ones are truncated by the int64 cast below.
        if opts["use_karras_sigmas"] and (unipc or config.beta_schedule != "squaredcos_cap_v2"):
            ts = ts.round()
    else:
        sigmas = np.interp(ts, np.arange(0, len(table)), table)
    if opts["final_sigmas_type"] == "zero":
        sigma_last = 0.0
    elif unipc and custom:
        sigma_last = sigmas[-1]
    else:
        sigma_last = np.sqrt((F32(1) - ac[0]) / ac[0])
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)
    return ts.astype(np.int64), sigmas


def _to_x0(prediction_type, x, m, alpha, sigma):
    """Data prediction from the model output at (alpha_t, sigma_t)."""
    if prediction_type == "epsilon":
        return (x - sigma * m) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * m
    return m


@_sampler
class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al., 2022) as diffusers'
    `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`:

        x_{i+1} = c_x x_i + c_0 D0 + c_1 D1,  D0 = x0_i,  D1 = (x0_i - x0_{i-1}) / r0

    with first-order (c_1 = 0) steps where diffusers takes them.
    """

    name: ClassVar[str] = "dpmpp_2m"
    timesteps: jax.Array  # (N,) int32
    sigmas: jax.Array  # (N+1,)
    alpha: jax.Array  # alpha_t of step i (to convert the model output)
    sigma: jax.Array  # sigma_t of step i
    c_x: jax.Array
    c_0: jax.Array
    c_1: jax.Array
    inv_r0: jax.Array
    prediction_type: str = _static()
    init_noise_sigma: float = _static(default=1.0)

    @classmethod
    def build(
        cls, config: NoiseScheduleConfig, num_inference_steps: int, **options
    ) -> DPMSolverPP2M:
        """Options: solver_order (2; 1 is DPM-Solver++ 1S = DDIM in lambda),
        timestep_spacing, and from the config solver_type ("midpoint", "heun"),
        lower_order_final (True), euler_at_final (False), use_karras_sigmas,
        use_exponential_sigmas, final_sigmas_type, lambda_min_clipped."""
        opts = _options(
            cls.name,
            config,
            options,
            read={
                **_SIGMA_OPTIONS,
                "use_lu_lambdas": False,
                "variance_type": None,
                "lambda_min_clipped": -math.inf,
                "solver_type": "midpoint",
                "lower_order_final": True,
                "euler_at_final": False,
            },
            only={"solver_order": 2},
        )
        _check_sigma_options(cls.name, opts)
        _require(cls.name, opts, "solver_type", ("midpoint", "heun"))
        _require(cls.name, opts, "solver_order", (1, 2))
        _check_prediction_type(cls.name, config.prediction_type)
        ts, sigmas = _multistep_schedule(config, num_inference_steps, opts, unipc=False)
        n = len(ts)
        alpha, sigma = _alpha_sigma(sigmas)
        lam = _lambda(alpha, sigma)
        i = np.arange(n)
        lower_final = (i == n - 1) & (
            opts["euler_at_final"]
            or (opts["lower_order_final"] and n < 15)
            or opts["final_sigmas_type"] == "zero"
        )
        second = (opts["solver_order"] == 2) & (i >= 1) & ~lower_final
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            h = lam[1:] - lam[:-1]  # lambda_t - lambda_s0 (inf into sigma = 0)
            a_t = alpha[1:]
            phi = a_t * (np.exp(-h) - F32(1))
            c_x = sigma[1:] / sigma[:-1]
            h_0 = np.concatenate([[F32(1)], lam[1:-1] - lam[:-2]]).astype(F32)
            inv_r0 = F32(1.0) / (h_0 / h)
            if opts["solver_type"] == "midpoint":
                c_1 = -(F32(0.5) * phi)
            else:
                c_1 = a_t * ((np.exp(-h) - F32(1)) / h + F32(1))
        zero = np.zeros((), F32)
        return cls(
            timesteps=jnp.asarray(ts, jnp.int32),
            sigmas=_f32(sigmas),
            alpha=_f32(alpha[:-1]),
            sigma=_f32(sigma[:-1]),
            c_x=_f32(c_x),
            c_0=_f32(-phi),
            c_1=_f32(np.where(second, c_1, zero)),
            inv_r0=_f32(np.where(second, inv_r0, zero)),
            prediction_type=config.prediction_type,
        )

    def _history(self, sample):
        return {"prev_x0": jnp.zeros(sample.shape, jnp.float32)}

    def step(self, state, i, model_output, sample, noise=None):
        x = sample.astype(jnp.float32)
        m = model_output.astype(jnp.float32)
        x0 = _to_x0(self.prediction_type, x, m, self.alpha[i], self.sigma[i])
        d1 = self.inv_r0[i] * (x0 - state["prev_x0"])
        prev = self.c_x[i] * x + self.c_0[i] * x0 + self.c_1[i] * d1
        return {**state, "prev_x0": x0}, prev.astype(sample.dtype)


@_sampler
class UniPC(Sampler):
    """UniPC (Zhao et al., 2023) with the data-prediction (UniP/UniC-x0) bh
    updates, as diffusers' `UniPCMultistepScheduler` (predict_x0, order <= 2):
    at step i the corrector UniC refines x_i with the new model output, then
    the predictor UniP steps to x_{i+1}."""

    name: ClassVar[str] = "unipc"
    timesteps: jax.Array  # (N,) int32
    sigmas: jax.Array  # (N+1,)
    alpha: jax.Array
    sigma: jax.Array
    # predictor: x_{i+1} = p_x x - p_m m0 - p_d (m_prev - m0) / p_rk
    p_x: jax.Array
    p_m: jax.Array
    p_d: jax.Array
    p_rk: jax.Array
    # corrector: x_i = c_x x_last - c_m m_prev - c_b (c_d (m_prev2 - m_prev) / c_rk
    #                                              + c_t (m_i - m_prev))
    corrects: jax.Array  # bool
    c_x: jax.Array
    c_m: jax.Array
    c_b: jax.Array
    c_d: jax.Array
    c_rk: jax.Array
    c_t: jax.Array
    prediction_type: str = _static()
    init_noise_sigma: float = _static(default=1.0)

    @classmethod
    def build(cls, config: NoiseScheduleConfig, num_inference_steps: int, **options) -> UniPC:
        """Options: timestep_spacing, and from the config solver_order (1, 2),
        solver_type ("bh1", "bh2"; DPM-Solver names map to "bh2" as in
        diffusers), lower_order_final (True), disable_corrector ([]),
        use_karras_sigmas, use_exponential_sigmas, final_sigmas_type."""
        opts = _options(
            cls.name,
            config,
            options,
            read={
                **_SIGMA_OPTIONS,
                "solver_order": 2,
                "solver_type": "bh2",
                "lower_order_final": True,
                "disable_corrector": (),
                "predict_x0": True,
            },
        )
        _check_sigma_options(cls.name, opts)
        if opts["solver_type"] in ("midpoint", "heun", "logrho"):
            opts["solver_type"] = "bh2"
        _require(cls.name, opts, "solver_type", ("bh1", "bh2"))
        _require(cls.name, opts, "solver_order", (1, 2))
        _require(cls.name, opts, "predict_x0", (True,))
        _check_prediction_type(cls.name, config.prediction_type)
        ts, sigmas = _multistep_schedule(config, num_inference_steps, opts, unipc=True)
        n, order = len(ts), opts["solver_order"]
        alpha, sigma = _alpha_sigma(sigmas)
        lam = _lambda(alpha, sigma)
        one = F32(1)

        def coefficients(t: int, s0: int, s1: int | None, k: int):
            """UniP/UniC-bh scalars from sigma index s0 to t, order k (s1: the older point)."""
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                h = lam[t] - lam[s0]
                hh = -h
                h_phi_1 = np.expm1(hh)
                b_h = hh if opts["solver_type"] == "bh1" else np.expm1(hh)
                h_phi_k = h_phi_1 / hh - one
                b = []
                factorial = 1
                for j in range(1, k + 1):
                    b.append(h_phi_k * F32(factorial) / b_h)
                    factorial *= j + 1
                    h_phi_k = h_phi_k / hh - F32(1 / factorial)
                rk = (lam[s1] - lam[s0]) / h if s1 is not None else one
            return dict(x=sigma[t] / sigma[s0], m=alpha[t] * h_phi_1, b=alpha[t] * b_h, rk=rk, bs=b)

        # Order of the predictor at step i (warm-up, then lower order at the end).
        this_order = [min(order, n - j if opts["lower_order_final"] else order, j + 1)
                      for j in range(n)]  # fmt: skip
        p = {k: np.zeros(n, F32) for k in ("x", "m", "d", "rk")}
        c = {k: np.zeros(n, F32) for k in ("x", "m", "b", "d", "rk", "t")}
        corrects = np.zeros(n, bool)
        for i in range(n):
            k = this_order[i]
            q = coefficients(i + 1, i, i - 1 if k == 2 else None, k)
            p["x"][i], p["m"][i], p["rk"][i] = q["x"], q["m"], q["rk"]
            p["d"][i] = q["b"] * F32(0.5) if k == 2 else 0.0  # rhos_p = [0.5]
            if i == 0 or (i - 1) in opts["disable_corrector"]:
                c["rk"][i] = 1.0
                continue
            k = this_order[i - 1]
            q = coefficients(i, i - 1, i - 2 if k == 2 else None, k)
            corrects[i] = True
            c["x"][i], c["m"][i], c["b"][i], c["rk"][i] = q["x"], q["m"], q["b"], q["rk"]
            if k == 1:
                c["t"][i] = 0.5
            else:
                r = np.array([[1, 1], [q["rk"], 1]], F32)
                rhos = np.linalg.solve(r, np.array(q["bs"], F32)).astype(F32)
                c["d"][i], c["t"][i] = rhos[0], rhos[-1]
        return cls(
            timesteps=jnp.asarray(ts, jnp.int32),
            sigmas=_f32(sigmas),
            alpha=_f32(alpha[:-1]),
            sigma=_f32(sigma[:-1]),
            **{f"p_{k}": _f32(v) for k, v in p.items()},
            corrects=jnp.asarray(corrects),
            **{f"c_{k}": _f32(v) for k, v in c.items()},
            prediction_type=config.prediction_type,
        )

    def _history(self, sample):
        zeros = jnp.zeros(sample.shape, jnp.float32)
        return {"prev_x0": zeros, "prev2_x0": zeros, "last_sample": zeros}

    def step(self, state, i, model_output, sample, noise=None):
        x = sample.astype(jnp.float32)
        m = model_output.astype(jnp.float32)
        m_t = _to_x0(self.prediction_type, x, m, self.alpha[i], self.sigma[i])
        m1, m2 = state["prev_x0"], state["prev2_x0"]
        # UniC: correct x_i with this step's model output.
        d1 = (m2 - m1) / self.c_rk[i]
        corrected = self.c_x[i] * state["last_sample"] - self.c_m[i] * m1
        corrected = corrected - self.c_b[i] * (self.c_d[i] * d1 + self.c_t[i] * (m_t - m1))
        x = jnp.where(self.corrects[i], corrected, x)
        # UniP: predict x_{i+1}.
        d1 = (m1 - m_t) / self.p_rk[i]
        prev = self.p_x[i] * x - self.p_m[i] * m_t - self.p_d[i] * d1
        new_state = {**state, "prev_x0": m_t, "prev2_x0": m1, "last_sample": x}
        return new_state, prev.astype(sample.dtype)


# -- registry ----------------------------------------------------------------------
SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (DDIM, Euler, EulerAncestral, DPMSolverPP2M, UniPC)
}


def make_sampler(
    name: str, config: NoiseScheduleConfig, num_inference_steps: int, **options
) -> Sampler:
    """Build a sampler by name: "ddim", "euler", "euler_a", "dpmpp_2m", "unipc".

    Args:
      name: a key of `SAMPLERS`.
      config: the model's noise schedule (its `sampler_options` are read too).
      num_inference_steps: number of denoising steps.
      **options: sampler options (see each class's `build`), overriding
        `config.sampler_options`; `timestep_spacing` overrides the config's.

    Raises:
      ValueError: an unknown sampler name or option, or an unsupported value.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name].build(config, num_inference_steps, **options)
