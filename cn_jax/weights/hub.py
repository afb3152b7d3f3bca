"""Model paths that may be Hugging Face Hub repo ids.

`resolve_path(path, kind, ...)` turns what a user wrote where a model is expected
into a local path:

- "bundled:<name>": a model shipped in the package ("bundled:tiny");
- a local file or folder that exists: itself. It always wins over a repo id of
  the same spelling, as in diffusers;
- "org/name": the repo's snapshot in the Hugging Face cache, fetched by
  `huggingface_hub.snapshot_download` with only the files `kind` needs: configs,
  tokenizer files, and the `.safetensors` weights of the wanted `variant`
  (a `.bin` only with `allow_pickle`; never a safety checker or a repo's
  top-level single-file checkpoints);
- "org/name/path/in/repo.safetensors": that one file of the repo (a `.ckpt`,
  `.pth`, `.pt` or `.bin` only with `allow_pickle`);
- anything else: the path as given (the loader says that it does not exist).

The cache and offline mode are huggingface_hub's, as in diffusers: `HF_HOME` /
`HF_HUB_CACHE` say where the cache is, and with `HF_HUB_OFFLINE=1` nothing is
downloaded and a repo is read from the cache alone. A repo id that cannot be
had is one `WeightFileError` line naming it and why.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Literal

from cn_jax.weights.errors import WeightFileError

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Models shipped inside the package, by the name every model path accepts.
BUNDLED = {"bundled:tiny": _ASSETS / "tiny_base"}

# What a model path is read as, which says which files of a Hub repo are needed:
#   pipeline: a diffusers pipeline (model_index.json, unet/, vae/, text_encoder/,
#     tokenizer/, scheduler/, and SDXL's text_encoder_2/, tokenizer_2/); configs: the
#     same without any weights or tokenizers;
#   unet / controlnet: one model, at the repo's root or in its unet/ (controlnet/)
#     folder (for unet also model_index.json and vae/config.json: the latent factor);
#   tokenizer: a CLIP tokenizer at the repo's root or in its tokenizer/ folder (and
#     SDXL's second in tokenizer_2/).
Kind = Literal["pipeline", "configs", "unet", "controlnet", "tokenizer"]

# The pipeline folders with weights (a repo without SDXL's text_encoder_2 lacks it: nothing
# is fetched there), and those with a CLIP tokenizer.
PIPELINE_MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")
PIPELINE_TOKENIZERS = ("tokenizer", "tokenizer_2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
TOKENIZER_FILES = (
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json",
)  # fmt: skip
_STEMS = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' weight names
_COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve_path(
    path: str | os.PathLike,
    kind: Kind = "pipeline",
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """A local path for a model path, a bundled model's name or a Hub repo id.

    Args:
      path: a local file or folder, "bundled:tiny", a Hub repo id "org/name", or
        one file of a repo "org/name/file.safetensors". Only a `str` can be a
        repo id; a local path that exists wins.
      kind: what the path is read as (`Kind`): which files of a repo to fetch.
      revision: the repo's branch, tag or commit (default: main). Local paths
        ignore it.
      subfolder: the model's folder inside the repo or local folder (joined to
        the result).
      variant: the weight variant to fetch, e.g. "fp16" for
        `diffusion_pytorch_model.fp16.safetensors`, else a folder's plain weights;
        default: the plain weights, else the fp16 ones (what the loaders read).
      allow_pickle: also fetch `.bin` weights where a folder has no safetensors.

    Returns:
      The local file or folder (a snapshot folder in the Hugging Face cache for
      a repo id), with `subfolder` joined.

    Raises:
      WeightFileError: an unknown bundled name, or a repo id that is neither
        cached nor downloadable (one line: the id and the reason).
    """
    if isinstance(path, str) and path.startswith("bundled:"):
        if path not in BUNDLED:
            raise WeightFileError(f"unknown bundled model {path!r}; bundled: {sorted(BUNDLED)}")
        return _join(BUNDLED[path], subfolder)
    local = Path(path)
    parts = None if not isinstance(path, str) or local.exists() else hub_parts(path)
    if parts is None:
        return _join(local, subfolder)
    repo, filename = parts
    if filename is not None:
        return _fetch_file(path, repo, filename, revision, subfolder, allow_pickle)
    root = _fetch_repo(path, repo, kind, revision, subfolder, variant, allow_pickle)
    return _join(root, subfolder)


def hub_parts(path: str) -> tuple[str, str | None] | None:
    """`(repo id, file in it or None)` when `path` is written as a Hub repo id
    ("org/name") or one file of a repo ("org/name/dir/file.safetensors"), else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    parts = path.split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        return None
    repo = "/".join(parts[:2])
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    if len(parts) == 2:
        return repo, None
    filename = "/".join(parts[2:])
    if not filename.lower().endswith(WEIGHT_SUFFIXES):
        return None
    return repo, filename


