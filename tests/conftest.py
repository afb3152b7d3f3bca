"""Test setup: 8 virtual CPU devices (set before JAX starts), float32 matmuls at
full precision, and `reference` (the PyTorch side) importable."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# Persistent XLA compilation cache, shared by the tests' many identical train
# steps and the subprocess workers (which inherit the environment).
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_root, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import pytest  # noqa: E402

import cn_jax  # noqa: E402, F401 (adds its XLA flags before JAX starts: cn_jax/runtime.py)

# Parity is measured in true float32 (GPUs would otherwise use TF32 matmuls).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _default_kernels():
    """Every test starts from the default attention and convolution kernels.

    They are process globals that `loop.build` and `bench.sample` set from a
    config (`model.attention`, `model.convolution`): without this, a test that
    builds with `model.convolution=xla` would silently change what every later
    test in the process measures."""
    from cn_jax.models.attention import set_attention_implementation
    from cn_jax.models.convolution import set_conv_implementation

    set_attention_implementation("auto")
    set_conv_implementation("auto")
    yield
    set_attention_implementation("auto")
    set_conv_implementation("auto")
