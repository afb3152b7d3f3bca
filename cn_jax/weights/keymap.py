"""Flax parameter trees <-> PyTorch (diffusers-named) state dicts.

One documented rule, applied to the target tree from `jax.eval_shape`:

- a Flax path component `name_N` is the PyTorch pair `name.N` (list index),
  except the literal diffusers names in `LITERAL_NAMES` (`linear_1`, `linear_2`);
- leaf `kernel` is `weight`: 4-D conv kernels HWIO <-> OIHW, 2-D dense kernels
  transposed; leaves `scale` (a norm's gain) and `embedding` (an `nn.Embed`
  table) are `weight` as they are; `bias` is `bias`.

So `down_blocks.0.resnets.1.conv1.weight` <-> `down_blocks_0/resnets_1/conv1/kernel`.
Conversion checks every key against the target tree and raises one error
listing every missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cn_jax.weights.errors import WeightFileError

# diffusers attribute names that end in _<digit> but are not list indices.
LITERAL_NAMES = frozenset({"linear_1", "linear_2"})
_INDEXED = re.compile(r"^(.*)_(\d+)$")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_key(path: tuple[str, ...]) -> str:
    """PyTorch key of a Flax parameter path, e.g. ('conv_in', 'kernel') -> 'conv_in.weight'."""
    parts = []
    for comp in path[:-1]:
        m = _INDEXED.match(comp)
        if m and comp not in LITERAL_NAMES:
            parts += [m.group(1), m.group(2)]
        else:
            parts.append(comp)
    leaf = path[-1]
    if leaf not in _LEAF_TO_TORCH:
        raise ValueError(f"no PyTorch name for Flax leaf {'/'.join(path)}")
    parts.append(_LEAF_TO_TORCH[leaf])
    return ".".join(parts)


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW
    if leaf == "kernel" and value.ndim == 2:
        return np.transpose(value)  # (in, out) -> (out, in)
    return value


def to_flax_layout(leaf: str, value: np.ndarray, ndim: int) -> np.ndarray:
    if leaf == "kernel" and ndim == 4 and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    if leaf == "kernel" and ndim == 2 and value.ndim == 2:
        return np.transpose(value)
    return value


def _paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    return [
        (tuple(str(getattr(k, "key", k)) for k in path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]


def flax_to_torch(params: Any) -> dict[str, np.ndarray]:
    """PyTorch-layout state dict (numpy arrays) of a Flax `params` tree."""
    out = {}
    for path, value in _paths(params):
        out[torch_key(path)] = np.ascontiguousarray(to_torch_layout(path[-1], np.asarray(value)))
    return out


def torch_to_flax(
    state: Mapping[str, Any], abstract: Any, source: str = "weights", cast: bool = True
) -> dict:
    """Build a Flax `params` tree shaped like `abstract` from a PyTorch state dict.

    Args:
      state: PyTorch key -> array (numpy, or anything `np.asarray` takes).
      abstract: the target tree (e.g. `jax.eval_shape(model.init, ...)["params"]`):
        gives every expected path, shape and dtype.
      source: what `state` came from (a file path), for the error message.
      cast: cast each array to the target leaf's dtype.

    Raises:
      WeightFileError: one message listing every missing, unexpected and
        mis-shaped key, and every integer or bool tensor where the model has a
        float weight (it would load as values up to 1e9).
    """
    missing, mis_shaped, mis_typed, used = [], [], [], set()
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for path, spec in _paths(abstract):
        key = torch_key(path)
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        value = to_flax_layout(path[-1], np.asarray(state[key]), len(spec.shape))
        if tuple(value.shape) != tuple(spec.shape):
            torch_shape = tuple(np.shape(state[key]))
            want = tuple(to_torch_layout(path[-1], np.empty(spec.shape, np.bool_)).shape)
            mis_shaped.append(f"{key}: file has {torch_shape}, model expects {want}")
            continue
        if jnp.issubdtype(spec.dtype, jnp.floating) and not jnp.issubdtype(
            value.dtype, jnp.floating
        ):  # an integer weight would load as huge floats
            mis_typed.append(f"{key}: file has {value.dtype}, model expects a float")
            continue
        # One tensor at a time onto the device, waiting for each transfer:
        # async transfers would keep every host copy alive until they ran,
        # i.e. a second full copy of the weights in host memory.
        array = jnp.asarray(value, dtype=spec.dtype if cast else value.dtype)
        flat[path] = array.block_until_ready()
        del value
    unexpected = sorted(set(state) - used)
    if missing or unexpected or mis_shaped or mis_typed:
        lines = [f"{source} does not match the model:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped keys", mis_shaped),
            ("keys of a non-float dtype", mis_typed),
        ):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {k}" for k in items]
        raise WeightFileError("\n".join(lines))
    return _unflatten(flat)


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for comp in path[:-1]:
            node = node.setdefault(comp, {})
        node[path[-1]] = value
    return tree
