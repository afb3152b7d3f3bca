"""SDXL's text encoders: `CLIPTextModelWithProjection` against transformers', and
`SDXLTextEncoders` against diffusers' own `StableDiffusionXLPipeline.encode_prompt`
(tiny random configs, random values in every parameter, ids from two tiny offline
tokenizers padded as SDXL's are), their configs, and the original (sgm) single-file
names of both encoders against diffusers' converters."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_open_clip_checkpoint,
    create_diffusers_clip_model_from_ldm,
)

from cn_jax.models.clip_text import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTextWithProjectionConfig,
    SDXLTextEncoders,
    canonical_torch_state,
    encode_text,
)
from cn_jax.tokenizer import tokenize
from cn_jax.weights import original_sd
from cn_jax.weights.keymap import flax_to_torch, torch_key, torch_to_flax

from reference import max_rel_err, randomize_
from tiny_tokenizer import build_tiny_clip_tokenizer

TOL = 1e-4  # float32 max relative error
MAX_LEN = 16
PROMPTS = [
    "red circle with navy blue background",
    "",  # the unconditional prompt
    "a photo of a black cat",
    "Purple RING with dark green background, 4k",
]
# What the second tokenizer gets (diffusers' `prompt_2`): different words, so a row sent
# to the wrong encoder shows.
PROMPTS_2 = ["a drawing of a dog", "yellow star", "", "white square with black background"]
NEGATIVE = ["", "blue", "", "orange triangle"]

# SDXL base 1.0's text_encoder/config.json and text_encoder_2/config.json.
_SDXL_TEXT = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0", "vocab_size": 49408,
}  # fmt: skip
SDXL_TEXT_ENCODER = _SDXL_TEXT
SDXL_TEXT_ENCODER_2 = dict(
    _SDXL_TEXT,
    _name_or_path="laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    architectures=["CLIPTextModelWithProjection"],
    hidden_act="gelu", hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
    num_hidden_layers=32, projection_dim=1280,
)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """SDXL's pair, tiny: the first pads with <|endoftext|>, the second with "!"."""
    root = tmp_path_factory.mktemp("tok")
    return (
        build_tiny_clip_tokenizer(root / "tokenizer", model_max_length=MAX_LEN),
        build_tiny_clip_tokenizer(root / "tokenizer_2", pad_token="!", model_max_length=MAX_LEN),
    )


def _kwargs(vocab_size: int, **kwargs) -> dict:
    # The legacy eos_token_id 2 of SDXL's files (pooled at the largest id, <|endoftext|>).
    base = dict(
        vocab_size=vocab_size, num_attention_heads=4, max_position_embeddings=MAX_LEN,
        bos_token_id=vocab_size - 2, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    return dict(base, **kwargs)


@functools.cache
def torch_encoders(vocab_size: int):
    """Tiny ViT-L-like (quick_gelu) and bigG-like (gelu, projection) encoders. Different
    widths, as SDXL's (768 / 1280), so diffusers' single-file loader tells them apart; a
    layer_norm_eps large enough that a wrong eps shows."""
    first = transformers.CLIPTextConfig(
        **_kwargs(vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3),
        hidden_act="quick_gelu", projection_dim=32,
    )  # fmt: skip
    second = transformers.CLIPTextConfig(
        **_kwargs(vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=3),
        hidden_act="gelu", projection_dim=40, layer_norm_eps=1e-2,
    )  # fmt: skip
    return (
        randomize_(transformers.CLIPTextModel(first), seed=11),
        randomize_(transformers.CLIPTextModelWithProjection(second), seed=12),
    )


def _numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _torch(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}  # writable copies


@functools.cache
def ours(vocab_size: int):
    """`SDXLTextEncoders` with the torch encoders' weights, through `keymap`."""
    first, second = torch_encoders(vocab_size)
    model = SDXLTextEncoders(
        CLIPTextConfig.from_dict(first.config.to_dict()),
        CLIPTextWithProjectionConfig.from_dict(second.config.to_dict()),
    )
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *model.example_inputs())["params"]
    params = {
        name: torch_to_flax(canonical_torch_state(_numpy(ref)), abstract[name])
        for name, ref in (("text_encoder", first), ("text_encoder_2", second))
    }
    return model, params


