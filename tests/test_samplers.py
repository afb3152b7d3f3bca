"""Samplers vs diffusers' schedulers: whole 10-step loops with a fake model.

Each case runs the same deterministic nonlinear "denoiser" through diffusers'
scheduler (`set_timesteps`, `scale_model_input`, `step`) in PyTorch and
through our sampler inside one `jax.jit(lax.scan)`, and compares every step's
`prev_sample`. Relative error is max|ours - ref| / max|ref| per step (element-
wise ratios are meaningless where a latent crosses zero).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from cn_jax.diffusion.samplers import (
    SAMPLERS,
    inference_timesteps,
    make_sampler,
)
from cn_jax.diffusion.schedule import NoiseScheduleConfig

STEPS = 10
SHAPE = (2, 8, 8, 4)  # NHWC; these schedulers are elementwise, so layout is moot
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction")
TOL = 1e-5
# SD 1.x/2.x training schedule, as its scheduler_config.json gives it.
SD = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)
SD_SAMPLER_OPTIONS = {"set_alpha_to_one": False, "clip_sample": False, "skip_prk_steps": True}


def sd_config(prediction_type="epsilon", spacing="leading", **sampler_options):
    return NoiseScheduleConfig(
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        sampler_options={**SD_SAMPLER_OPTIONS, **sampler_options},
    )


# -- the fake denoiser, once per framework (same float32 arithmetic) ------------------
def fake_model_torch(x, t):
    t = torch.as_tensor(t).to(torch.float32)
    return (
        0.8 * torch.tanh(x)
        + 0.3 * torch.sin(1.7 * x + t / 250.0)
        + 0.1 * x.mean(dim=(1, 2), keepdim=True)
    )


def fake_model_jax(x, t):
    t = jnp.asarray(t).astype(jnp.float32)
    return (
        0.8 * jnp.tanh(x) + 0.3 * jnp.sin(1.7 * x + t / 250.0) + 0.1 * x.mean((1, 2), keepdims=True)
    )


@jax.jit
def run_ours(sampler, x_T, noises):
    """The whole loop as one compiled scan; the sampler is a pytree argument."""

    def body(carry, inputs):
        x, state = carry
        i, noise = inputs
        out = fake_model_jax(sampler.scale_model_input(x, i), sampler.model_timestep(i))
        state, x = sampler.step(state, i, out, x, noise=noise)
        return (x, state), x

    steps = jnp.arange(len(sampler))
    _, xs = jax.lax.scan(body, (x_T, sampler.init_state(x_T)), (steps, noises))
    return xs


def run_diffusers(scheduler, x_T, noises, eta=None):
    x = torch.from_numpy(x_T)
    out = []
    for k, t in enumerate(scheduler.timesteps):
        model_out = fake_model_torch(scheduler.scale_model_input(x, t), t)
        kwargs = {}
        if eta is not None:
            kwargs = dict(eta=eta, variance_noise=torch.from_numpy(noises[k]))
        x = scheduler.step(model_out, t, x, **kwargs).prev_sample
        out.append(x.numpy())
    return np.stack(out)


def step_errors(ours, ref):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape
    return np.array([np.abs(a - b).max() / np.abs(b).max() for a, b in zip(ours, ref)])


# -- the cases: our sampler + options, diffusers' scheduler + kwargs ---------------------
CASES = {
    "ddim": ("ddim", {}, DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False)),
    "ddim_eta": (
        "ddim",
        {"eta": 0.7},
        DDIMScheduler,
        dict(clip_sample=False, set_alpha_to_one=False),
    ),
    "euler": ("euler", {}, EulerDiscreteScheduler, {}),
    "euler_karras": (
        "euler",
        {"use_karras_sigmas": True},
        EulerDiscreteScheduler,
        dict(use_karras_sigmas=True),
    ),
    "euler_a": ("euler_a", {}, EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": ("dpmpp_2m", {}, DPMSolverMultistepScheduler, {}),
    # Karras sigmas read from the config (as a DPM-Solver scheduler_config.json has them).
    "dpmpp_2m_karras": (
        "dpmpp_2m",
        {"config": {"use_karras_sigmas": True}},
        DPMSolverMultistepScheduler,
        dict(use_karras_sigmas=True),
    ),
    "dpmpp_2m_heun_sigma_min": (
        "dpmpp_2m",
        {"solver_type": "heun", "final_sigmas_type": "sigma_min"},
        DPMSolverMultistepScheduler,
        dict(solver_type="heun", final_sigmas_type="sigma_min"),
    ),
    "unipc": ("unipc", {}, UniPCMultistepScheduler, {}),
    "unipc_karras_bh1": (
        "unipc",
        {"use_karras_sigmas": True, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        UniPCMultistepScheduler,
        dict(use_karras_sigmas=True, solver_type="bh1", final_sigmas_type="sigma_min"),
    ),
}


def build_pair(case, prediction_type, spacing):
    name, options, scheduler_cls, kwargs = CASES[case]
    options = dict(options)
    config = sd_config(prediction_type, spacing, **options.pop("config", {}))
    sampler = make_sampler(name, config, STEPS, **options)
    scheduler = scheduler_cls(
        **SD, prediction_type=prediction_type, timestep_spacing=spacing, **kwargs
    )
    scheduler.set_timesteps(STEPS)
    return sampler, scheduler


def check_timesteps(sampler, scheduler):
    ours, ref = np.asarray(sampler.timesteps), scheduler.timesteps.numpy()
    assert len(sampler) == len(ref)
    if np.issubdtype(ref.dtype, np.integer) or np.all(ref == np.round(ref)):
        np.testing.assert_array_equal(ours, ref)
    else:
        # Fractional (Karras) timesteps interpolate log sigma, whose float32
        # rounding differs from torch's in the last bit here and there.
        np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert sampler.init_noise_sigma == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-6)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_loop_matches_diffusers(case, prediction_type, spacing, monkeypatch):
    sampler, scheduler = build_pair(case, prediction_type, spacing)
    check_timesteps(sampler, scheduler)
    rng = np.random.default_rng(0)
    x_T = (rng.standard_normal(SHAPE, np.float32) * np.float32(sampler.init_noise_sigma)).astype(
        np.float32
    )
    noises = rng.standard_normal((len(sampler), *SHAPE), np.float32)
    eta = CASES[case][1].get("eta")
    if case == "euler_a":  # its step draws noise itself: hand it ours, in order
        supply = iter(noises)
        monkeypatch.setattr(
            scheduling_euler_ancestral_discrete,
            "randn_tensor",
            lambda *args, **kwargs: torch.from_numpy(next(supply)),
        )
    ref = run_diffusers(scheduler, x_T, noises, eta=eta)
    ours = run_ours(sampler, jnp.asarray(x_T), jnp.asarray(noises))
    errors = step_errors(ours, ref)
    assert errors.max() <= TOL, f"per-step relative errors {errors}"


def test_wrong_final_alpha_is_detected():
    """The comparison can fail: DDIM with set_alpha_to_one=True (diffusers'
    class default) against SD's False differs at the last step only."""
    config = sd_config()
    sampler = make_sampler("ddim", config, STEPS)
    wrong = make_sampler(
        "ddim", NoiseScheduleConfig(sampler_options={"set_alpha_to_one": True}), STEPS
    )
    scheduler = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(STEPS)
    x_T = np.random.default_rng(1).standard_normal(SHAPE, np.float32)
    noises = jnp.zeros((STEPS, *SHAPE))
    ref = run_diffusers(scheduler, x_T, None)
    assert step_errors(run_ours(sampler, jnp.asarray(x_T), noises), ref).max() <= TOL
    errors = step_errors(run_ours(wrong, jnp.asarray(x_T), noises), ref)
    assert errors[:-1].max() <= TOL and errors[-1] > 1e-3


