"""CLIP text encoder parity with transformers' CLIPTextModel (random weights
everywhere), its config, and the tokenizer helpers, on ids from a tiny offline
CLIP tokenizer."""

import functools
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from cn_jax.models.clip_text import (
    IGNORED_TORCH_KEYS,
    CLIPTextConfig,
    CLIPTextModel,
    canonical_torch_state,
    example_inputs,
)
from cn_jax.tokenizer import load_tokenizer, tokenize
from cn_jax.weights.keymap import flax_to_torch, torch_to_flax

from reference import max_rel_err, randomize_
from tiny_tokenizer import build_tiny_clip_tokenizer

TOL = 1e-4  # float32 max relative error
MAX_LEN = 16
PROMPTS = [
    "red circle with navy blue background",
    "",  # the unconditional prompt
    "a photo of a black cat",
    "navy blue star with light gray background",
    "Purple RING with dark green background, 4k",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """SD 1.x style (pads with <|endoftext|>) and SD 2.x style (pads with "!") tokenizers."""
    root = tmp_path_factory.mktemp("tok")
    return {
        "sd1": build_tiny_clip_tokenizer(root / "sd1" / "tokenizer"),
        "sd2": build_tiny_clip_tokenizer(root / "sd2" / "tokenizer", pad_token="!"),
    }


# name -> (transformers CLIPTextConfig kwargs, tokenizer). sd1: quick_gelu and the
# legacy eos_token_id=2 (pooled at the largest id) that SD 1.x/2.x files carry;
# sd2: gelu, eos_token_id set to the tokenizer's (pooled at the first eos), and a
# layer_norm_eps large enough (vs unit-variance states) that a wrong eps shows.
CONFIGS = {
    "sd1": (dict(hidden_act="quick_gelu", num_hidden_layers=3, eos_token_id=2), "sd1"),
    "sd2": (dict(hidden_act="gelu", num_hidden_layers=2, layer_norm_eps=1e-2), "sd2"),
}


@functools.cache
def torch_clip(name: str, vocab_size: int, eos_id: int) -> transformers.CLIPTextModel:
    kwargs, _ = CONFIGS[name]
    kwargs = dict(
        dict(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            max_position_embeddings=MAX_LEN, projection_dim=32, bos_token_id=vocab_size - 2,
            eos_token_id=eos_id, pad_token_id=1,
        ),
        **kwargs,
    )  # fmt: skip
    return randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**kwargs)), seed=7)


def ref_and_ours(name, tokenizers):
    tok = tokenizers[CONFIGS[name][1]]
    ref = torch_clip(name, len(tok), tok.eos_token_id)
    cfg = CLIPTextConfig.from_dict(ref.config.to_dict())
    model = CLIPTextModel(cfg)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *example_inputs(cfg))
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = torch_to_flax(canonical_torch_state(state), abstract["params"])
    return tok, ref, model, params


def run_ref(ref, ids, mask=None):
    with torch.no_grad():
        out = ref(
            torch.from_numpy(ids.astype(np.int64)),
            attention_mask=None if mask is None else torch.from_numpy(mask),
        )
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_clip_text_matches_transformers(name, tokenizers):
    tok, ref, model, params = ref_and_ours(name, tokenizers)
    ids = tokenize(tok, PROMPTS, MAX_LEN)
    # The end-of-text position differs per prompt, and padding is really there.
    eos_pos = (ids == tok.eos_token_id).argmax(-1)
    assert len(set(eos_pos.tolist())) == len(PROMPTS) and (ids == tok.pad_token_id).any()
    last, pooled = jax.jit(model.apply)({"params": params}, ids)
    ref_last, ref_pooled = run_ref(ref, ids)
    err_last, err_pooled = max_rel_err(last, ref_last), max_rel_err(pooled, ref_pooled)
    print(f"CLIP text[{name}] max rel err: last {err_last:.2e}, pooled {err_pooled:.2e}")
    assert err_last <= TOL and err_pooled <= TOL
    # pooled is the eos token's state (not the last position's)
    np.testing.assert_allclose(pooled, np.asarray(last)[np.arange(len(ids)), eos_pos], atol=1e-6)


