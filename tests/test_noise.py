"""Forward process (noise.py) vs diffusers' DDPMScheduler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from cn_jax.diffusion.noise import add_noise, sample_timesteps, training_target, velocity
from cn_jax.diffusion.schedule import NoiseScheduleConfig

SHAPE = (6, 8, 8, 4)  # NHWC


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE, np.float32)
    noise = rng.standard_normal(SHAPE, np.float32)
    t = np.array([0, 1, 250, 500, 998, 999], np.int64)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return x0, noise, t, ref


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def test_add_noise_and_velocity_match_diffusers(data):
    x0, noise, t, ref = data
    ac = ref.alphas_cumprod.numpy()
    tx0, tnoise, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    noisy = jax.jit(add_noise)(ac, x0, noise, t)
    v = jax.jit(velocity)(ac, x0, noise, t)
    assert noisy.dtype == v.dtype == jnp.float32
    assert rel_err(noisy, ref.add_noise(tx0, tnoise, tt).numpy()) <= 1e-6
    assert rel_err(v, ref.get_velocity(tx0, tnoise, tt).numpy()) <= 1e-6
    # Also per timestep (the t = 0 rows are small-noise, easy to get wrong alone).
    for b in range(len(t)):
        expect = ref.add_noise(tx0[b : b + 1], tnoise[b : b + 1], tt[b : b + 1]).numpy()
        assert rel_err(noisy[b : b + 1], expect) <= 1e-6
    # With our own schedule (1-ulp differences from torch's linspace in betas).
    ours = NoiseScheduleConfig().alphas_cumprod()
    assert rel_err(add_noise(ours, x0, noise, t), noisy) <= 1e-6
    assert rel_err(velocity(ours, x0, noise, t), v) <= 1e-6


def test_low_precision_inputs_computed_in_f32(data):
    x0, noise, t, ref = data
    ac = ref.alphas_cumprod.numpy()
    x16, n16 = jnp.asarray(x0, jnp.bfloat16), jnp.asarray(noise, jnp.bfloat16)
    expect = add_noise(ac, x16.astype(jnp.float32), n16.astype(jnp.float32), t)
    got = add_noise(ac, x16, n16, t)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, expect.astype(jnp.bfloat16))
    v = training_target("v_prediction", x16, n16, ac, t)
    assert v.dtype == jnp.bfloat16
    expect = velocity(ac, x16.astype(jnp.float32), n16.astype(jnp.float32), t)
    np.testing.assert_array_equal(v, expect.astype(jnp.bfloat16))


def test_training_target(data):
    x0, noise, t, ref = data
    ac = ref.alphas_cumprod.numpy()
    np.testing.assert_array_equal(training_target("epsilon", x0, noise, ac, t), noise)
    np.testing.assert_array_equal(training_target("sample", x0, noise, ac, t), x0)
    np.testing.assert_array_equal(
        training_target("v_prediction", x0, noise, ac, t), velocity(ac, x0, noise, t)
    )
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        training_target("flow", x0, noise, ac, t)


def test_sample_timesteps():
    key = jax.random.key(0)
    t = jax.jit(sample_timesteps, static_argnums=(1, 2))(key, 20000, 1000)
    assert t.shape == (20000,) and t.dtype == jnp.int32
    assert int(t.min()) == 0 and int(t.max()) == 999
    counts = np.bincount(np.asarray(t), minlength=1000)
    assert counts.min() > 0  # every timestep drawn (expected 20 each)
    first = sample_timesteps(key, 16, 1000)
    np.testing.assert_array_equal(sample_timesteps(key, 16, 1000), first)  # pure in the key
    assert not np.array_equal(sample_timesteps(jax.random.key(1), 16, 1000), first)
