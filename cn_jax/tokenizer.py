"""CLIP tokenizer for Stable Diffusion prompts: load a `tokenizer/` folder (local or
in a Hub repo) and turn prompts into the fixed-length int32 token ids the text encoder takes.

Ids are padded to `max_length` the way diffusers' `StableDiffusionPipeline`
does (`padding="max_length", truncation=True`) with the tokenizer's own pad
token: SD 1.x tokenizers pad with `<|endoftext|>` (id 49407), SD 2.x ones with
"!" (id 0). A prompt longer than `max_length` is truncated (its last kept token
is still `<|endoftext|>`) with a `UserWarning` naming the dropped text; it is
never an error.

Only transformers' tokenizers are used, which need no PyTorch; importing
transformers without it logs "PyTorch was not found..." (once per process),
so that one advisory is filtered out while this module imports it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np


def _not_the_torch_advisory(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found")


# A filter on transformers' own logger, removed after the import: no environment
# variable or verbosity is changed, and any other transformers message passes.
_transformers_log = logging.getLogger("transformers")
_transformers_log.addFilter(_not_the_torch_advisory)
try:
    from transformers import CLIPTokenizer
finally:
    _transformers_log.removeFilter(_not_the_torch_advisory)

VOCAB_FILES = ("vocab.json", "merges.txt")


def load_tokenizer(folder: str | os.PathLike, revision: str | None = None) -> CLIPTokenizer:
    """Load a `transformers.CLIPTokenizer` from a local folder.

    Args:
      folder: a diffusers pipeline's `tokenizer/` folder (`vocab.json` +
        `merges.txt`, usually `tokenizer_config.json` / `special_tokens_map.json`;
        a `tokenizer.json` alone also works), or a pipeline folder holding one;
        or a Hugging Face Hub repo id "org/name" with either, whose tokenizer
        files alone are fetched into the Hugging Face cache (`weights.hub`; a
        local folder that exists wins). transformers itself never downloads.
      revision: a Hub repo's branch, tag or commit (default: main).

    Raises:
      FileNotFoundError: the folder or one of its vocabulary files is missing
        (the message names the folder and the files).
      WeightFileError: a Hub repo id that is neither cached nor downloadable.
      ValueError: the files are there but transformers cannot read them.
    """
    from cn_jax.weights.hub import resolve_path

    path = resolve_path(folder, "tokenizer", revision=revision)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
    if not any((path / f).is_file() for f in (*VOCAB_FILES, "tokenizer.json")):
        if (path / "tokenizer").is_dir():  # given the pipeline folder
            path = path / "tokenizer"
    missing = [f for f in VOCAB_FILES if not (path / f).is_file()]
    if missing and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"tokenizer folder {str(path)!r} lacks {', '.join(missing)} "
            "(a CLIP tokenizer needs vocab.json and merges.txt, or tokenizer.json)"
        )
    try:
        return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises a variety of types for bad files
        raise ValueError(
            f"tokenizer folder {str(path)!r}: cannot load a CLIP tokenizer: {e}"
        ) from e


@dataclasses.dataclass(frozen=True)
class TokenizerPair:
    """SDXL's two tokenizers: CLIP ViT-L's (`tokenizer/`) and OpenCLIP bigG's
    (`tokenizer_2/`, the same vocabulary, padding with its own "!" token).
    `tokenize` gives (B, 2, L) ids, one row per tokenizer."""

    first: Any
    second: Any

    @property
    def model_max_length(self) -> int:
        return self.first.model_max_length

    @classmethod
    def load(cls, folder: str | os.PathLike, folder_2: str | os.PathLike) -> TokenizerPair:
        return cls(load_tokenizer(folder), load_tokenizer(folder_2))


def tokenize(
    tokenizer: CLIPTokenizer | TokenizerPair,
    prompts: str | Sequence[str],
    max_length: int | None = None,
    prompts_2: str | Sequence[str] | None = None,
) -> np.ndarray:
    """Token ids of `prompts`, padded / truncated to `max_length`, as diffusers makes them.

    Args:
      tokenizer: a CLIP tokenizer (e.g. from `load_tokenizer`), or SDXL's `TokenizerPair`.
      prompts: one prompt or a sequence of them ("" is the unconditional prompt).
      max_length: ids per prompt, `<|startoftext|>` and `<|endoftext|>`
        included; default `tokenizer.model_max_length` (SD: 77).
      prompts_2: with a `TokenizerPair`, the second tokenizer's prompts (diffusers'
        `prompt_2`); default `prompts`.

    Returns:
      int32 array (B, max_length); with a `TokenizerPair` (B, 2, max_length).

    Warns:
      UserWarning: for each prompt longer than `max_length`, naming the dropped text.
    """
    if isinstance(tokenizer, TokenizerPair):
        second = prompts if prompts_2 is None else prompts_2
        ids = [tokenize(tokenizer.first, prompts, max_length)]
        ids.append(tokenize(tokenizer.second, second, max_length))
        if ids[0].shape[0] != ids[1].shape[0]:
            raise ValueError(f"{ids[1].shape[0]} second prompts for {ids[0].shape[0]} prompts")
        return np.stack(ids, axis=1)
    if prompts_2 is not None:
        raise ValueError("prompts_2 is for SDXL's two tokenizers; this model has one")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if max_length is None:
        max_length = tokenizer.model_max_length
    if max_length < 2:
        raise ValueError(f"tokenize: max_length={max_length} leaves no room for bos/eos tokens")
    if not prompts:
        return np.zeros((0, max_length), np.int32)
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="np",
    )["input_ids"]
    # The untruncated tokens, to name what truncation dropped (diffusers logs it too).
    full = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
    special = tokenizer.num_special_tokens_to_add()
    keep = max_length - special
    for i, tokens in enumerate(full):
        if len(tokens) > keep:
            dropped = tokenizer.decode(tokens[keep:])
            warnings.warn(
                f"prompt {i} has {len(tokens) + special} tokens, more than "
                f"max_length={max_length}; truncated, dropping: {dropped!r}",
                UserWarning,
                stacklevel=2,
            )
    return np.asarray(ids, np.int32)
