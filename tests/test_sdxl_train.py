"""SDXL training: a 2-step `cn-jax train` on a tiny random SDXL pipeline folder, exported
and loaded by diffusers; the size numbers of each sample; the latent cache."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from sdxl_reference import sdxl_pipeline_folder

from cn_jax.cli import main
from cn_jax.config import load_config
from cn_jax.data import Loader
from cn_jax.data.fill50k import make_fill50k
from cn_jax.data.transforms import size_numbers
from cn_jax.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sdxl_pipeline_folder(tmp_path_factory.mktemp("sdxltrain"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fill50k(tmp_path_factory.mktemp("fill50k"), num=8, size=80, seed=0)


def _overrides(folder, data, **kw):
    base = {
        "model.base": folder, "data.path": str(data), "data.resolution": 64,
        "train.batch_size": 2, "train.max_steps": 2, "train.checkpoint_every": 2,
        "train.log_every": 1, "data.num_workers": 1, "data.random_crop": "true",
        "data.random_flip": "true",
    }  # fmt: skip
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def test_size_numbers_follow_the_crop_and_flip():
    # A 100 x 80 (w x h) image at 64 px: resized to 80 x 64, 16 px of horizontal slack.
    assert size_numbers((100, 80), 64, (0.5, 0.5), False).tolist() == [80, 100, 0, 8, 64, 64]
    assert size_numbers((100, 80), 64, (0.0, 0.0), False).tolist() == [80, 100, 0, 0, 64, 64]
    # Flipped, the crop's left edge is measured in the flipped image: 80 - 64 - 0.
    assert size_numbers((100, 80), 64, (0.0, 0.0), True).tolist() == [80, 100, 0, 16, 64, 64]
    # A portrait image: the slack is vertical.
    assert size_numbers((64, 128), 64, (0.3, 1.0), False).tolist() == [128, 64, 64, 0, 64, 64]


def test_loader_sends_the_size_numbers(data):
    loader = Loader(str(data), 4, 64, seed=3, random_crop=True, random_flip=True,
                    num_workers=0, time_ids=True)  # fmt: skip
    batch = next(iter(loader))
    ids = batch["time_ids"]
    assert ids.shape == (4, 6) and ids.dtype == np.float32
    # fill50k images are 80 x 80: original (80, 80), a crop within 16 px, target 64.
    assert (ids[:, :2] == 80).all() and (ids[:, 4:] == 64).all()
    assert ((ids[:, 2:4] >= 0) & (ids[:, 2:4] <= 16)).all()
    plain = next(iter(Loader(str(data), 4, 64, seed=3, num_workers=0)))
    assert "time_ids" not in plain


def test_prompt_dropout_empties_both_prompts(folder, data):
    """A dropped caption is "" for both tokenizers (so the context and the pooled embedding
    are the empty prompt's); the second tokenizer pads with its own "!"."""
    from cn_jax.tokenizer import TokenizerPair, tokenize

    pair = TokenizerPair.load(Path(folder) / "tokenizer", Path(folder) / "tokenizer_2")
    loader = Loader(str(data), 8, 64, seed=0, proportion_empty_prompts=0.5, num_workers=0,
                    tokenize=lambda ps: tokenize(pair, ps, 16))  # fmt: skip
    plain = Loader(str(data), 8, 64, seed=0, proportion_empty_prompts=0.5, num_workers=0)
    ids, captions = next(iter(loader))["input_ids"], next(iter(plain))["captions"]
    assert ids.shape == (8, 2, 16)
    empty = tokenize(pair, [""], 16)[0]
    dropped = [i for i, c in enumerate(captions) if c == ""]
    assert dropped and len(dropped) < 8
    for i, c in enumerate(captions):
        assert np.array_equal(ids[i], empty) == (c == ""), i
    assert empty[1, -1] == pair.second.convert_tokens_to_ids("!") != empty[0, -1]


def test_sdxl_train_two_steps_exports_to_diffusers(folder, data, tmp_path):
    run = tmp_path / "run"
    over = _overrides(folder, data, **{"train.validate_every": 2, "train.validation_steps": 2})
    cli = ["train", "--config", str(TINY), "--workdir", str(run), *over]
    assert main(cli) == 0
    assert (run / "val_0000002.png").is_file()
    out = tmp_path / "cn"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    model = ControlNetModel.from_pretrained(out)
    assert model.config.addition_embed_type == "text_time"
    from cn_jax.weights.safetensors_io import read_safetensors

    ours = read_safetensors(out / "diffusion_pytorch_model.safetensors")
    state = model.state_dict()
    assert set(ours) == set(state) and "add_embedding.linear_1.weight" in ours
    for k, v in ours.items():
        assert torch.equal(state[k], torch.from_numpy(v)), k
    # Trained: the zero convolutions moved off zero.
    assert np.abs(ours["controlnet_mid_block.weight"]).max() > 0


@pytest.mark.slow  # two short SDXL runs
def test_sdxl_cache_latents_trains_the_same(folder, data, tmp_path):
    """Latents, both text embeddings and the pooled one cached: the same training."""
    over = _overrides(folder, data, **{
        "data.random_crop": "false", "data.random_flip": "false", "train.adam_eps": 1.0,
        "train.learning_rate": 1.0,
    })  # fmt: skip
    a = train(load_config(TINY, over), tmp_path / "plain", progress=False)
    b = train(load_config(TINY, [*over, "data.cache_latents=true"]), tmp_path / "cached",
              progress=False)  # fmt: skip
    cache = tmp_path / "cached" / "latent_cache"
    assert (cache / "text_embeds.npy").is_file() and (cache / "empty_text_embeds.npy").is_file()
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
