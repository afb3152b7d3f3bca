"""Test setup: one CPU device (a test that needs more says so, and runs in a child
process that has them), XLA's quick compile mode, float32 matmuls at full
precision, and `reference` (the PyTorch side) importable.

Why (docs/testing.md): the suite's time is tracing and compiling small programs.
With 8 virtual devices every train step was partitioned 8 ways on 2 cores (24%
slower than one device), so only the sharding tests get them:
`@pytest.mark.devices(8)`. XLA's LLVM back end at -O0
(`JAX_DISABLE_MOST_OPTIMIZATIONS=1`, as flax's own example tests do) compiles
about a quarter faster; XLA's graph passes (fusion, buffer assignment) run as
usual, so the tests that read compiled memory and fusion see what users get.
Either can be set by the caller: `JAX_DISABLE_MOST_OPTIMIZATIONS=0` tests the
fully optimised build, `XLA_FLAGS=--xla_force_host_platform_device_count=8` runs
every test on 8 devices (the marked ones then run in this process)."""

import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Persistent XLA compilation cache, shared by the tests' many identical programs,
# the pytest-xdist workers and the subprocesses (which inherit the environment).
# Every program, however quick to compile: each `train()` call traces fresh
# closures, so its 50-odd small set-up programs miss JAX's in-memory cache.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_root, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import pytest  # noqa: E402

from cn_jax import runtime  # noqa: E402

# The test process is a program: XLA's memory-first CPU scheduler, as the `cn-jax`
# command, set before JAX starts; JAX's caches are kept (tests share compiled programs).
runtime.configure_host(drop_jax_caches=False)

# Parity is measured in true float32 (GPUs would otherwise use TF32 matmuls).
jax.config.update("jax_default_matmul_precision", "highest")

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_CHILD = "CN_JAX_TEST_DEVICES_CHILD"  # set in the child a devices(n) test runs in


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """`@pytest.mark.devices(n)`: the test needs n CPU devices. JAX fixes the device
    count when it starts, so where this process has fewer the test runs in a child
    pytest with `XLA_FLAGS` asking for n (its fixtures are built there again);
    its failure is this test's failure, with the child's output."""
    mark = pyfuncitem.get_closest_marker("devices")
    if mark is None or jax.device_count() >= mark.args[0]:
        return None
    n = mark.args[0]
    if os.environ.get(_CHILD):
        pytest.fail(f"needs {n} devices; the child process has {jax.device_count()}")
    flags = re.sub(rf"{_DEVICE_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
    env = {**os.environ, _CHILD: "1", "XLA_FLAGS": " ".join([*flags, f"{_DEVICE_FLAG}={n}"])}
    base = tempfile.mkdtemp(prefix="cn_jax_devices_")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
             "--basetemp", os.path.join(base, "t"), pyfuncitem.nodeid],
            cwd=str(pyfuncitem.config.rootpath), env=env, capture_output=True, text=True,
            timeout=1800,
        )  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"in a child process with {n} CPU devices:\n{out[-6000:]}", pytrace=False)
    if " passed" not in out:
        pytest.skip(f"skipped in the child process with {n} CPU devices: {out[-500:]}")
    return True