@pytest.mark.parametrize(
    "name, scheduler",
    [
        ("ddim", DDIMScheduler(**SD, clip_sample=False, prediction_type="sample")),
        ("dpmpp_2m", DPMSolverMultistepScheduler(**SD, prediction_type="sample")),
        ("ddim", DDIMScheduler(**SD, clip_sample=True, clip_sample_range=0.5)),
        (
            "euler",
            EulerDiscreteScheduler(
                **SD,
                rescale_betas_zero_snr=True,
                timestep_spacing="trailing",
                prediction_type="v_prediction",
            ),
        ),
    ],
    ids=["ddim_sample", "dpmpp_2m_sample", "ddim_clip", "euler_zero_snr"],
)
def test_sample_prediction_clipping_zero_snr(name, scheduler):
    config = NoiseScheduleConfig.from_dict(dict(scheduler.config))
    sampler = make_sampler(name, config, STEPS)
    scheduler.set_timesteps(STEPS)
    check_timesteps(sampler, scheduler)
    x_T = np.random.default_rng(2).standard_normal(SHAPE, np.float32)
    ref = run_diffusers(scheduler, x_T, None)
    ours = run_ours(sampler, jnp.asarray(x_T), jnp.zeros((STEPS, *SHAPE)))
    assert step_errors(ours, ref).max() <= TOL


def test_fractional_timesteps_within_an_ulp():
    """Karras timesteps interpolate log sigma. Even from diffusers' own betas
    (bit-equal alphas_cumprod), torch's vectorised float32 sqrt is not correctly
    rounded (numpy's is), so sigmas, and the timesteps found from them, can
    differ in the last bit."""
    ref = EulerDiscreteScheduler(**SD, timestep_spacing="leading", use_karras_sigmas=True)
    config = NoiseScheduleConfig(trained_betas=tuple(ref.betas.numpy().tolist()))
    np.testing.assert_array_equal(config.alphas_cumprod(), ref.alphas_cumprod.numpy())
    ref.set_timesteps(STEPS)
    sampler = make_sampler("euler", config, STEPS, use_karras_sigmas=True)
    np.testing.assert_array_max_ulp(np.asarray(sampler.timesteps), ref.timesteps.numpy(), 1)
    np.testing.assert_array_max_ulp(np.asarray(sampler.sigmas), ref.sigmas.numpy(), 1)