def test_padding_attention_mask_matches_transformers(tokenizers):
    tok, ref, model, params = ref_and_ours("sd2", tokenizers)
    enc = tok(PROMPTS, padding="max_length", max_length=MAX_LEN, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"]
    last, pooled = model.apply({"params": params}, ids, mask)
    ref_last, ref_pooled = run_ref(ref, ids, mask)
    err = max(max_rel_err(last, ref_last), max_rel_err(pooled, ref_pooled))
    print(f"CLIP text[sd2, attention_mask] max rel err {err:.2e}")
    assert err <= TOL
    # the mask changes the padded positions
    unmasked, _ = model.apply({"params": params}, ids)
    assert np.abs(np.asarray(unmasked) - np.asarray(last)).max() > 1e-2


def test_weights_round_trip_with_transformers(tokenizers, tmp_path):
    """transformers loads what cn_jax would write (prefixed keys, our config.json),
    and cn_jax reads what transformers' save_pretrained writes."""
    tok, ref, model, params = ref_and_ours("sd1", tokenizers)
    ids = tokenize(tok, PROMPTS, MAX_LEN)
    ours = model.apply({"params": params}, ids)
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    state = flax_to_torch(params)
    assert all(k.startswith("text_model.") for k in state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    loaded = transformers.CLIPTextModel.from_pretrained(folder).eval()
    for a, b in zip(ours, run_ref(loaded, ids)):
        assert max_rel_err(a, b) <= TOL

    ref.save_pretrained(tmp_path / "saved")
    cfg = CLIPTextConfig.from_dict(json.loads((tmp_path / "saved" / "config.json").read_text()))
    assert cfg == model.config
    from safetensors.numpy import load_file

    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    saved["text_model.embeddings.position_ids"] = np.arange(MAX_LEN)[None]  # old files have it
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *example_inputs(cfg))
    again = torch_to_flax(canonical_torch_state(saved), abstract["params"])
    np.testing.assert_array_equal(model.apply({"params": again}, ids)[0], ours[0])
    assert IGNORED_TORCH_KEYS == ("text_model.embeddings.position_ids",)


def test_config_reads_transformers_and_sd_files():
    for cfg in (CLIPTextConfig.sd15(), CLIPTextConfig.sd2(), CLIPTextConfig()):
        hf = transformers.CLIPTextConfig(**cfg.to_dict())
        assert CLIPTextConfig.from_dict(hf.to_dict()) == cfg
        assert CLIPTextConfig.from_dict(json.loads(hf.to_json_string())) == cfg
        assert CLIPTextConfig.from_dict(cfg.to_dict()) == cfg
    # SD 1.5's text_encoder/config.json as transformers 4.22 wrote it
    sd15 = {
        "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
        "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model",
        "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
        "projection_dim": 768, "torch_dtype": "float32", "transformers_version": "4.22.0.dev0",
        "vocab_size": 49408,
    }  # fmt: skip
    assert CLIPTextConfig.from_dict(sd15) == CLIPTextConfig.sd15()
    sd2 = dict(sd15, hidden_act="gelu", hidden_size=1024, intermediate_size=4096)
    sd2.update(num_attention_heads=16, num_hidden_layers=23, projection_dim=512)
    assert CLIPTextConfig.from_dict(sd2) == CLIPTextConfig.sd2()
    assert CLIPTextConfig.sd2().head_dim == 64


@pytest.mark.parametrize(
    "change, match",
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"use_rotary": True}, "use_rotary"),
        ({"model_type": "clip"}, "model_type"),
        ({"architectures": ["CLIPTextModelWithProjection"]}, "architectures"),
        ({"pruned_heads": {"0": [1]}}, "pruned_heads"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"eos_token_id": [2, 3]}, "eos_token_id"),
    ],
)
def test_config_is_strict(change, match):
    data = dict(CLIPTextConfig.sd15().to_dict(), **change)
    with pytest.raises(ValueError, match=match) as info:
        CLIPTextConfig.from_dict(data, source="te/config.json")
    assert "te/config.json" in str(info.value)


def test_dtypes_and_shapes(tokenizers):
    tok = tokenizers["sd1"]
    cfg = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=MAX_LEN, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    model = CLIPTextModel(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = model.init(jax.random.PRNGKey(0), *example_inputs(cfg, batch=2))["params"]
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert set(flax_to_torch(params)) == set(
        canonical_torch_state(
            transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_dict())).state_dict()
        )
    )
    ids = tokenize(tok, PROMPTS[:2], 8)  # shorter than max_position_embeddings
    last, pooled = model.apply({"params": params}, ids)
    assert last.shape == (2, 8, 32) and pooled.shape == (2, 32) and last.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.apply({"params": params}, np.zeros((1, MAX_LEN + 1), np.int32))