def sdxl_ids(tokenizers, prompts, prompts_2) -> np.ndarray:
    tok, tok_2 = tokenizers
    return np.stack([tokenize(tok, prompts, MAX_LEN), tokenize(tok_2, prompts_2, MAX_LEN)], 1)


def test_clip_text_with_projection_matches_transformers(tokenizers):
    tok = tokenizers[1]
    _, ref = torch_encoders(len(tok))
    model, params = ours(len(tok))
    params = params["text_encoder_2"]
    assert set(params) == {"text_model", "text_projection"}
    assert set(params["text_projection"]) == {"kernel"}  # no bias
    proj = CLIPTextModelWithProjection(model.config_2)
    enc = tok(PROMPTS_2, padding="max_length", max_length=MAX_LEN, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"]
    for m in (None, mask):
        out = jax.jit(proj.apply)({"params": params}, ids, m)
        with torch.no_grad():
            want = ref(
                torch.from_numpy(ids.astype(np.int64)),
                attention_mask=None if m is None else torch.from_numpy(m),
                output_hidden_states=True,
            )
        errs = {
            "text_embeds": max_rel_err(out.text_embeds, want.text_embeds.numpy()),
            "hidden_states[-2]": max_rel_err(
                out.penultimate_hidden_state, want.hidden_states[-2].numpy()
            ),
            "last_hidden_state": max_rel_err(out.last_hidden_state, want.last_hidden_state.numpy()),
        }
        print(f"CLIPTextModelWithProjection (mask: {m is not None}) max rel err: {errs}")
        assert max(errs.values()) <= TOL
        assert out.text_embeds.shape == (len(ids), 40) and out[0] is out.text_embeds
    # encode_text alone (an SDXL refiner's only encoder): (penultimate, text_embeds)
    context, pooled = encode_text(proj, params, ids)
    np.testing.assert_array_equal(context, proj.apply({"params": params}, ids)[2])
    assert pooled.shape == (len(ids), 40)


def test_sdxl_text_encoders_match_diffusers_encode_prompt(tokenizers):
    """Our (context, pooled) against diffusers' real `encode_prompt`, prompt and negative."""
    tok, tok_2 = tokenizers
    first, second = torch_encoders(len(tok))
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=first, text_encoder_2=second, tokenizer=tok, tokenizer_2=tok_2,
        unet=None, scheduler=None, force_zeros_for_empty_prompt=False, add_watermarker=False,
    )  # fmt: skip
    with torch.no_grad():
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, PROMPTS_2, device=torch.device("cpu"), do_classifier_free_guidance=True,
            negative_prompt=NEGATIVE,
        )  # fmt: skip
    model, params = ours(len(tok))
    run = jax.jit(functools.partial(encode_text, model))
    ids = sdxl_ids(tokenizers, PROMPTS, PROMPTS_2)
    # the second tokenizer really pads with "!" (id 0), the first with <|endoftext|>
    assert (ids[:, 1] == 0).any() and (ids[:, 0] == tok.eos_token_id).sum() > len(PROMPTS)
    got = run(params, ids)
    # diffusers' negative: negative_prompt_2 defaults to negative_prompt
    got_neg = run(params, sdxl_ids(tokenizers, NEGATIVE, NEGATIVE))
    errs = {
        "context": max_rel_err(got[0], ctx.numpy()),
        "pooled": max_rel_err(got[1], pooled.numpy()),
        "negative context": max_rel_err(got_neg[0], neg_ctx.numpy()),
        "negative pooled": max_rel_err(got_neg[1], neg_pooled.numpy()),
    }
    print(f"SDXLTextEncoders vs diffusers encode_prompt max rel err: {errs}")
    assert max(errs.values()) <= TOL
    assert got[0].shape == (len(PROMPTS), MAX_LEN, 32 + 48) and got[1].shape == (len(PROMPTS), 40)
    assert model.context_dim == 80 and model.max_length == MAX_LEN
    # The context is the penultimate states, not the final LayerNorm's output.
    last, _ = CLIPTextModel(model.config).apply({"params": params["text_encoder"]}, ids[:, 0])
    assert np.abs(np.asarray(got[0][..., :32]) - np.asarray(last)).max() > 1e-2


