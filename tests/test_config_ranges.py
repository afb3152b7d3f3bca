"""Every numeric config field has its valid range: the run config (cn_jax.config) and the model
configs read from config.json (UNet / ControlNet, VAE, CLIP text, noise schedule). Each bad
value is refused with one line naming the field and the value."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import annotated_types
import jax
import numpy as np
import pytest

from cn_jax.config import MAX_SEED, Config, ConfigError, load_config
from cn_jax.diffusion.schedule import NoiseScheduleConfig
from cn_jax.models.clip_text import CLIPTextConfig
from cn_jax.models.config import ControlNetConfig, UNetConfig
from cn_jax.models.vae import AutoencoderKLConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# --------------------------------------------------------------------------- the run config


@pytest.mark.parametrize(
    "override, error",
    [
        # A negative clipping norm would flip the gradient's sign (training climbs the loss).
        ("train.max_grad_norm=-1", "train.max_grad_norm=-1: Input should be greater than 0"),
        ("train.max_grad_norm=0", "train.max_grad_norm=0: Input should be greater than 0"),
        ("train.adam_beta1=2", "train.adam_beta1=2: Input should be less than 1"),
        ("train.adam_beta1=nan", "train.adam_beta1='nan': Input should be a finite number"),
        ("train.adam_beta2=1", "train.adam_beta2=1: Input should be less than 1"),
        ("train.adam_eps=-1", "train.adam_eps=-1: Input should be greater than 0"),
        ("train.ema_decay=2", "train.ema_decay=2: Input should be less than or equal to 1"),
        ("train.weight_decay=nan", "train.weight_decay='nan': Input should be a finite number"),
        ("train.weight_decay=-0.1",
         "train.weight_decay=-0.1: Input should be greater than or equal to 0"),
        ("train.learning_rate=inf", "train.learning_rate='inf': Input should be a finite number"),
        ("train.learning_rate=.inf", "train.learning_rate=inf: Input should be a finite number"),
        ("train.decoder_learning_rate=0",
         "train.decoder_learning_rate=0: Input should be greater than 0"),
        # PyYAML reads 1e20 (no dot) as a string; a seed must be an int that PRNGKey keeps.
        ("train.seed=1e20",
         "train.seed='1e20': Input should be a valid integer, unable to parse string as an "
         "integer"),
        ("train.seed=100000000000000000000",
         "train.seed=100000000000000000000: Input should be less than or equal to 4294967295"),
        ("train.seed=-1", "train.seed=-1: Input should be greater than or equal to 0"),
        ("eval.seed=4294967296", "eval.seed=4294967296: Input should be less than or equal to "
         "4294967295"),
        ("train.max_steps=4294967296",
         "train.max_steps=4294967296: Input should be less than or equal to 2147483647"),
        ("train.max_to_keep=0", "train.max_to_keep=0: Input should be greater than or equal to 1"),
        ("data.resolution=1000000",
         "data.resolution=1000000: Input should be less than or equal to 16384"),
        ("data.proportion_empty_prompts=nan",
         "data.proportion_empty_prompts='nan': Input should be a finite number"),
        ("eval.guidance_scale=inf", "eval.guidance_scale='inf': Input should be a finite number"),
        ("train.batch_size=true", "train.batch_size=True: expected a number, got a boolean"),
        ("model.scheduler.beta_end=2",
         "model.scheduler: scheduler config field beta_end=2: must be in (0, 1)"),
    ],
)  # fmt: skip
def test_run_config_refuses_out_of_range_numbers(override, error):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == f"defaults: invalid config: {error}"


def test_run_config_file_with_nan_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: .nan\n  max_grad_norm: -1.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).splitlines() == [
        f"{path}: invalid config:",
        "  train.learning_rate=nan: Input should be a finite number",
        "  train.max_grad_norm=-1.0: Input should be greater than 0",
    ]


def test_every_numeric_run_config_field_has_a_range():
    bounds = (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt)
    for section, info in Config.model_fields.items():
        for name, field in info.annotation.model_fields.items():
            types_ = set(typing.get_args(field.annotation)) or {field.annotation}
            if types_ & {int, float}:
                assert any(isinstance(m, bounds) for m in field.metadata), f"{section}.{name}"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_still_load(path):
    load_config(path)


def test_max_seed_is_the_largest_seed_prngkey_tells_apart():
    """Without x64, PRNGKey keeps the low 32 bits: 2**32 would silently be seed 0."""
    key = jax.random.PRNGKey
    assert not np.array_equal(key(MAX_SEED), key(0))
    assert np.array_equal(key(MAX_SEED + 1), key(0))


# --------------------------------------------------------------------------- model configs

MODEL_CASES = [
    # (config class, changed fields, the error after "<source>: ")
    (UNetConfig, {"norm_eps": float("nan")}, "config field norm_eps=nan: must be a finite number"),
    (UNetConfig, {"norm_eps": 0}, "config field norm_eps=0: must be > 0"),
    (UNetConfig, {"block_out_channels": [1_000_000_000] * 4},
     "config field block_out_channels=(1000000000, 1000000000, 1000000000, 1000000000): "
     "must be in [1, 65536] (entry 1000000000)"),
    (UNetConfig, {"block_out_channels": [1e9] * 4},
     "config field block_out_channels=(1000000000.0, 1000000000.0, 1000000000.0, "
     "1000000000.0): expected tuple[int, ...], got tuple of float"),
    (UNetConfig, {"block_out_channels": [-320, 640, 1280, 1280]},
     "config field block_out_channels=(-320, 640, 1280, 1280): must be in [1, 65536] "
     "(entry -320)"),
    (UNetConfig, {"in_channels": "x"}, "config field in_channels='x': expected int, got str"),
    (UNetConfig, {"in_channels": True}, "config field in_channels=True: expected int, got bool"),
    (UNetConfig, {"norm_num_groups": 0},
     "config field norm_num_groups=0: must be in [1, 65536]"),
    (UNetConfig, {"norm_num_groups": 48},
     "config: block_out_channels 320 not divisible by norm_num_groups 48"),
    (UNetConfig, {"attention_head_dim": 0},
     "config field attention_head_dim=0: must be in [1, 65536]"),
    (UNetConfig, {"layers_per_block": 10**9},
     "config field layers_per_block=1000000000: must be in [1, 256]"),
    (UNetConfig, {"sample_size": -64}, "config field sample_size=-64: must be in [1, 16384]"),
    (UNetConfig, {"freq_shift": 160},
     "config field freq_shift=160: must be < block_out_channels[0] // 2 = 160 (the timestep "
     "embedding divides by their difference)"),
    (ControlNetConfig, {"conditioning_channels": 0},
     "config field conditioning_channels=0: must be in [1, 65536]"),
    (ControlNetConfig, {"conditioning_embedding_out_channels": [16, -32, 96, 256]},
     "config field conditioning_embedding_out_channels=(16, -32, 96, 256): must be in "
     "[1, 65536] (entry -32)"),
    (AutoencoderKLConfig, {"scaling_factor": float("inf")},
     "config field scaling_factor=inf: must be a finite number"),
    (AutoencoderKLConfig, {"latent_channels": 0},
     "config field latent_channels=0: must be in [1, 65536]"),
    (CLIPTextConfig, {"layer_norm_eps": float("nan")},
     "config field layer_norm_eps=nan: must be a finite number"),
    (CLIPTextConfig, {"vocab_size": 0}, "config field vocab_size=0: must be in [1, 4194304]"),
    (CLIPTextConfig, {"attention_dropout": 1.5},
     "config field attention_dropout=1.5: must be in [0, 1)"),
    (CLIPTextConfig, {"hidden_size": "512"},
     "config field hidden_size='512': expected int, got str"),
    (NoiseScheduleConfig, {"beta_end": 2.0},
     "scheduler config field beta_end=2.0: must be in (0, 1)"),
    (NoiseScheduleConfig, {"beta_start": float("nan")},
     "scheduler config field beta_start=nan: must be a finite number"),
    (NoiseScheduleConfig, {"num_train_timesteps": 10**9},
     "scheduler config field num_train_timesteps=1000000000: must be in [1, 100000]"),
    (NoiseScheduleConfig, {"num_train_timesteps": 2, "trained_betas": [0.1, float("nan")]},
     "scheduler config field trained_betas=(0.1, nan): must be a finite number"),
    (NoiseScheduleConfig, {"steps_offset": 1000},
     "scheduler config field steps_offset=1000: must be < num_train_timesteps=1000"),
]  # fmt: skip


@pytest.mark.parametrize(
    "cls, change, error",
    MODEL_CASES,
    ids=[f"{c.__name__}-{next(iter(d))}" for c, d, _ in MODEL_CASES],
)
def test_model_configs_refuse_bad_numbers_by_field(cls, change, error):
    with pytest.raises(ValueError) as info:
        cls.from_dict(change, "x/config.json")
    assert str(info.value) == f"x/config.json: {error}"
    assert "\n" not in str(info.value)


def test_norm_eps_nan_in_a_config_json_file(tmp_path):
    """json.loads reads a bare NaN (Python's json extension): it must not reach a model."""
    data = json.loads((Path(__file__).parents[1] / "cn_jax/assets/tiny_base/unet/config.json")
                      .read_text().replace('"norm_eps": 1e-05', '"norm_eps": NaN'))  # fmt: skip
    assert np.isnan(data["norm_eps"])
    with pytest.raises(ValueError, match=re.escape("unet: config field norm_eps=nan: must be a")):
        UNetConfig.from_dict(data, "unet")


# Fields that are numbers but need no range here: fixed to one value (other model families).
UNBOUNDED = {"shift_factor", "latents_mean", "latents_std"}


@pytest.mark.parametrize(
    "cls", [UNetConfig, ControlNetConfig, AutoencoderKLConfig, CLIPTextConfig, NoiseScheduleConfig]
)
def test_every_numeric_model_config_field_has_a_range(cls):
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        text = str(hint)
        numeric = hint in (int, float) or "int" in text or "float" in text
        if numeric and f.name not in UNBOUNDED:
            assert f.name in cls.bounds, f"{cls.__name__}.{f.name} has no range"
    # The defaults and the presets are valid.
    cls()