@pytest.mark.parametrize("n", [1, 7, 10, 33, 50])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_inference_timesteps(n, spacing):
    config = NoiseScheduleConfig(timestep_spacing=spacing)
    for kind, cls in (
        ("ddim", DDIMScheduler),
        ("euler", EulerDiscreteScheduler),
        ("euler", EulerAncestralDiscreteScheduler),
        ("dpm", DPMSolverMultistepScheduler),
        ("dpm", UniPCMultistepScheduler),
    ):
        ref = cls(**SD, timestep_spacing=spacing)
        ref.set_timesteps(n)
        ours = inference_timesteps(config, n, kind=kind)
        assert ours.dtype == ref.timesteps.numpy().dtype, (kind, cls.__name__)
        np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=cls.__name__)
    assert np.array_equal(
        inference_timesteps(NoiseScheduleConfig(), n, spacing),
        inference_timesteps(config, n),
    )


def test_lambda_min_clipped():
    ref = DPMSolverMultistepScheduler(
        beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing="linspace"
    )
    ref.set_timesteps(STEPS)
    sampler = make_sampler("dpmpp_2m", NoiseScheduleConfig.from_dict(dict(ref.config)), STEPS)
    np.testing.assert_array_equal(np.asarray(sampler.timesteps), ref.timesteps.numpy())
    assert ref.timesteps.numpy()[0] < 999  # the clipping did something


# -- the JAX side: randomness, dtypes, errors ----------------------------------------------
def test_stochastic_noise_from_rng():
    """Step i draws fold_in(rng, i): the same as passing that noise explicitly."""
    sampler = make_sampler("euler_a", sd_config(), STEPS)
    assert sampler.stochastic and not make_sampler("ddim", sd_config(), STEPS).stochastic
    x = jnp.ones(SHAPE) * sampler.init_noise_sigma
    rng = jax.random.key(3)
    out = jnp.full(SHAPE, 0.25)
    i = jnp.int32(4)
    _, drawn = jax.jit(sampler.step)(sampler.init_state(x, rng), i, out, x)
    noise = jax.random.normal(jax.random.fold_in(rng, i), SHAPE)
    _, given = sampler.step(sampler.init_state(x), i, out, x, noise=noise)
    np.testing.assert_allclose(drawn, given, rtol=1e-6)
    with pytest.raises(ValueError, match="euler_a.*stochastic.*rng"):
        sampler.step(sampler.init_state(x), i, out, x)


def test_dtype_kept_and_f32_arithmetic():
    sampler = make_sampler("dpmpp_2m", sd_config(), STEPS)
    x = jax.random.normal(jax.random.key(0), SHAPE)
    out = jax.random.normal(jax.random.key(1), SHAPE)
    state = sampler.init_state(x)
    x16, out16 = x.astype(jnp.bfloat16), out.astype(jnp.bfloat16)
    _, ref = sampler.step(state, 0, out16, x16.astype(jnp.float32))
    new_state, prev = sampler.step(state, 0, out16, x16)
    assert prev.dtype == jnp.bfloat16 and new_state["prev_x0"].dtype == jnp.float32
    np.testing.assert_array_equal(prev, ref.astype(jnp.bfloat16))
    euler = make_sampler("euler", sd_config(), STEPS)
    assert euler.scale_model_input(x.astype(jnp.bfloat16), 0).dtype == jnp.bfloat16


def test_options_and_errors():
    assert sorted(SAMPLERS) == ["ddim", "dpmpp_2m", "euler", "euler_a", "unipc"]
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        make_sampler("plms", sd_config(), STEPS)
    with pytest.raises(ValueError, match=r"'ddim': unknown option\(s\) \['etta'\]"):
        make_sampler("ddim", sd_config(), STEPS, etta=0.5)
    with pytest.raises(ValueError, match="thresholding=True is not supported"):
        make_sampler("ddim", sd_config(thresholding=True), STEPS)
    with pytest.raises(ValueError, match="num_inference_steps=1001"):
        make_sampler("euler", sd_config(), 1001)
    with pytest.raises(ValueError, match="timestep_spacing='even'"):
        make_sampler("ddim", sd_config(), STEPS, timestep_spacing="even")
    # A sampler field the sampler does not use (a DPM-Solver config read by DDIM) is ignored.
    assert len(make_sampler("ddim", sd_config(solver_order=3), STEPS)) == STEPS
    # The spacing option overrides the config's.
    assert make_sampler("ddim", sd_config(), STEPS, timestep_spacing="trailing").timesteps[0] == 999
