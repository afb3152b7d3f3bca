"""`Kernels`: which attention and convolution kernels a model runs.

A frozen (hashable) dataclass carried as a field by every module that computes
attention or a convolution, passed down the module tree like `dtype`. Built
from the run config (`model.attention`, `model.convolution`) with
`Kernels.for_platform()` when a model is built, so "auto" is settled for the
backend the model will run on, once, and not read from process state at trace
time.
"""

from __future__ import annotations

import dataclasses

ATTENTION_KERNELS = ("auto", "xla", "cudnn", "tiled", "pallas")
CONV_KERNELS = ("auto", "xla", "im2col")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The kernel choice of one model.

    Attributes:
      attention: "xla" (JAX's `dot_product_attention`), "cudnn" (cuDNN flash
        attention: GPU, bfloat16/float16 only), "pallas" (JAX's Pallas flash
        attention: TPU), "tiled" (our CPU kernel) or "auto": cuDNN where its
        constraints hold on a GPU, Pallas where its tiles fit on a TPU, tiled
        on a CPU, XLA elsewhere (`cn_jax.kernels.attention`).
      convolution: "xla", "im2col", or "auto": XLA's on accelerators, on a CPU
        im2col for 1x1 and small convolutions (`cn_jax.kernels.convolution`).
      platform: the JAX backend ("cpu", "gpu", "tpu") "auto" decides for; None
        reads `jax.default_backend()` when a function is traced (a model built
        without `for_platform`).
    """

    attention: str = "auto"
    convolution: str = "auto"
    platform: str | None = None

    def __post_init__(self):
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(
                f"attention kernel {self.attention!r}: expected one of {ATTENTION_KERNELS}"
            )
        if self.convolution not in CONV_KERNELS:
            raise ValueError(
                f"convolution kernel {self.convolution!r}: expected one of {CONV_KERNELS}"
            )

    def for_platform(self, platform: str | None = None) -> Kernels:
        """This choice settled for `platform` (default: JAX's default backend).

        Where the platform alone decides, "auto" becomes the kernel it picks
        (attention: "tiled" on a CPU, "xla" off CPUs, GPUs and TPUs;
        convolution: "xla" off the CPU); what still depends on shapes and
        dtypes (cuDNN's constraints on a GPU, the Pallas kernel's tiles on a
        TPU, im2col's size limit) stays "auto", decided per operation for this
        platform.
        """
        if platform is None:
            import jax

            platform = jax.default_backend()
        attention, convolution = self.attention, self.convolution
        if attention == "auto" and platform not in ("gpu", "tpu"):
            attention = "tiled" if platform == "cpu" else "xla"
        if convolution == "auto" and platform != "cpu":
            convolution = "xla"
        return Kernels(attention, convolution, platform)

    def backend(self) -> str:
        """The platform "auto" decides for (`platform`, else JAX's default backend)."""
        if self.platform is not None:
            return self.platform
        import jax

        return jax.default_backend()


DEFAULT = Kernels()
# JAX's attention and XLA's convolutions: lower on every platform (random-weight
# inits compiled on the host CPU use them, `weights.sd._jitted_init`).
XLA_ONLY = Kernels("xla", "xla")
# What benchmarks count FLOPs on: XLA counts a loop body once (the tiled attention
# kernel loops over tiles), im2col multiplies padding zeros and a custom call may count
# as zero, so a program using those is counted on a twin traced with these (cn_jax.bench).
COUNTING = XLA_ONLY
