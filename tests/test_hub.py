"""Models by Hugging Face Hub id (`cn_jax.weights.hub`), offline, from a local Hub cache.

Each test lays out a cache as huggingface_hub writes it (`models--org--name/`:
`blobs/<sha256>`, `snapshots/<commit>/...` linking to them, `refs/<branch>`
holding the commit) under tmp_path, points HF_HUB_CACHE at it and sets
HF_HUB_OFFLINE, so nothing touches the network. What an online fetch asks for is
tested against a stand-in for `snapshot_download` that copies the files its
`allow_patterns` select from a local "remote" repo.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import huggingface_hub
import jax
import numpy as np
import pytest
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

import cn_jax
from cn_jax.cli import main
from cn_jax.weights import hub
from cn_jax.weights.errors import WeightFileError
from cn_jax.weights.sd import BUNDLED, load_pipeline

TINY = BUNDLED["bundled:tiny"]  # a diffusers pipeline folder (pixel space: no vae/)
MAIN = "0123456789abcdef0123456789abcdef01234567"
DEV = "fedcba9876543210fedcba9876543210fedcba98"


def put_in_cache(cache: Path, repo: str, files: dict[str, Path | bytes], commit=MAIN, ref="main"):
    """`files` (path in repo -> source file or bytes) as commit `commit` of `repo`,
    with `refs/<ref>` naming it, laid out as huggingface_hub's cache."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for name, source in files.items():
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(blob)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return root / "snapshots" / commit


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache, offline (as a process started with HF_HUB_CACHE and
    HF_HUB_OFFLINE=1 set: huggingface_hub reads both at import)."""
    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return folder


@pytest.fixture(scope="module")
def tiny_unet():
    return cn_jax.load_unet(TINY, subfolder="unet")


@pytest.fixture(scope="module")
def doubled(tmp_path_factory, tiny_unet) -> Path:
    """The tiny UNet with every weight doubled: a folder to tell snapshots apart."""
    unet, params = tiny_unet
    folder = tmp_path_factory.mktemp("doubled")
    cn_jax.save_unet(folder, unet, jax.tree.map(lambda x: 2 * x, params))
    return folder


def assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# -- what counts as a repo id -------------------------------------------------------------


@pytest.mark.parametrize(
    "path, parts",
    [
        ("org/name", ("org/name", None)),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5",
         ("stable-diffusion-v1-5/stable-diffusion-v1-5", None)),
        ("org/name/control.safetensors", ("org/name", "control.safetensors")),
        ("org/name/sub/model.ckpt", ("org/name", "sub/model.ckpt")),
        ("org/name/unet", None),  # a file of a repo is named with its suffix
        ("name", None),
        ("./org/name", None),
        ("/abs/path", None),
        ("org/../name", None),
        ("org--x/name", None),
        ("org/name/", None),
    ],
)  # fmt: skip
def test_hub_parts(path, parts):
    assert hub.hub_parts(path) == parts


# -- loading from the cache, offline ---------------------------------------------------


def test_pipeline_unet_tokenizer_by_repo_id(cache, tiny_unet):
    snapshot = put_in_cache(cache, "org/tiny", folder_files(TINY))
    sd = load_pipeline("org/tiny")
    assert Path(sd.source) == snapshot
    assert sd.vae is None  # pixel space, as the local folder
    assert_same(sd.unet_params, tiny_unet[1])
    local = load_pipeline(TINY)
    assert_same(sd.text_encoder_params, local.text_encoder_params)
    assert sd.tokenizer("a red circle").input_ids == local.tokenizer("a red circle").input_ids

    _, params = cn_jax.load_unet("org/tiny", subfolder="unet")
    assert_same(params, tiny_unet[1])
    _, params = cn_jax.load_unet("org/tiny")  # a pipeline repo: its unet/
    assert_same(params, tiny_unet[1])
    from cn_jax.tokenizer import load_tokenizer

    assert (
        load_tokenizer("org/tiny")("a red circle").input_ids
        == sd.tokenizer("a red circle").input_ids
    )


def test_controlnet_by_repo_id_folder_and_single_file(cache, tmp_path, tiny_unet):
    unet, params = tiny_unet
    config = cn_jax.ControlNetConfig.from_unet(unet.config, latent_factor=1)
    cparams = cn_jax.init_controlnet_from_unet(params, config)
    cn_jax.save_controlnet(tmp_path / "cn", cn_jax.ControlNet(config), cparams)
    cn_jax.save_controlnet(
        tmp_path / "control.safetensors", cn_jax.ControlNet(config), cparams, format="original"
    )
    put_in_cache(cache, "org/cn", folder_files(tmp_path / "cn"))
    put_in_cache(cache, "org/cn-file", {"control.safetensors": tmp_path / "control.safetensors"})
    put_in_cache(
        cache,
        "org/cn-pipe",
        {f"controlnet/{k}": v for k, v in folder_files(tmp_path / "cn").items()},
    )

    for path, kwargs in [
        ("org/cn", {}),
        ("org/cn-file/control.safetensors", {}),
        ("org/cn-pipe", {}),
        ("org/cn-pipe", {"subfolder": "controlnet"}),
    ]:
        cnet, loaded = cn_jax.load_controlnet(path, **kwargs)
        assert cnet.config == config, path
        assert_same(loaded, cparams)


def test_variant_picks_the_variant_files(cache, tmp_path, tiny_unet):
    unet, params = tiny_unet
    cn_jax.save_unet(tmp_path / "half", unet, params, dtype=np.float16)
    files = folder_files(TINY)
    files["unet/diffusion_pytorch_model.fp16.safetensors"] = (
        tmp_path / "half" / "diffusion_pytorch_model.safetensors"
    )
    put_in_cache(cache, "org/tiny", files)
    half = jax.tree.map(lambda x: np.asarray(x, np.float16).astype(np.float32), params)

    _, loaded = cn_jax.load_unet("org/tiny", subfolder="unet", variant="fp16")
    assert_same(loaded, half)
    _, loaded = cn_jax.load_unet("org/tiny", subfolder="unet")  # default: the plain file
    assert_same(loaded, params)
    sd = load_pipeline("org/tiny", variant="fp16")  # text_encoder has no fp16: its plain file
    assert_same(sd.unet_params, half)


def test_revision_other_than_main(cache, doubled, tiny_unet):
    put_in_cache(cache, "org/tiny", folder_files(TINY))
    dev = folder_files(TINY) | {f"unet/{k}": v for k, v in folder_files(doubled).items()}
    put_in_cache(cache, "org/tiny", dev, commit=DEV, ref="dev")
    twice = jax.tree.map(lambda x: 2 * x, tiny_unet[1])

    _, loaded = cn_jax.load_unet("org/tiny", subfolder="unet", revision="dev")
    assert_same(loaded, twice)
    _, loaded = cn_jax.load_unet("org/tiny", subfolder="unet", revision=DEV)  # a commit
    assert_same(loaded, twice)
    _, loaded = cn_jax.load_unet("org/tiny", subfolder="unet")
    assert_same(loaded, tiny_unet[1])

    # The run config's model.revision reaches the loader.
    from cn_jax.config import Config
    from cn_jax.train.loop import load_base

    config = Config.model_validate({"model": {"base": "org/tiny", "revision": "dev"}})
    assert_same(load_base(config, np.float32).unet_params, twice)


def test_pickle_weights_are_neither_fetched_nor_read_without_allow_pickle(cache, tmp_path):
    put_in_cache(cache, "org/pickled", {
        "unet/config.json": TINY / "unet" / "config.json",
        "unet/diffusion_pytorch_model.bin": b"not read",
        "model.ckpt": b"not read",
    })  # fmt: skip
    with pytest.raises(WeightFileError, match="refusing to load a pickle"):
        cn_jax.load_unet("org/pickled", subfolder="unet")
    with pytest.raises(WeightFileError, match="allow_pickle=True"):
        cn_jax.load_controlnet("org/pickled/model.ckpt")


def test_a_local_path_wins_over_a_repo_id(cache, tmp_path, monkeypatch, doubled, tiny_unet):
    put_in_cache(cache, "org/tiny", folder_files(TINY))
    work = tmp_path / "work"
    shutil.copytree(doubled, work / "org" / "tiny")
    monkeypatch.chdir(work)
    _, loaded = cn_jax.load_unet("org/tiny")
    assert_same(loaded, jax.tree.map(lambda x: 2 * x, tiny_unet[1]))


def test_a_missing_id_is_one_line_naming_it(cache):
    put_in_cache(cache, "org/tiny", folder_files(TINY))
    with pytest.raises(WeightFileError) as info:
        load_pipeline("org/absent")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("org/absent: no such local file or folder")
    assert "not in the Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(WeightFileError, match=r"revision nope\)"):
        cn_jax.load_unet("org/tiny", revision="nope")
    with pytest.raises(WeightFileError, match="org/tiny/absent.safetensors: no such local"):
        cn_jax.load_controlnet("org/tiny/absent.safetensors")


def test_cli_init_controlnet_from_a_repo_id(cache, tmp_path, capsys, tiny_unet):
    put_in_cache(cache, "org/tiny", folder_files(TINY))
    out = tmp_path / "cn"
    assert main(["init-controlnet", "--base", "org/tiny", "--out", str(out)]) == 0
    cnet, _ = cn_jax.load_controlnet(out)
    assert cnet.config.latent_factor == 1  # from the repo's model_index.json: no VAE

    assert main(["init-controlnet", "--base", "org/absent", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cn-jax init-controlnet: error: org/absent: no such local")
    assert "\n" not in err


# -- what an online fetch asks for ------------------------------------------------------


def fetched(monkeypatch, tmp_path: Path, remote: Path, path="org/sd", kind="pipeline", **kw):
    """The files `resolve_path` has a stand-in `snapshot_download` copy from `remote`."""
    snapshot = tmp_path / "fetched" / MAIN
    shutil.rmtree(snapshot, ignore_errors=True)
    available = folder_files(remote)

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, local_files_only=False):
        for name in filter_repo_objects(available, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(available[name], snapshot / name)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hub.resolve_path(path, kind, **kw) == snapshot / kw.get("subfolder", "")
    return set(folder_files(snapshot))


def test_fetches_only_what_a_load_reads(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    shutil.copytree(TINY, remote)
    extra = ["unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
             "text_encoder/pytorch_model.bin", "safety_checker/model.safetensors",
             "safety_checker/config.json", "v1-5-pruned.safetensors", "README.md"]  # fmt: skip
    for name in extra:  # what SD 1.5's repo also holds
        (remote / name).parent.mkdir(exist_ok=True)
        (remote / name).write_bytes(b"x")
    configs = {"model_index.json", "unet/config.json", "text_encoder/config.json",
               "scheduler/scheduler_config.json"}  # fmt: skip
    tokenizer = {
        f"tokenizer/{f}"
        for f in ("merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json")
    }
    plain = {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}

    assert fetched(monkeypatch, tmp_path, remote) == configs | tokenizer | plain
    assert fetched(monkeypatch, tmp_path, remote, variant="fp16") == configs | tokenizer | {
        "unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.safetensors",
    }  # fmt: skip
    assert fetched(monkeypatch, tmp_path, remote, kind="configs") == configs
    assert fetched(monkeypatch, tmp_path, remote, kind="unet", subfolder="unet") == {
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    }  # fmt: skip
    assert fetched(monkeypatch, tmp_path, remote, kind="tokenizer") == tokenizer

    # Pickle weights: only with allow_pickle, and only where no safetensors are.
    (remote / "unet/diffusion_pytorch_model.safetensors").unlink()
    (remote / "unet/diffusion_pytorch_model.fp16.safetensors").unlink()
    assert "unet/diffusion_pytorch_model.bin" not in fetched(monkeypatch, tmp_path, remote)
    with_pickle = fetched(monkeypatch, tmp_path, remote, allow_pickle=True)
    assert "unet/diffusion_pytorch_model.bin" in with_pickle
    assert "text_encoder/pytorch_model.bin" not in with_pickle
