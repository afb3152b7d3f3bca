"""The training noise schedule of a Stable Diffusion model (diffusers'
`scheduler_config.json`): betas, cumulative alphas, prediction type.

Sampler-specific settings (DDIM eta, DPM-Solver order, ...) belong to the
samplers; `NoiseScheduleConfig` keeps only what defines the forward process
and how the model's output is parameterised, plus the timestep spacing the
base model was released with.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from cn_jax.models.config import Bound, _tuple, check_fields

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
MAX_TRAIN_TIMESTEPS = 100_000  # SD's is 1000; a bound on the schedule arrays' size

# Fields of diffusers scheduler configs that configure a particular sampler,
# not the noise schedule: accepted in a scheduler_config.json and kept aside.
SAMPLER_FIELDS = frozenset(
    {
        "skip_prk_steps", "clip_sample", "clip_sample_range", "set_alpha_to_one",
        "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "variance_type",
        "solver_order", "algorithm_type", "solver_type", "lower_order_final",
        "euler_at_final", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
        "use_lu_lambdas", "use_flow_sigmas", "flow_shift", "final_sigmas_type",
        "lambda_min_clipped", "interpolation_type", "sigma_min", "sigma_max",
        "timestep_type", "predict_x0", "disable_corrector", "solver_p", "use_dynamic_shifting",
        "time_shift_type",
    }
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class NoiseScheduleConfig:
    """The forward diffusion process of a base model (SD 1.5 defaults)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"  # SD 2.x 768-v models: "v_prediction"
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    sampler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    # The range of every numeric field (`check_fields`). A beta is a variance fraction: beta 0
    # at the start would make the first SNR infinite, beta 1 at the end of a (non-rescaled)
    # schedule a zero alpha; trained betas may reach 1 (zero terminal SNR).
    bounds: ClassVar[Mapping[str, Bound]] = {
        "num_train_timesteps": Bound(ge=1, le=MAX_TRAIN_TIMESTEPS),
        "beta_start": Bound(gt=0, lt=1),
        "beta_end": Bound(gt=0, lt=1),
        "trained_betas": Bound(ge=0, le=1),
        "steps_offset": Bound(ge=0),
    }

    def __post_init__(self):
        object.__setattr__(self, "trained_betas", _tuple(self.trained_betas))
        check_fields(self, self.bounds, "scheduler config field")
        if self.steps_offset >= self.num_train_timesteps:
            raise ValueError(
                f"scheduler config field steps_offset={self.steps_offset}: must be < "
                f"num_train_timesteps={self.num_train_timesteps}"
            )
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError("scheduler config: trained_betas must have num_train_timesteps")
        for field, value, allowed in (
            ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
            ("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS),
        ):
            if value not in allowed:
                raise ValueError(
                    f"scheduler config field {field}={value!r}: expected one of {allowed}"
                )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "scheduler config"):
        """From a diffusers `scheduler_config.json` of any SD scheduler class.

        Raises:
          ValueError: naming a field that is neither a noise-schedule nor a
            known sampler field, or an unsupported value.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"sampler_options"}
        kwargs: dict[str, Any] = {}
        sampler: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            if key.startswith("_"):
                continue
            if key in names:
                kwargs[key] = value
            elif key in SAMPLER_FIELDS:
                sampler[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"{source}: unknown scheduler config field(s): {unknown}")
        try:
            return cls(**kwargs, sampler_options=sampler)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out = {"_class_name": "DDIMScheduler"}
        for f in dataclasses.fields(self):
            if f.name != "sampler_options":
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return {**out, **dict(self.sampler_options)}

    # -- the schedule itself (float32, as diffusers computes it) -----------------
    def betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, np.float32)
        elif self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)
        elif self.beta_schedule == "scaled_linear":
            root = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float32)
            betas = root**2
        else:  # squaredcos_cap_v2 (Nichol & Dhariwal's cosine schedule)

            def alpha_bar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = np.array(
                [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                np.float32,
            )
        if self.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        return betas

    def alphas_cumprod(self) -> np.ndarray:
        """prod_{s<=t} (1 - beta_s), shape (num_train_timesteps,), float32."""
        # torch's float32 cumprod accumulates in double: do the same to match it.
        return np.cumprod((1.0 - self.betas()).astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) to end at 0."""
    sqrt_ab = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
    first, last = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (1.0 - alphas).astype(np.float32)