def test_encode_text_of_clip_text_model_is_last_and_pooled(tokenizers):
    tok = tokenizers[0]
    model, params = ours(len(tok))
    te = CLIPTextModel(model.config)
    ids = tokenize(tok, PROMPTS, MAX_LEN)
    last, pooled = te.apply({"params": params["text_encoder"]}, ids)
    context, pooled_again = encode_text(te, params["text_encoder"], ids)
    np.testing.assert_array_equal(context, last)
    np.testing.assert_array_equal(pooled_again, pooled)
    outs = te.apply({"params": params["text_encoder"]}, ids, method="outputs")
    np.testing.assert_array_equal(outs.last_hidden_state, last)
    assert te.max_length == MAX_LEN and te.example_inputs(3)[0].shape == (3, MAX_LEN)
    with pytest.raises(TypeError, match="SDXLTextEncoders"):
        encode_text(model.config, params, ids)


def test_input_shape_errors_name_the_shape(tokenizers):
    model, params = ours(len(tokenizers[0]))
    flat = np.zeros((2, MAX_LEN), np.int32)
    with pytest.raises(ValueError, match=r"\(batch, 2, length\).*\(2, 16\)"):
        model.apply({"params": params}, flat)
    with pytest.raises(ValueError, match=r"\(batch, 2, length\).*\(2, 3, 16\)"):
        model.apply({"params": params}, np.zeros((2, 3, MAX_LEN), np.int32))
    with pytest.raises(ValueError, match=r"\(batch, 2, length\).*float32"):
        model.apply({"params": params}, np.zeros((2, 2, MAX_LEN), np.float32))
    with pytest.raises(ValueError, match="max_length 16"):
        model.apply({"params": params}, np.zeros((1, 2, MAX_LEN + 1), np.int32))
    proj = CLIPTextModelWithProjection(model.config_2)
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        proj.apply({"params": params["text_encoder_2"]}, flat[None])
    no_projection = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=32, num_attention_heads=4, projection_dim=None)
    )
    with pytest.raises(ValueError, match="projection_dim"):
        no_projection.init(jax.random.PRNGKey(0), flat)


def test_sdxl_configs_and_the_full_size_tree():
    first = CLIPTextConfig.from_dict(SDXL_TEXT_ENCODER, "text_encoder/config.json")
    second = CLIPTextWithProjectionConfig.from_dict(
        SDXL_TEXT_ENCODER_2, "text_encoder_2/config.json"
    )
    assert second.projection_dim == 1280 and second.hidden_act == "gelu"
    # each class reads only its own architecture
    with pytest.raises(ValueError, match="text_encoder_2/config.json.*architectures"):
        CLIPTextConfig.from_dict(SDXL_TEXT_ENCODER_2, "text_encoder_2/config.json")
    with pytest.raises(ValueError, match="architectures"):
        CLIPTextWithProjectionConfig.from_dict(SDXL_TEXT_ENCODER)
    for cfg in (first, second):
        hf = transformers.CLIPTextConfig(**cfg.to_dict())
        assert type(cfg).from_dict(json.loads(hf.to_json_string())) == cfg
    assert second.to_dict()["architectures"] == ["CLIPTextModelWithProjection"]

    # Full size, shapes only: the Flax tree is transformers' state dict, name for name.
    model = SDXLTextEncoders(first, second)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *model.example_inputs(2))
    out = jax.eval_shape(model.apply, abstract, *model.example_inputs(2))
    assert out[0].shape == (2, 77, 2048) and out[1].shape == (2, 1280)
    for name, cls, cfg in (
        ("text_encoder", transformers.CLIPTextModel, first),
        ("text_encoder_2", transformers.CLIPTextModelWithProjection, second),
    ):
        with torch.device("meta"):
            ref = cls(transformers.CLIPTextConfig(**cfg.to_dict()))
        want = {k: tuple(v.shape) for k, v in canonical_torch_state(ref.state_dict()).items()}
        got = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract["params"][name]):
            keys = tuple(str(p.key) for p in path)
            shape = leaf.shape[::-1] if keys[-1] == "kernel" else leaf.shape
            got[torch_key(keys)] = tuple(shape)
        assert got == want
    sizes = {
        name: sum(x.size for x in jax.tree.leaves(abstract["params"][name]))
        for name in ("text_encoder", "text_encoder_2")
    }
    assert sizes == {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


def test_dtypes_and_canonical_names(tokenizers):
    model, params = ours(len(tokenizers[0]))
    half = SDXLTextEncoders(model.config, model.config_2, jnp.bfloat16, jnp.bfloat16)
    p = half.init(jax.random.PRNGKey(0), *half.example_inputs())["params"]
    assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.bfloat16)}
    context, pooled = half.apply({"params": p}, sdxl_ids(tokenizers, PROMPTS[:2], PROMPTS_2[:2]))
    assert context.dtype == pooled.dtype == jnp.bfloat16
    # transformers >= 5 flattens CLIPTextModel's names but never text_projection's
    _, second = torch_encoders(len(tokenizers[0]))
    state = _numpy(second)
    bare = {k.removeprefix("text_model."): v for k, v in state.items()}
    assert (
        set(canonical_torch_state(bare))
        == set(state)
        == set(flax_to_torch(params["text_encoder_2"]))
    )
    assert "text_projection.weight" in state


