"""An offline CLIP-style BPE tokenizer for tests (nothing is downloaded).

`build_tiny_clip_tokenizer(folder)` trains byte-level BPE merges with the
`tokenizers` library on a few dozen synthetic prompts ("red circle with navy blue
background", colours x shapes), then lays the vocabulary out exactly as CLIP's
`SimpleTokenizer` does:

    256 byte symbols, the same 256 with `</w>`, one token per merge, then
    `<|startoftext|>`, `<|endoftext|>` (the two highest ids, as in CLIP's 49406/49407)

and writes `vocab.json` + `merges.txt` (CLIP's `#version: 0.2` header) before
loading the folder with `transformers.CLIPTokenizer.from_pretrained` and
`save_pretrained`-ing it back, so the folder looks like a diffusers pipeline's
`tokenizer/`. About 600 tokens.
"""

from __future__ import annotations

import itertools
import json
import os

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
COLOURS = ("red", "green", "blue", "navy blue", "yellow", "orange", "purple", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "ring")
BACKGROUNDS = ("navy blue", "black", "white", "light gray", "dark green")
NUM_MERGES = 80
# CLIP's own pre-tokenizer split (transformers' CLIPTokenizer uses the same regex).
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)


def tiny_prompts() -> list[str]:
    """The training corpus (fill50k-style captions)."""
    out = []
    for i, (colour, shape) in enumerate(itertools.product(COLOURS, SHAPES)):
        background = BACKGROUNDS[i % len(BACKGROUNDS)]
        if background == colour:
            background = BACKGROUNDS[(i + 1) % len(BACKGROUNDS)]
        out.append(f"{colour} {shape} with {background} background")
    out += ["a photo of a cat", "a drawing of a dog, 4k, best quality!"]
    return out


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's `bytes_to_unicode` table, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _train_merges(prompts: list[str]) -> list[tuple[str, str]]:
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    base = len(_byte_symbols()) * 2
    trainer = trainers.BpeTrainer(
        vocab_size=base + NUM_MERGES,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
    )
    tok.train_from_iterator(prompts, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return pairs[:NUM_MERGES]


def build_tiny_clip_tokenizer(
    folder: str | os.PathLike, pad_token: str = EOS, model_max_length: int = 77
) -> CLIPTokenizer:
    """Write a tiny CLIP tokenizer to `folder` (created) and return it loaded from there.

    Args:
      folder: the `tokenizer/` folder to write.
      pad_token: SD 1.x pads with `<|endoftext|>` (the default); SD 2.x with "!"
        (id 0 in CLIP's vocabulary, and here too).
      model_max_length: written to tokenizer_config.json (SD: 77).
    """
    os.makedirs(folder, exist_ok=True)
    symbols = _byte_symbols()
    merges = _train_merges(tiny_prompts())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += [BOS, EOS]
    vocab = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(
        folder, pad_token=pad_token, model_max_length=model_max_length
    )
    tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)
