"""Loading and saving real files: diffusers folders, original single files, and the
clear errors for bad ones. The PyTorch side (diffusers) is the real client."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

import cn_jax
from cn_jax import WeightFileError
from cn_jax.weights import read_safetensors, write_safetensors

from reference import (
    flax_controlnet_params,
    inputs,
    jit_apply,
    max_rel_err,
    nchw,
    nhwc,
    randomize_,
    torch_controlnet,
    torch_unet,
)

TOL = 1e-4


def _cn_outputs(cnet, params, name="sd15"):
    x, t, ctx, cond = inputs(name)
    return jit_apply(cnet, {"params": params}, x, t, ctx, cond, conditioning_scale=0.9)


def _torch_cn_outputs(model, name="sd15"):
    x, t, ctx, cond = inputs(name)
    with torch.no_grad():
        down, mid = model(
            nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(cond),
            conditioning_scale=0.9, return_dict=False,
        )  # fmt: skip
    return [nhwc(d) for d in down], nhwc(mid)


def _max_err(ours, ref):
    return max(max_rel_err(a, b) for a, b in zip([*ours[0], ours[1]], [*ref[0], ref[1]]))


def _tree_equal(a, b):
    la, lb = (jax_leaves(a), jax_leaves(b))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def jax_leaves(tree):
    import jax

    return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]


# -- loading diffusers folders ----------------------------------------------------


@pytest.mark.parametrize("layout", ["model", "pipeline"])
def test_load_unet_folder_matches_diffusers(tmp_path, layout):
    tu = torch_unet("sd2")
    target = tmp_path / "unet" if layout == "pipeline" else tmp_path
    tu.save_pretrained(target)
    unet, params = cn_jax.load_unet(tmp_path)
    x, t, ctx, _ = inputs("sd2")
    with torch.no_grad():
        ref = nhwc(tu(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    assert unet.config.use_linear_projection and unet.config.heads_per_block == (2, 4, 4)
    assert max_rel_err(jit_apply(unet, {"params": params}, x, t, ctx), ref) <= TOL


def test_load_unet_fp16_variant(tmp_path):
    tu = UNet2DConditionModel.from_config(torch_unet("gray").config)
    tu.load_state_dict(torch_unet("gray").state_dict())
    tu.half().save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    _, params = cn_jax.load_unet(tmp_path)  # falls back to the fp16 file
    k = np.asarray(params["conv_in"]["kernel"])
    assert k.dtype == np.float32
    ref = torch_unet("gray").conv_in.weight.detach().half().float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(k, ref)


@pytest.mark.parametrize("layout", ["model", "pipeline"])
def test_load_controlnet_folder_matches_diffusers(tmp_path, layout):
    tc = torch_controlnet("sd15")
    tc.save_pretrained(tmp_path / "controlnet" if layout == "pipeline" else tmp_path)
    cnet, params = cn_jax.load_controlnet(tmp_path)
    assert _max_err(_cn_outputs(cnet, params), _torch_cn_outputs(tc)) <= TOL


def test_load_controlnet_single_diffusers_file(tmp_path):
    tc = torch_controlnet("sd15")
    tc.save_pretrained(tmp_path)
    single = tmp_path / "diffusion_pytorch_model.safetensors"
    cnet, params = cn_jax.load_controlnet(single)  # config.json beside it
    assert _max_err(_cn_outputs(cnet, params), _torch_cn_outputs(tc)) <= TOL


def _sd15_like_controlnet():
    """SD 1.x conventions (8 heads, 1x1-conv projections) so the config can be inferred."""
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32,
        cross_attention_dim=32, attention_head_dim=8, layers_per_block=2,
    )  # fmt: skip
    return randomize_(ControlNetModel.from_unet(unet), 11)


def test_original_file_without_config_infers_it(tmp_path):
    tc = _sd15_like_controlnet()
    cnet, params = flax_controlnet_params(tc)
    path = tmp_path / "control_test.safetensors"
    cn_jax.save_controlnet(path, cnet, params, format="original")
    # Strip our metadata: a file as lllyasviel publishes it, config inferred.
    state = read_safetensors(path)
    assert all(k.startswith("control_model.") for k in state)
    write_safetensors(path, state)
    loaded, lp = cn_jax.load_controlnet(path)
    assert loaded.config == cnet.config
    assert _tree_equal(lp, params)


# -- saving for the PyTorch world -----------------------------------------------


def test_save_diffusers_loads_in_diffusers(tmp_path):
    tc = torch_controlnet("sd15")
    cnet, params = flax_controlnet_params(tc)
    cn_jax.save_controlnet(tmp_path / "out", cnet, params, format="diffusers")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["_class_name"] == "ControlNetModel"
    back = ControlNetModel.from_pretrained(tmp_path / "out").eval()
    sd, ref = back.state_dict(), tc.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert _max_err(_cn_outputs(cnet, params), _torch_cn_outputs(back)) <= TOL


def test_save_original_round_trips_and_matches_diffusers_conversion(tmp_path):
    tc = torch_controlnet("sd15")
    cnet, params = flax_controlnet_params(tc)
    path = tmp_path / "control_sd15_test.safetensors"
    cn_jax.save_controlnet(path, cnet, params, format="original")
    loaded, lp = cn_jax.load_controlnet(path)
    assert loaded.config == cnet.config and _tree_equal(lp, params)
    # diffusers' own converter reads our original-format file to the same model.
    tc.save_pretrained(tmp_path / "cfg")
    ref = ControlNetModel.from_single_file(str(path), config=str(tmp_path / "cfg")).eval()
    sd = ref.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in tc.state_dict().items())
    assert _max_err(_cn_outputs(cnet, params), _torch_cn_outputs(ref)) <= TOL


def test_paper_variant_round_trips(tmp_path):
    from cn_jax import ControlNet, ControlNetConfig, init_controlnet_from_unet

    from reference import flax_unet_params

    unet, up = flax_unet_params(torch_unet("gray"))
    cfg = ControlNetConfig.from_unet(unet.config, conditioning_embedding_type="paper")
    params = init_controlnet_from_unet(up, cfg)
    for fmt, path in (("diffusers", tmp_path / "d"), ("original", tmp_path / "o.safetensors")):
        cn_jax.save_controlnet(path, ControlNet(cfg), params, format=fmt)
        loaded, lp = cn_jax.load_controlnet(path)
        assert loaded.config == cfg and _tree_equal(lp, params), fmt


def test_save_bfloat16_and_unet_round_trip(tmp_path):
    import jax.numpy as jnp

    tu = torch_unet("gray")
    unet, params = cn_jax.load_unet(_saved(tu, tmp_path / "in"))
    cn_jax.save_unet(tmp_path / "out", unet, params)
    back = UNet2DConditionModel.from_pretrained(tmp_path / "out")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in tu.state_dict().items())
    _, p16 = cn_jax.load_unet(tmp_path / "out", param_dtype=jnp.bfloat16)
    assert p16["conv_in"]["kernel"].dtype == jnp.bfloat16
    cn_jax.save_unet(tmp_path / "bf16", unet, p16)
    assert (
        read_safetensors(tmp_path / "bf16" / "diffusion_pytorch_model.safetensors")[
            "conv_in.weight"
        ].dtype
        == jnp.bfloat16
    )


def _saved(model, path):
    model.save_pretrained(path)
    return path


# -- bad files: one clear error each ----------------------------------------------


def test_truncated_safetensors(tmp_path):
    folder = _saved(torch_controlnet("gray"), tmp_path / "cn")
    f = folder / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(WeightFileError, match="truncated") as e:
        cn_jax.load_controlnet(folder)
    assert str(f) in str(e.value)


def test_missing_and_unexpected_keys_are_all_listed(tmp_path):
    folder = _saved(torch_controlnet("gray"), tmp_path / "cn")
    f = folder / "diffusion_pytorch_model.safetensors"
    state = read_safetensors(f)
    del state["controlnet_mid_block.bias"]
    del state["down_blocks.0.resnets.0.conv1.weight"]
    state["extra.weight"] = np.zeros(3, np.float32)
    write_safetensors(f, state)
    with pytest.raises(WeightFileError) as e:
        cn_jax.load_controlnet(folder)
    msg = str(e.value)
    assert "2 missing keys" in msg and "controlnet_mid_block.bias" in msg
    assert "down_blocks.0.resnets.0.conv1.weight" in msg
    assert "1 unexpected keys" in msg and "extra.weight" in msg and str(f) in msg


def test_integer_tensor_for_a_float_weight_is_refused(tmp_path):
    """Issue 21: an int32 tensor where the model has a float weight would load as
    values up to 1e9; the load names the file, the key and the dtype instead."""
    folder = _saved(torch_unet("gray"), tmp_path / "unet")
    f = folder / "diffusion_pytorch_model.safetensors"
    state = read_safetensors(f)
    state["conv_in.weight"] = np.full(state["conv_in.weight"].shape, 10**9, np.int32)
    write_safetensors(f, state)
    with pytest.raises(WeightFileError, match=r"conv_in.weight: file has int32, model") as e:
        cn_jax.load_unet(folder)
    assert str(f) in str(e.value)


def test_wrong_shape_names_key_and_shapes(tmp_path):
    folder = _saved(torch_unet("gray"), tmp_path / "unet")
    f = folder / "diffusion_pytorch_model.safetensors"
    state = read_safetensors(f)
    state["conv_in.weight"] = np.zeros((16, 4, 5, 5), np.float32)
    write_safetensors(f, state)
    want = r"conv_in.weight: file has \(16, 4, 5, 5\), model expects \(16, 4, 3, 3\)"
    with pytest.raises(WeightFileError, match=want):
        cn_jax.load_unet(folder)


def test_pickle_refused_unless_opted_in(tmp_path):
    tc = torch_controlnet("gray")
    tc.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(WeightFileError, match="allow_pickle"):
        cn_jax.load_controlnet(tmp_path)
    cnet, params = cn_jax.load_controlnet(tmp_path, allow_pickle=True)
    assert _max_err(_cn_outputs(cnet, params, "gray"), _torch_cn_outputs(tc, "gray")) <= TOL


def test_missing_config_and_path(tmp_path):
    folder = _saved(torch_unet("gray"), tmp_path / "unet")
    (folder / "config.json").unlink()
    with pytest.raises(WeightFileError, match="no config.json"):
        cn_jax.load_unet(folder)
    with pytest.raises(WeightFileError, match="no such file"):
        cn_jax.load_unet(tmp_path / "nope")
    shutil.rmtree(folder)
    folder = _saved(torch_unet("gray"), tmp_path / "unet2")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightFileError, match="no weights found"):
        cn_jax.load_unet(folder)


def test_unsupported_config_field_named(tmp_path):
    folder = _saved(torch_unet("gray"), tmp_path / "unet")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["class_embed_type"] = "timestep"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: field class_embed_type='timestep'"):
        cn_jax.load_unet(folder)


def test_save_original_needs_safetensors_suffix(tmp_path):
    cnet, params = flax_controlnet_params(torch_controlnet("gray"))
    with pytest.raises(ValueError, match="one .safetensors file"):
        cn_jax.save_controlnet(tmp_path / "x.ckpt", cnet, params, format="original")
    with pytest.raises(ValueError, match="format"):
        cn_jax.save_controlnet(tmp_path / "x", cnet, params, format="onnx")