# ---------------------------------------------------------------------------------------------
# The original (sgm) SDXL single-file layout
# ---------------------------------------------------------------------------------------------

_CLIP_EXTRA = f"{original_sd.SDXL_CLIP_PREFIX}transformer.text_model.embeddings.position_ids"
_OPEN_CLIP_EXTRA = f"{original_sd.SDXL_OPEN_CLIP_PREFIX}model.logit_scale"


def _sdxl_original(tokenizers):
    """Our params written as an SDXL single file's text encoders, plus the two tensors real
    files carry that no diffusers model reads."""
    model, params = ours(len(tokenizers[0]))
    states = [flax_to_torch(params[name]) for name in ("text_encoder", "text_encoder_2")]
    original = original_sd.sdxl_text_to_original(*states)
    extra = {
        _CLIP_EXTRA: np.arange(MAX_LEN, dtype=np.int64)[None],
        _OPEN_CLIP_EXTRA: np.array(4.6, np.float32),
    }
    return model, params, states, {**original, **extra}


def test_sdxl_text_original_names_round_trip(tokenizers):
    model, params, states, original = _sdxl_original(tokenizers)
    bigg = f"{original_sd.SDXL_OPEN_CLIP_PREFIX}model."
    # OpenCLIP names, q/k/v fused, the projection a (width, projection) matrix
    assert original[bigg + "text_projection"].shape == (48, 40)
    assert original[bigg + "transformer.resblocks.2.attn.in_proj_weight"].shape == (3 * 48, 48)
    np.testing.assert_array_equal(
        original[bigg + "text_projection"],
        np.asarray(params["text_encoder_2"]["text_projection"]["kernel"]),
    )
    plans = original_sd.sdxl_text_sources(original, num_layers=3, num_layers_2=3)
    assert plans == original_sd.sdxl_text_sources(original)  # all blocks by default
    for plan, state in zip(plans.values(), states, strict=True):
        restored = original_sd.apply_sources(original, plan)
        assert sorted(restored) == sorted(state)
        for key, value in state.items():
            np.testing.assert_array_equal(restored[key], value, err_msg=key)
    assert original_sd.ignored_keys(original) == [_CLIP_EXTRA, _OPEN_CLIP_EXTRA]
    assert original_sd.unexpected_keys(original, *plans.values()) == []
    # ... and what they load computes what the diffusers-named weights compute
    loaded = {
        name: torch_to_flax(original_sd.apply_sources(original, plan), abstract)
        for (name, plan), abstract in zip(
            plans.items(), (params["text_encoder"], params["text_encoder_2"]), strict=True
        )
    }
    ids = sdxl_ids(tokenizers, PROMPTS, PROMPTS_2)
    for a, b in zip(model.apply({"params": loaded}, ids), model.apply({"params": params}, ids)):
        np.testing.assert_array_equal(a, b)
    # a plan for fewer layers leaves the rest unread, and they are reported
    fewer = original_sd.clip_sources(
        original, original_sd.SDXL_OPEN_CLIP_PREFIX, num_layers=2, projection=True
    )
    assert set(original_sd.unexpected_keys(original, plans["text_encoder"], fewer)) == {
        k for k in original if k.startswith(bigg + "transformer.resblocks.2.")
    }