def offline() -> bool:
    """Whether huggingface_hub may not download: `HF_HUB_OFFLINE` (or
    `TRANSFORMERS_OFFLINE`) as huggingface_hub read it at import, or as set now."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or now.upper() in {"1", "ON", "YES", "TRUE"}


def _join(path: Path, subfolder: str | None) -> Path:
    return path / subfolder if subfolder else path


# -- what a repo's snapshot must hold ------------------------------------------------


def _config_patterns(kind: Kind, subfolder: str | None) -> list[str]:
    """The small files fetched first: they say which folders hold weights."""
    if kind in ("pipeline", "configs"):
        folders = [f"{m}/config.json" for m in PIPELINE_MODELS]
        tokenizer = [f"{t}/{f}" for t in PIPELINE_TOKENIZERS for f in TOKENIZER_FILES]
        tokenizer = tokenizer if kind == "pipeline" else []
        return ["model_index.json", *folders, "scheduler/scheduler_config.json", *tokenizer]
    if kind == "tokenizer":
        folders = [subfolder] if subfolder else ["", *PIPELINE_TOKENIZERS]
        return [_in(folder, f) for folder in folders for f in TOKENIZER_FILES]
    if subfolder:  # unet / controlnet
        return [_in(subfolder, "config.json")]
    latent_factor = ["model_index.json", "vae/config.json"] if kind == "unet" else []
    return ["config.json", f"{kind}/config.json", *latent_factor]


def _weight_folders(root: Path, kind: Kind, subfolder: str | None) -> list[str]:
    """The folders of the snapshot whose weights a load of `kind` reads, from its configs."""
    if kind == "pipeline":
        return [m for m in PIPELINE_MODELS if (root / m / "config.json").is_file()]
    if kind in ("unet", "controlnet"):
        for folder in [subfolder] if subfolder else ["", kind]:
            if (root / _in(folder, "config.json")).is_file():
                return [folder]
    return []


def _weight_stages(variant: str | None, allow_pickle: bool) -> list[list[str]]:
    """Weight file names (patterns within one folder), in the loaders' order of
    preference (`folders._weight_files`); a later stage is fetched only for a
    folder the earlier ones left without weights."""
    tags = [f".{variant}", ""] if variant else ["", ".fp16"]
    stages = []
    for tag in tags:
        names = []
        for stem in _STEMS:  # one file, shards, and both spellings of a variant's index
            names += [f"{stem}{tag}.safetensors", f"{stem}{tag}-*-of-*.safetensors"]
            names += dict.fromkeys(
                [f"{stem}.safetensors.index{tag}.json", f"{stem}{tag}.safetensors.index.json"]
            )
        stages.append(names)
    if allow_pickle:
        stages.append(["diffusion_pytorch_model.bin", "pytorch_model.bin"])
    return stages


def _in(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _has_any(folder: Path, names: list[str]) -> bool:
    return folder.is_dir() and any(
        fnmatch.fnmatchcase(f.name, n) for f in folder.iterdir() for n in names
    )


# -- fetching -------------------------------------------------------------------------


def _fetch_repo(given, repo, kind, revision, subfolder, variant, allow_pickle) -> Path:
    """The repo's snapshot folder holding what a load of `kind` reads: the configs
    first, then each weight folder's files of the first stage that has any."""
    patterns = _config_patterns(kind, subfolder)
    root = _snapshot(given, repo, revision, patterns)
    if not root.is_dir():  # online, and none of the files is in the repo
        raise WeightFileError(
            f"{given}: Hub repo {repo} (revision {revision or 'main'}) has none of the files a "
            f"{kind} needs: {', '.join(patterns)}"
        )
    if kind in ("configs", "tokenizer"):
        return root
    # Later calls ask for the commit the configs came from: one consistent snapshot
    # even if the branch moves meanwhile, and no second look-up of the branch.
    pinned = root.name if _COMMIT.fullmatch(root.name) else revision
    folders = _weight_folders(root, kind, subfolder)
    seen: list[str] = []
    for names in _weight_stages(variant, allow_pickle):
        seen += names
        missing = [f for f in folders if not _has_any(root / f, seen)]
        if not missing:
            break
        patterns = [_in(f, n) for f in missing for n in names]
        root = _snapshot(given, repo, pinned, patterns, revision)
    return root


def _snapshot(given, repo, revision, patterns, asked=None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo, revision=revision, allow_patterns=patterns, local_files_only=offline()
        )
    except Exception as e:  # huggingface_hub's errors: network, HTTP, cache, validation
        raise _hub_error(given, repo, asked or revision, e) from e
    return Path(folder)


def _fetch_file(given, repo, filename, revision, subfolder, allow_pickle) -> Path:
    from huggingface_hub import hf_hub_download

    if filename.lower().endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise WeightFileError(
            f"{given}: a pickle file (can run code when loaded) is fetched and read only with "
            "allow_pickle=True (--allow-pickle); use a .safetensors file"
        )
    try:
        local = hf_hub_download(
            repo, filename, subfolder=subfolder, revision=revision, local_files_only=offline()
        )
    except Exception as e:  # as in _snapshot
        raise _hub_error(given, repo, revision, e) from e
    return Path(local)


def _hub_error(given: str, repo: str, revision: str | None, e: Exception) -> WeightFileError:
    """One line: the id, that it is no local path, and why the Hub did not give it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"Hub repo {repo} (revision {revision or 'main'})"
    head = f"{given}: no such local file or folder, and"
    if isinstance(e, LocalEntryNotFoundError) and offline():
        why = (f"{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
               "HF_HUB_OFFLINE is set, so nothing was downloaded")  # fmt: skip
    elif isinstance(e, RevisionNotFoundError):
        why = f"{at}: the repo has no such branch, tag or commit"
    elif isinstance(e, RepositoryNotFoundError):
        why = f"no {at} (or it is private or gated: log in with `hf auth login`)"
    else:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        why = f"{at} could not be fetched: {type(e).__name__}: {reason}"
    return WeightFileError(f"{head} {why}")
