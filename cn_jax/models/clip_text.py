"""CLIP text encoders as Stable Diffusion uses them: transformers' `CLIPTextModel`
and `CLIPTextModelWithProjection`, and SDXL's pair of them.

SD 1.x: OpenAI CLIP ViT-L/14 text tower (768 wide, 12 layers, quick_gelu).
SD 2.x: OpenCLIP ViT-H text tower as diffusers stores it in transformers'
`CLIPTextModel` layout (1024 wide, 23 layers, gelu). Same module, two configs.
SDXL (`SDXLTextEncoders`): CLIP ViT-L (`text_encoder`, a `CLIPTextModel`) and
OpenCLIP ViT-bigG (`text_encoder_2`, a `CLIPTextModelWithProjection`: 1280 wide,
32 layers, gelu, plus a bias-free `text_projection`), encoded as diffusers'
`StableDiffusionXLPipeline.encode_prompt` does: the context is both towers'
penultimate hidden states (`hidden_states[-2]`, before the final LayerNorm)
concatenated (768 + 1280 = 2048 wide), the pooled embedding is the second
tower's projected end-of-text state. `encode_text` gives every text encoder's
`(context, pooled)` the same way.

Module names are transformers' attribute names with list indices joined by
`_`, so `cn_jax.weights.keymap` converts weights by its one rule:
`text_model.encoder.layers.3.self_attn.q_proj.weight` <->
`text_model/encoder/layers_3/self_attn/q_proj/kernel`,
`text_model.embeddings.token_embedding.weight` <->
`text_model/embeddings/token_embedding/embedding`, and the projection head of
`CLIPTextModelWithProjection` (outside `text_model`):
`text_projection.weight` <-> `text_projection/kernel`.

Semantics (transformers' `modeling_clip.py`): token + learned position
embeddings (positions 0..L-1), pre-LayerNorm causal self-attention blocks, a
final LayerNorm; the pooled output is the hidden state at the end-of-text token:
the position of the largest id when `eos_token_id == 2` (the legacy value that
SD 1.x/2.x `config.json` files carry: `<|endoftext|>` is CLIP's highest id),
else the first position holding `eos_token_id`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn_jax.models.config import (
    CHANNELS,
    LAYERS,
    POSITIVE,
    Bound,
    check_fields,
    strict_config,
)
from cn_jax.models.layers import Dtype
from cn_jax.models.presets import preset

HIDDEN_ACTS = ("quick_gelu", "gelu")
MAX_VOCAB = 1 << 22  # tokens; CLIP's is 49408
MAX_POSITIONS = 65536  # tokens per prompt; CLIP's is 77
# transformers >= 5 saves and names CLIPTextModel weights without the
# `text_model.` prefix; diffusers folders and older transformers use it. Our
# tree (and so `keymap`) uses the prefixed names; see `canonical_torch_state`.
TORCH_PREFIX = "text_model."
# `CLIPTextModelWithProjection`'s weights outside `text_model` (every version names them so).
TORCH_TOP_LEVEL = ("text_projection.",)
# Buffers that some state dicts carry but that are not weights (drop on load).
IGNORED_TORCH_KEYS = ("text_model.embeddings.position_ids",)

# Generic `PretrainedConfig` fields that transformers writes into every
# config.json (and the `dropout` of older CLIPTextConfig files, which CLIP's
# text model never used). None of them changes the computation: ignored on read.
_IGNORED_FIELDS = frozenset(
    {
        "transformers_version", "dtype", "torch_dtype", "use_bfloat16", "torchscript",
        "output_hidden_states", "output_attentions", "return_dict", "output_scores",
        "return_dict_in_generate", "use_cache", "gradient_checkpointing", "tf_legacy_loss",
        "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
        "cross_attention_hidden_size", "tie_encoder_decoder", "tie_word_embeddings",
        "id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
        "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
        "task_specific_params", "max_length", "min_length", "do_sample", "early_stopping",
        "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
        "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        "dropout",
    }
)  # fmt: skip
# Fields accepted only at one value: anything else describes another model. The
# config's class adds `architectures`: its own transformers class, or none.
_FIXED_FIELDS: dict[str, tuple[Any, ...]] = {
    "model_type": ("clip_text_model",),
    "pruned_heads": ({},),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' `CLIPTextConfig` fields, with transformers' defaults.

    `sd15()` / `sd2()` give the text encoders of SD 1.x / SD 2.x. A `config.json`
    naming `architectures: ["CLIPTextModelWithProjection"]` (SDXL's `text_encoder_2`)
    is read by `CLIPTextWithProjectionConfig`.
    """

    class_name: ClassVar[str] = "CLIPTextModel"
    model_type: ClassVar[str] = "clip_text_model"

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512  # text_projection width; unused by CLIPTextModel
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0  # training only; the frozen encoder never drops
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407

    # The range of every numeric field (`check_fields`). Token ids are only >= 0: tiny test
    # vocabularies keep the default ids of the real one.
    bounds: ClassVar[Mapping[str, Bound]] = {
        "vocab_size": Bound(ge=1, le=MAX_VOCAB),
        "hidden_size": CHANNELS,
        "intermediate_size": Bound(ge=1, le=4 * CHANNELS.le),
        "projection_dim": CHANNELS,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": CHANNELS,
        "max_position_embeddings": Bound(ge=1, le=MAX_POSITIONS),
        "layer_norm_eps": POSITIVE,
        "attention_dropout": Bound(ge=0, lt=1),
        "initializer_range": Bound(ge=0),
        "initializer_factor": Bound(ge=0),
        "pad_token_id": Bound(ge=0),
        "bos_token_id": Bound(ge=0),
        "eos_token_id": Bound(ge=0),
    }

    def __post_init__(self):
        if self.initializer_factor is None:
            object.__setattr__(self, "initializer_factor", 1.0)
        check_fields(self, self.bounds)
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(
                f"config field hidden_act={self.hidden_act!r}: supported values are {HIDDEN_ACTS}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"config: hidden_size {self.hidden_size} not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def sd15(cls) -> CLIPTextConfig:
        """SD 1.x `text_encoder/config.json` (OpenAI CLIP ViT-L/14; `presets.py`)."""
        return cls.from_dict(preset("sd15")["text_encoder"], "preset sd15")

    @classmethod
    def sd2(cls) -> CLIPTextConfig:
        """SD 2.x `text_encoder/config.json` (OpenCLIP ViT-H, its last layer dropped)."""
        return cls.from_dict(preset("sd21")["text_encoder"], "preset sd21")

    # -- (de)serialisation ---------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> CLIPTextConfig:
        """Build from a transformers `config.json` dict (or `CLIPTextConfig.to_dict()`).

        Generic transformers fields (`_IGNORED_FIELDS`, and keys starting with
        `_`) are ignored; a field this model does not know, or a known one set
        to a value cn_jax does not implement, is a ValueError naming it.

        Args:
          data: the parsed JSON.
          source: where it came from, for error messages (e.g. the file path).
        """
        fixed = dict(_FIXED_FIELDS, architectures=(None, (cls.class_name,)))
        return strict_config(cls, data, source, fixed, _IGNORED_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        """A dict transformers' `CLIPTextConfig` / `CLIPTextModel.from_pretrained` loads."""
        out: dict[str, Any] = {"architectures": [self.class_name], "model_type": self.model_type}
        out.update(dataclasses.asdict(self))
        return out


@dataclasses.dataclass(frozen=True)
class CLIPTextWithProjectionConfig(CLIPTextConfig):
    """`CLIPTextConfig` of a `CLIPTextModelWithProjection` (`architectures` names that
    class; the fields are the same, `projection_dim` the projection's width).

    SDXL's `text_encoder_2/config.json` (OpenCLIP ViT-bigG): gelu, hidden_size 1280,
    intermediate_size 5120, 20 heads, 32 layers, projection_dim 1280, the legacy
    eos_token_id 2.
    """

    class_name: ClassVar[str] = "CLIPTextModelWithProjection"


# -- modules ------------------------------------------------------------------


def _dense(features: int, std: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
    # transformers' CLIP init: normal weights with a per-layer std, zero biases.
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(std),
        name=name,
    )


def _layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name
    )


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return nn.gelu(x, approximate=False)  # torch's default (erf) gelu


class CLIPTextEmbeddings(nn.Module):
    """`token_embedding(ids) + position_embedding(0..L-1)`."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(0.02 * cfg.initializer_factor)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, embedding_init=init)
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, **kw, name="token_embedding")
        positions = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, **kw, name="position_embedding"
        )
        seq = input_ids.shape[-1]
        return tokens(input_ids) + positions(jnp.arange(seq, dtype=jnp.int32))[None]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: q_proj/k_proj/v_proj/out_proj, all with bias."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        d, p = self.dtype, self.param_dtype
        width, heads, head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        f = cfg.initializer_factor
        in_std = width**-0.5 * (2 * cfg.num_hidden_layers) ** -0.5 * f
        b, n, _ = x.shape
        q, k, v = (
            _dense(width, in_std, d, p, name)(x).reshape(b, n, heads, head_dim)
            for name in ("q_proj", "k_proj", "v_proj")
        )
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=head_dim**-0.5, is_causal=True)
        return _dense(width, width**-0.5 * f, d, p, "out_proj")(out.reshape(b, n, width).astype(d))


class CLIPMLP(nn.Module):
    """fc1 -> quick_gelu / gelu -> fc2."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        d, p, f = self.dtype, self.param_dtype, cfg.initializer_factor
        h = _dense(cfg.intermediate_size, (2 * cfg.hidden_size) ** -0.5 * f, d, p, "fc1")(x)
        h = _activation(cfg.hidden_act, h)
        out_std = cfg.hidden_size**-0.5 * (2 * cfg.num_hidden_layers) ** -0.5 * f
        return _dense(cfg.hidden_size, out_std, d, p, "fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        cfg, d, p = self.config, self.dtype, self.param_dtype
        h = _layer_norm(cfg.layer_norm_eps, d, p, "layer_norm1")(x)
        x = x + CLIPAttention(cfg, d, p, name="self_attn")(h, mask)
        h = _layer_norm(cfg.layer_norm_eps, d, p, "layer_norm2")(x)
        return x + CLIPMLP(cfg, d, p, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """`layers_0 .. layers_{num_hidden_layers-1}`.

    Returns the last layer's output and the penultimate hidden state (the last
    layer's input: transformers' `hidden_states[-2]`, the embeddings for a
    one-layer encoder).
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        penultimate = x
        for i in range(self.config.num_hidden_layers):
            penultimate = x
            x = CLIPEncoderLayer(self.config, self.dtype, self.param_dtype, name=f"layers_{i}")(
                x, mask
            )
        return x, penultimate


class CLIPTextOutputs(NamedTuple):
    """Everything a CLIP text tower computes that Stable Diffusion reads."""

    last_hidden_state: jax.Array  # (B, L, hidden) after the final LayerNorm: SD 1.x/2.x context
    pooler_output: jax.Array  # (B, hidden): the end-of-text token's last_hidden_state
    penultimate_hidden_state: jax.Array  # (B, L, hidden): hidden_states[-2], no LayerNorm (SDXL)


class CLIPTextProjectionOutputs(NamedTuple):
    """`CLIPTextModelWithProjection`'s outputs; `[0]` is `text_embeds`, as in transformers."""

    text_embeds: jax.Array  # (B, projection_dim): text_projection(pooler_output), SDXL's pooled
    last_hidden_state: jax.Array  # (B, L, hidden) after the final LayerNorm
    penultimate_hidden_state: jax.Array  # (B, L, hidden): hidden_states[-2] (SDXL's context)


class CLIPTextTransformer(nn.Module):
    """embeddings -> encoder -> final_layer_norm, plus the end-of-text pooling."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> CLIPTextOutputs:
        cfg, d, p = self.config, self.dtype, self.param_dtype
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {attention_mask.shape} != input_ids shape "
                    f"{input_ids.shape}"
                )
            mask = attention_mask.astype(jnp.bool_)[:, None, None, :]  # (B, 1 head, 1 query, L)
        h = CLIPTextEmbeddings(cfg, d, p, name="embeddings")(input_ids)
        h, penultimate = CLIPEncoder(cfg, d, p, name="encoder")(h, mask)
        last = _layer_norm(cfg.layer_norm_eps, d, p, "final_layer_norm")(h)
        if cfg.eos_token_id == 2:
            # Legacy configs (before transformers PR #24773): eos is the highest id.
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return CLIPTextOutputs(last, pooled, penultimate)


def example_inputs(config: CLIPTextConfig, batch: int = 1):
    """Inputs for `CLIPTextModel.init` / `eval_shape` (and `CLIPTextModelWithProjection`'s):
    (input_ids,)."""
    return (jnp.zeros((batch, config.max_position_embeddings), jnp.int32),)


def _checked_ids(input_ids: Any, config: CLIPTextConfig) -> jax.Array:
    """`input_ids` as an integer (batch, length) array no longer than the positions."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(
            f"input_ids must be an integer array (batch, length), got {input_ids.dtype} "
            f"{input_ids.shape}"
        )
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"input_ids length {input_ids.shape[1]} > max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    return input_ids


class _OneTokenizer:
    """What callers ask of a text tower read through one tokenizer."""

    @property
    def max_length(self) -> int:
        """The longest `input_ids` (tokens per prompt) the model takes."""
        return self.config.max_position_embeddings

    @nn.nowrap
    def example_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """Inputs for `init` / `eval_shape`: (input_ids,)."""
        return example_inputs(self.config, batch)


class CLIPTextModel(_OneTokenizer, nn.Module):
    """transformers' `CLIPTextModel`: `(input_ids, attention_mask=None) -> (last, pooled)`.

    Call: `model.apply({"params": p}, input_ids)`; `model.apply({"params": p},
    input_ids, method="outputs")` also gives the penultimate hidden state
    (`CLIPTextOutputs`).

    Args (of `__call__`):
      input_ids: int (B, L) token ids, L <= max_position_embeddings (SD: 77,
        padded as `cn_jax.tokenizer.tokenize` pads). An id >= vocab_size gives NaN.
      attention_mask: optional (B, L), 1 for tokens to attend to, 0 for padding,
        on top of the causal mask. Stable Diffusion passes none (its text
        encoders attend to the padding); rows of queries with nothing to attend
        to (left padding) are undefined.

    Returns:
      last_hidden_state (B, L, hidden_size) after the final LayerNorm (SD's
      text context), and pooled_output (B, hidden_size): the end-of-text token's
      state. Both in `dtype`.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        out = self.outputs(input_ids, attention_mask)
        return out.last_hidden_state, out.pooler_output

    @nn.compact
    def outputs(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> CLIPTextOutputs:
        """`__call__`'s inputs -> `CLIPTextOutputs` (last, pooled and penultimate states)."""
        input_ids = _checked_ids(input_ids, self.config)
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
        return CLIPTextTransformer(self.config, self.dtype, self.param_dtype, name="text_model")(
            input_ids, attention_mask
        )


class CLIPTextModelWithProjection(_OneTokenizer, nn.Module):
    """transformers' `CLIPTextModelWithProjection`: the text tower plus a bias-free
    `text_projection` (hidden_size -> projection_dim) of the pooled output.

    Params: `text_model/...` (as `CLIPTextModel`'s) and `text_projection/kernel`.

    Args (of `__call__`): as `CLIPTextModel`'s.

    Returns:
      `CLIPTextProjectionOutputs(text_embeds, last_hidden_state,
      penultimate_hidden_state)`, all in `dtype`: `text_embeds` (B, projection_dim)
      is transformers' `text_embeds` (`[0]`, SDXL's pooled prompt embedding),
      `penultimate_hidden_state` its `hidden_states[-2]`.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> CLIPTextProjectionOutputs:
        cfg = self.config
        if cfg.projection_dim is None:
            raise ValueError("CLIPTextModelWithProjection needs config.projection_dim, got None")
        input_ids = _checked_ids(input_ids, cfg)
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
        out = CLIPTextTransformer(cfg, self.dtype, self.param_dtype, name="text_model")(
            input_ids, attention_mask
        )
        projection = nn.Dense(
            cfg.projection_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(cfg.hidden_size**-0.5 * cfg.initializer_factor),
            name="text_projection",
        )
        return CLIPTextProjectionOutputs(
            projection(out.pooler_output), out.last_hidden_state, out.penultimate_hidden_state
        )


class SDXLTextEncoders(nn.Module):
    """SDXL's two text encoders as one module, computing diffusers'
    `StableDiffusionXLPipeline.encode_prompt` (with `clip_skip=None`).

    Params: `{"text_encoder": <CLIPTextModel tree>, "text_encoder_2":
    <CLIPTextModelWithProjection tree>}`, so each half converts by `keymap` from its
    diffusers folder (`text_encoder/`, `text_encoder_2/`) on its own.

    Args (of `__call__`):
      input_ids: int (B, 2, L): row 0 the first tokenizer's ids (CLIP ViT-L's,
        padded with `<|endoftext|>`), row 1 the second's (OpenCLIP's, padded with
        `!`), L <= `max_length` (77).

    Returns:
      context (B, L, hidden + hidden_2): the penultimate hidden states
      (`hidden_states[-2]`) of both encoders concatenated (SDXL: 768 + 1280 = 2048),
      and pooled (B, projection_dim_2): `text_encoder_2`'s `text_embeds` (SDXL: 1280).
      Both in `dtype`.
    """

    config: CLIPTextConfig  # text_encoder: CLIP ViT-L (no projection)
    config_2: CLIPTextConfig  # text_encoder_2: OpenCLIP ViT-bigG, with projection_dim
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        input_ids = jnp.asarray(input_ids)
        if (
            input_ids.ndim != 3
            or input_ids.shape[1] != 2
            or not jnp.issubdtype(input_ids.dtype, jnp.integer)
        ):
            raise ValueError(
                "SDXL input_ids must be an integer array (batch, 2, length) (row 0: the first "
                f"tokenizer's ids, row 1: the second's), got {input_ids.dtype} {input_ids.shape}"
            )
        if input_ids.shape[2] > self.max_length:
            raise ValueError(
                f"SDXL input_ids length {input_ids.shape[2]} > max_length {self.max_length} "
                "(max_position_embeddings of the two text encoders)"
            )
        d, p = self.dtype, self.param_dtype
        first = CLIPTextModel(self.config, d, p, name="text_encoder").outputs(input_ids[:, 0])
        second = CLIPTextModelWithProjection(self.config_2, d, p, name="text_encoder_2")(
            input_ids[:, 1]
        )
        context = jnp.concatenate(
            [first.penultimate_hidden_state, second.penultimate_hidden_state], axis=-1
        )
        return context, second.text_embeds

    @property
    def max_length(self) -> int:
        """The longest ids (tokens per prompt) both encoders take (SDXL: 77)."""
        return min(self.config.max_position_embeddings, self.config_2.max_position_embeddings)

    @property
    def context_dim(self) -> int:
        """Width of the context (the UNet's `cross_attention_dim`; SDXL: 2048)."""
        return self.config.hidden_size + self.config_2.hidden_size

    @nn.nowrap
    def example_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """Inputs for `init` / `eval_shape`: (input_ids (batch, 2, max_length),)."""
        return (jnp.zeros((batch, 2, self.max_length), jnp.int32),)


TextEncoder = CLIPTextModel | CLIPTextModelWithProjection | SDXLTextEncoders


def encode_text(
    text_encoder: TextEncoder, params: Any, input_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`(context, pooled)` of any Stable Diffusion text encoder, as its pipeline reads them.

    - `CLIPTextModel` (SD 1.x/2.x): `input_ids` (B, L) -> (last_hidden_state, pooled).
    - `SDXLTextEncoders` (SDXL): `input_ids` (B, 2, L) -> both penultimate states
      concatenated, and `text_encoder_2`'s projected pooled output.
    - `CLIPTextModelWithProjection` alone (SDXL refiner, which has only
      `text_encoder_2`): `input_ids` (B, L) -> (its penultimate state, text_embeds).

    Args:
      text_encoder: the module.
      params: its parameter tree (what `apply` takes under `"params"`).
      input_ids: the token ids, shaped as the module takes them.
    """
    variables = {"params": params}
    if isinstance(text_encoder, SDXLTextEncoders | CLIPTextModel):
        return tuple(text_encoder.apply(variables, input_ids))
    if isinstance(text_encoder, CLIPTextModelWithProjection):
        out = text_encoder.apply(variables, input_ids)
        return out.penultimate_hidden_state, out.text_embeds
    raise TypeError(
        "encode_text takes a CLIPTextModel, CLIPTextModelWithProjection or SDXLTextEncoders, "
        f"got {type(text_encoder).__name__}"
    )


def canonical_torch_state(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A transformers `CLIPTextModel` (or `CLIPTextModelWithProjection`) state dict
    under the names `keymap` expects.

    Adds the `text_model.` prefix that transformers >= 5 leaves out when it
    saves a `CLIPTextModel` (diffusers folders and older transformers have it),
    keeps `text_projection.weight` (`TORCH_TOP_LEVEL`, outside `text_model` in
    every version) as it is, and drops `IGNORED_TORCH_KEYS`. A lazy view: a
    value is read from `state` only when looked up, so a streaming reader stays
    streaming.
    """
    return _PrefixedState(state)


class _PrefixedState(Mapping):
    def __init__(self, state: Mapping[str, Any]):
        self._state = state
        self._names = {}
        for key in state:
            kept = key.startswith((TORCH_PREFIX, *TORCH_TOP_LEVEL))
            name = key if kept else TORCH_PREFIX + key
            if name not in IGNORED_TORCH_KEYS:
                self._names[name] = key

    def __getitem__(self, name: str) -> Any:
        return self._state[self._names[name]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