def test_diffusers_converters_read_our_sdxl_text_layout(tokenizers, tmp_path):
    first, second = torch_encoders(len(tokenizers[0]))
    _, _, _, original = _sdxl_original(tokenizers)
    ckpt = _torch(original)
    # CLIP ViT-L: prefix removed; OpenCLIP bigG: every block, text_projection transposed.
    restored = convert_ldm_clip_checkpoint(ckpt)
    restored.pop("text_model.embeddings.position_ids")
    want = canonical_torch_state(_numpy(first))
    assert sorted(restored) == sorted(want)
    for key in want:
        assert torch.equal(restored[key], torch.from_numpy(want[key])), key
    restored = convert_open_clip_checkpoint(
        second, ckpt, prefix=original_sd.SDXL_OPEN_CLIP_PREFIX + "model."
    )
    want = _numpy(second)
    assert sorted(restored) == sorted(want)
    for key in want:
        assert torch.equal(restored[key], torch.from_numpy(want[key])), key
    # The whole single-file flow, each encoder recognised by its width.
    for name, ref in (("te", first), ("te2", second)):
        ref.config.save_pretrained(tmp_path / name)
        loaded = create_diffusers_clip_model_from_ldm(
            type(ref), ckpt, config=str(tmp_path / name), local_files_only=True
        )
        want = ref.state_dict()
        got = loaded.state_dict()
        assert sorted(got) == sorted(want)
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)


def test_sdxl_text_layout_errors(tokenizers):
    _, _, states, original = _sdxl_original(tokenizers)
    with pytest.raises(ValueError, match="text_projection"):
        original_sd.sdxl_text_to_original(
            states[0], {k: v for k, v in states[1].items() if k != "text_projection.weight"}
        )
    with pytest.raises(ValueError, match="projection.*no text_projection"):
        original_sd.clip_sources(original, original_sd.SDXL_CLIP_PREFIX, projection=True)
    bigg = f"{original_sd.SDXL_OPEN_CLIP_PREFIX}model."
    without = [k for k in original if k != bigg + "text_projection"]
    with pytest.raises(ValueError, match="no 'conditioner.embedders.1.model.text_projection'"):
        original_sd.sdxl_text_sources(without)
    # an SD 2.x file (or an SDXL refiner's, OpenCLIP as embedders.0) is not an SDXL base
    sd2 = original_sd.clip_to_original(states[1], "sd2")
    with pytest.raises(ValueError, match="not an SDXL base file.*embedders.0.transformer"):
        original_sd.sdxl_text_sources(sd2)
    refiner = original_sd.clip_to_original(states[1], "sd2", original_sd.SDXL_CLIP_PREFIX)
    with pytest.raises(ValueError, match="not an SDXL base file"):
        original_sd.sdxl_text_sources(refiner)
    # the refiner's tower reads with its prefix
    plan = original_sd.clip_sources(refiner, original_sd.SDXL_CLIP_PREFIX, projection=True)
    assert set(plan) == set(states[1])
    # SD 2.x reading is unchanged: no projection, the last block dropped
    plan = original_sd.clip_sources(sd2)
    assert "text_projection.weight" not in plan
    assert not any(".layers.2." in k for k in plan)
    assert original_sd.CLIP_PREFIX + "model.text_projection" in original_sd.ignored_keys(sd2)