@pytest.mark.parametrize("style, pad", [("sd1", "<|endoftext|>"), ("sd2", "!")])
def test_tokenize_pads_like_diffusers(tokenizers, style, pad):
    tok = tokenizers[style]
    ids = tokenize(tok, PROMPTS, MAX_LEN)
    want = tok(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), MAX_LEN)
    np.testing.assert_array_equal(ids, want)
    assert tok.convert_ids_to_tokens(int(ids[1, -1])) == pad
    assert ids[1, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]  # "" -> bos, eos, pads
    if style == "sd2":
        assert tok.pad_token_id == 0
    np.testing.assert_array_equal(tokenize(tok, PROMPTS[0], MAX_LEN), ids[:1])
    assert tokenize(tok, PROMPTS[:1]).shape == (1, 77)  # default: model_max_length


def test_long_prompt_is_truncated_with_a_warning(tokenizers):
    tok = tokenizers["sd1"]
    long = "red circle with navy blue background and a green square and a yellow star on top"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize(tok, PROMPTS, MAX_LEN)  # nothing truncated: no warning
    with pytest.warns(UserWarning, match=r"prompt 1 .*dropping: 'yellow star on top'"):
        ids = tokenize(tok, [PROMPTS[0], long], MAX_LEN)
    want = tok([long], padding="max_length", max_length=MAX_LEN, truncation=True).input_ids[0]
    np.testing.assert_array_equal(ids[1], want)
    assert ids.shape == (2, MAX_LEN) and ids[1, -1] == tok.eos_token_id
    assert tok.decode(ids[1], skip_special_tokens=True).endswith("green square and a")
    # and the encoder takes it
    _, ref, model, params = ref_and_ours("sd1", tokenizers)
    last, pooled = model.apply({"params": params}, ids)
    assert max_rel_err(pooled, run_ref(ref, ids)[1]) <= TOL


def _legacy_folder(src, dst, pad):
    """A tokenizer/ folder as diffusers' SD 1.5 / 2.1 repos have it (no tokenizer.json)."""
    os.makedirs(dst)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(src, f), dst)
    added = lambda s: {
        "__type": "AddedToken", "content": s, "lstrip": False, "normalized": True,
        "rstrip": False, "single_word": False,
    }  # fmt: skip
    config = {
        "add_prefix_space": False, "bos_token": added("<|startoftext|>"), "do_lower_case": True,
        "eos_token": added("<|endoftext|>"), "errors": "replace", "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14", "pad_token": pad,
        "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
        "unk_token": added("<|endoftext|>"),
    }  # fmt: skip
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    with open(os.path.join(dst, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)


@pytest.mark.parametrize("pad, pad_id_is_eos", [("<|endoftext|>", True), ("!", False)])
def test_load_tokenizer_follows_the_folders_pad_token(tokenizers, tmp_path, pad, pad_id_is_eos):
    src = tokenizers["sd1"].name_or_path
    _legacy_folder(src, tmp_path / "pipe" / "tokenizer", pad)
    for folder in (tmp_path / "pipe" / "tokenizer", tmp_path / "pipe"):
        tok = load_tokenizer(folder)
        assert tok.pad_token == pad and tok.model_max_length == 77
        assert (tok.pad_token_id == tok.eos_token_id) == pad_id_is_eos
        ids = tokenize(tok, PROMPTS, MAX_LEN)
        want = tokenizers["sd1"](PROMPTS, padding="max_length", max_length=MAX_LEN)
        real = np.asarray(want.attention_mask, bool)
        np.testing.assert_array_equal(ids[real], np.asarray(want.input_ids)[real])
        assert (ids[~real] == (tok.eos_token_id if pad_id_is_eos else 0)).all()


def test_load_tokenizer_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"tokenizer.*merges\.txt") as info:
        load_tokenizer(folder)
    assert str(folder) in str(info.value) and "vocab.json," not in str(info.value)


def test_tokenizer_import_is_silent_without_torch():
    """Importing transformers without PyTorch (the demo's .venv) logs "PyTorch was
    not found..."; cn_jax.tokenizer imports it and loads a tokenizer silently."""
    import subprocess
    import sys

    import cn_jax

    folder = os.path.join(os.path.dirname(cn_jax.__file__), "assets", "tiny_tokenizer")
    no_torch = "import sys; sys.modules['torch'] = None; "  # import torch fails, find_spec: None
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}

    def run(code):
        proc = subprocess.run(
            [sys.executable, "-c", no_torch + code, folder],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    assert "PyTorch was not found" in run("import transformers")  # the advisory, unfiltered
    out = run(
        "from cn_jax.tokenizer import load_tokenizer, tokenize; "
        "print(tokenize(load_tokenizer(sys.argv[1]), 'red circle', 8).shape); "
        "import logging; print(len(logging.getLogger('transformers').filters), 'filters')"
    )
    assert "PyTorch was not found" not in out, out
    assert "(1, 8)" in out and "0 filters" in out  # tokenized; the filter is gone again
