"""Safetensors files through the `safetensors` library, plus guarded pickle loading.

The library parses and validates the header (it refuses overlapping, duplicate and gapped
offsets, and files not exactly covered by their tensors) and reads tensors lazily, one at a
time, with ``pread`` straight into a new buffer. What we add on top is thin:

* errors as :class:`WeightFileError` naming the file and the tensor. The library's own
  messages name neither ("incomplete metadata, file not fully covered"), so when it refuses a
  file we re-read the header once to say what is wrong (:func:`_explain`);
* float8 tensors, which its numpy bindings cannot name (bfloat16 they can, as
  ``ml_dtypes.bfloat16``, once ml_dtypes is imported);
* atomic writes (temporary file, fsync, rename);
* pickle checkpoints only on an explicit opt-in.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes  # Also registers the "bfloat16" numpy dtype name the library looks up.
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from cn_jax.weights.errors import WeightFileError

__all__ = [
    "PICKLE_SUFFIXES",
    "SAFETENSORS_SUFFIX",
    "SafetensorsFile",
    "load_pickle_checkpoint",
    "read_safetensors",
    "read_weights",
    "write_safetensors",
]

PathLike = str | os.PathLike[str]

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_METADATA_KEY = "__metadata__"
_MAX_HEADER_BYTES = 100_000_000  # The library's limit; a real header is a few hundred KB.

# safetensors dtype names -> numpy dtypes (all stored little-endian).
_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(t)
    for name, t in {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
        "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
        "BOOL": np.bool_, "C64": np.complex64,
        "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
        "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz, "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
    }.items()
}  # fmt: skip
_WRITABLE = {dt.name for dt in _DTYPES.values()}  # The library's writer takes numpy names.


class SafetensorsFile:
    """A safetensors file opened for reading, one tensor at a time.

    The header is read and validated when the file is opened, so a corrupt or truncated file
    fails at once with a :class:`WeightFileError` naming the file, rather than half-way
    through building a model. Tensor data is only read on :meth:`get`, into a new array.

    Example::

        with SafetensorsFile("controlnet.safetensors") as f:
            for key in f.keys():
                params[key] = f.get(key)

    Args:
        path: The file to open.

    Raises:
        WeightFileError: If the file is missing, unreadable, truncated, or its header is not a
            valid safetensors header.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise WeightFileError(f"{self.path} is a directory, not a safetensors file")
        try:
            self._handle = safe_open(self.path, framework="numpy", backend="pread")
        except FileNotFoundError as e:
            raise WeightFileError(f"weight file not found: {self.path}") from e
        except SafetensorError as e:
            why = _explain(self.path) or f"not a valid safetensors file: {e}"
            raise WeightFileError(f"{self.path}: {why}") from e
        except OSError as e:
            raise WeightFileError(f"cannot open weight file {self.path}: {e}") from e
        self.metadata: dict[str, str] = self._handle.metadata() or {}
        self._info = {}  # key -> (safetensors dtype name, shape), in file order
        for key in self._handle.offset_keys():
            view = self._handle.get_slice(key)
            self._info[key] = (view.get_dtype(), tuple(view.get_shape()))
        self._keys = sorted(self._info)

    def keys(self) -> list[str]:
        """Returns the tensor names, sorted."""
        return list(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._info

    def __len__(self) -> int:
        return len(self._info)

    def _lookup(self, key: str) -> tuple[str, tuple[int, ...]]:
        if key not in self._info:
            raise WeightFileError(
                f"{self.path}: no tensor named {key!r} (the file has {len(self)} tensors)"
            )
        return self._info[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """Returns the shape of tensor ``key`` without reading its data.

        Raises:
            WeightFileError: If the file has no tensor ``key``.
        """
        return self._lookup(key)[1]

    def dtype(self, key: str) -> np.dtype:
        """Returns the numpy dtype of tensor ``key`` (ml_dtypes types for BF16 and F8).

        Raises:
            WeightFileError: If the file has no tensor ``key``, or numpy has no such dtype.
        """
        name = self._lookup(key)[0]
        if name not in _DTYPES:
            raise WeightFileError(f"{self.path}: tensor {key!r} has unsupported dtype {name}")
        return _DTYPES[name]

    def get(self, key: str) -> np.ndarray:
        """Reads tensor ``key`` into a new, writable array that outlives the file.

        Raises:
            WeightFileError: If the file has no tensor ``key``, is closed, or cannot be read.
        """
        dtype = self.dtype(key)
        try:
            if self._info[key][0].startswith("F8_"):
                return self._read_float8(key, dtype)
            return self._handle.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise WeightFileError(f"{self.path}: cannot read tensor {key!r}: {e}") from e

    def _read_float8(self, key: str, dtype: np.dtype) -> np.ndarray:
        # The library's numpy bindings look float8 types up in numpy, which has none. It has
        # checked that the tensors tile the data section in offset order, so a tensor's offset
        # is the size of those before it.
        self._handle.metadata()  # Raises if the file was closed.
        begin = 0
        for name, (dtype_name, shape) in self._info.items():
            if name == key:
                break
            begin += math.prod(shape) * _DTYPES[dtype_name].itemsize
        shape = self._info[key][1]
        with open(self.path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            data = np.fromfile(f, dtype, math.prod(shape), offset=header_len + begin)
        return data.reshape(shape)

    def close(self) -> None:
        """Closes the file. Safe to call more than once."""
        self._handle.__exit__(None, None, None)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self)} tensors)"


def _explain(path: Path) -> str | None:
    """Says, naming the tensor, why the library refused ``path``; None if we cannot tell."""
    size = path.stat().st_size
    if size < 8:
        return (
            f"not a safetensors file: it is {size} bytes long, shorter than the 8-byte header "
            "length field (empty or truncated download?)"
        )
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > _MAX_HEADER_BYTES:
            return (
                f"not a safetensors file or corrupt: header length field says {n} bytes, "
                f"above the {_MAX_HEADER_BYTES}-byte limit"
            )
        if 8 + n > size:
            return (
                f"truncated or corrupt: header length field says {n} bytes, but only "
                f"{size - 8} bytes follow it (file size {size} bytes)"
            )
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except ValueError as e:  # Also UnicodeDecodeError.
            return f"corrupt header, not valid UTF-8 JSON: {e}"
    if not isinstance(header, dict):
        return f"corrupt header: expected a JSON object, got {type(header).__name__}"
    meta = header.pop(_METADATA_KEY, {})
    if not isinstance(meta, dict) or not all(isinstance(s, str) for kv in meta.items() for s in kv):
        return f"corrupt header: {_METADATA_KEY!r} must map strings to strings"
    spans = []
    for name, entry in header.items():
        if problem := _entry_problem(entry):
            return f"corrupt header: tensor {name!r} {problem}"
        spans.append((*entry["data_offsets"], name))
    spans.sort()
    end, prev = 0, None
    for begin, stop, name in spans:
        if begin < end:
            return (
                f"corrupt header: tensor {name!r} (bytes {begin}-{stop}) overlaps tensor "
                f"{prev[2]!r} (bytes {prev[0]}-{prev[1]}) in the data section"
            )
        if begin > end:
            return f"corrupt header: bytes {end}-{begin} before tensor {name!r} belong to no tensor"
        end, prev = stop, (begin, stop, name)
    data_size = size - 8 - n
    if end > data_size:
        begin, stop, name = next(s for s in spans if s[1] > data_size)
        return (
            f"file is truncated or corrupt: tensor {name!r} (bytes {begin}-{stop} of the data "
            f"section) extends beyond the end of the file; the header expects a file of "
            f"{8 + n + end} bytes, but it is {size} bytes. Re-download or re-convert it."
        )
    if end < data_size:
        return f"corrupt: {data_size - end} bytes follow the last tensor (file size {size} bytes)"
    return None


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(entry, dict):
        return "is not a JSON object"
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        return f"lacks {', '.join(missing)}"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        return f"has unknown dtype {dtype!r} (supported: {', '.join(_DTYPES)})"
    if not isinstance(shape, list) or not all(map(_is_size, shape)):
        return f"has shape {shape!r}; expected a list of non-negative integers"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_size, offsets)):
        return f"has data_offsets {offsets!r}; expected [begin, end], non-negative integers"
    begin, end = offsets
    if begin > end:
        return f"has data_offsets {offsets!r} with begin > end"
    expected = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != expected:
        return f"spans {end - begin} bytes, but shape {shape} of {dtype} needs {expected} bytes"
    return None


def read_safetensors(path: PathLike, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Reads tensors from a safetensors file.

    Args:
        path: The file to read.
        keys: Names of the tensors to read; all of them if None.

    Returns:
        A dict from name to array, in sorted key order (or the order of ``keys``).

    Raises:
        WeightFileError: If the file is missing or corrupt, or lacks one of ``keys``.
    """
    with SafetensorsFile(path) as f:
        wanted = f.keys() if keys is None else list(keys)
        missing = [k for k in wanted if k not in f]
        if missing:
            shown = ", ".join(repr(k) for k in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise WeightFileError(f"{f.path}: no tensors named {shown}{more}")
        return {k: f.get(k) for k in wanted}


# ---------------------------------------------------------------------------------- writing


def _host_array(key: str, value: Any) -> np.ndarray:
    """A C-contiguous numpy array of ``value`` that the library can write."""
    array = np.asarray(value, order="C")  # Not ascontiguousarray: it makes 0-d arrays 1-d.
    if array.dtype.name not in _WRITABLE:
        raise TypeError(
            f"tensor {key!r} has dtype {array.dtype}, which safetensors cannot store "
            f"(supported: {', '.join(sorted(_WRITABLE))})"
        )
    return array


def write_safetensors(
    path: PathLike,
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes tensors to a safetensors file with the library's writer, atomically.

    The library writes a temporary file in the same folder, which we fsync and then rename
    over ``path`` with ``os.replace``: a crash or error part-way never leaves a half-written
    file under the final name. The layout is the library's (tensors ordered by decreasing
    item size, then name, so each starts aligned to its item size; header padded to 8 bytes).

    Args:
        path: Destination file; its folder must exist.
        tensors: Name -> array. Anything ``np.asarray`` accepts works, e.g. JAX arrays; all
            are copied to host memory before writing. Also accepts ``(name, array)`` pairs.
        metadata: Optional string -> string metadata, stored under ``__metadata__``.

    Raises:
        TypeError: If a key or a metadata entry is not a string, or a tensor's dtype cannot
            be stored (e.g. object or float128).
        WeightFileError: If a key is repeated or is the reserved name ``__metadata__``.
        OSError: If the file cannot be written.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for key, value in tensors.items() if isinstance(tensors, Mapping) else tensors:
        if not isinstance(key, str):
            raise TypeError(f"tensor names must be strings, got {key!r} ({type(key).__name__})")
        if key == _METADATA_KEY:
            raise WeightFileError(f"{path}: {key!r} is reserved for metadata, not a tensor name")
        if key in arrays:
            raise WeightFileError(f"{path}: duplicate tensor name {key!r}")
        arrays[key] = _host_array(key, value)
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(
                f"metadata must map strings to strings, got {k!r}: {v!r} "
                f"({type(k).__name__}: {type(v).__name__})"
            )

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        safetensors.numpy.save_file(
            arrays, tmp, metadata=None if metadata is None else dict(metadata)
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # Makes the rename itself durable.
        with contextlib.suppress(OSError):
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ------------------------------------------------------------------------ pickle checkpoints


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    # numpy cannot represent these torch dtypes, so reinterpret the bits through a same-size
    # integer type and view them as the matching ml_dtypes type; no values are converted.
    special = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        getattr(torch, "float8_e4m3fn", None): (torch.uint8, ml_dtypes.float8_e4m3fn),
        getattr(torch, "float8_e5m2", None): (torch.uint8, ml_dtypes.float8_e5m2),
        getattr(torch, "float8_e4m3fnuz", None): (torch.uint8, ml_dtypes.float8_e4m3fnuz),
        getattr(torch, "float8_e5m2fnuz", None): (torch.uint8, ml_dtypes.float8_e5m2fnuz),
    }
    if tensor.dtype in special:
        int_type, np_type = special[tensor.dtype]
        return tensor.view(int_type).numpy().view(np_type)
    return tensor.numpy()


def load_pickle_checkpoint(path: PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Loads a PyTorch pickle checkpoint (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) as numpy arrays.

    Pickle files can run arbitrary code when loaded, so this refuses them unless the caller
    opts in. Even then it uses ``torch.load(weights_only=True)``, which only unpickles
    tensors and plain containers. A checkpoint holding its weights under ``"state_dict"``
    (Lightning / original Stable Diffusion ``.ckpt`` files) is unwrapped. Entries that are
    not tensors (step counters, config objects, nested dicts) are skipped.

    Args:
        path: The checkpoint file.
        allow_pickle: Must be True to load anything; see above.

    Returns:
        Tensor name -> array; bfloat16 and float8 tensors become ml_dtypes arrays.

    Raises:
        WeightFileError: If pickle loading was not allowed, the file is missing, or
            ``torch.load`` cannot read it.
        ImportError: If PyTorch is not installed.
    """
    path = Path(path)
    if not allow_pickle:
        raise WeightFileError(
            f"{path}: refusing to load a pickle checkpoint. Pickle files can execute arbitrary "
            "code when loaded, so cn_jax refuses them by default. Convert the file to "
            ".safetensors, or, if you trust its source, pass allow_pickle=True to load it "
            "with torch.load(weights_only=True)."
        )
    if not path.is_file():
        raise WeightFileError(f"weight file not found: {path}")
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"loading the pickle checkpoint {path} needs PyTorch, which is not installed: "
            "`pip install torch`, or convert the file to .safetensors"
        ) from e

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # Unpickling, zip and storage errors come in many types.
        raise WeightFileError(
            f"{path}: cannot load the checkpoint with torch.load(weights_only=True): "
            f"{type(e).__name__}: {e}"
        ) from e

    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightFileError(
            f"{path}: expected a state dict (a mapping of names to tensors), got "
            f"{type(obj).__name__}"
        )
    return {
        key: _torch_to_numpy(value)
        for key, value in obj.items()
        if isinstance(key, str) and isinstance(value, torch.Tensor)
    }


def read_weights(path: PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads a weight file, choosing the format by its suffix.

    Args:
        path: A ``.safetensors`` file, or a pickle checkpoint (``.bin``, ``.pt``, ``.pth``,
            ``.ckpt``).
        allow_pickle: Allow loading pickle checkpoints; see :func:`load_pickle_checkpoint`.

    Returns:
        Tensor name -> array.

    Raises:
        WeightFileError: If the file is missing, has an unknown suffix, or cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise WeightFileError(f"weight file not found: {path}")
    if path.is_dir():
        raise WeightFileError(f"{path} is a directory, not a weight file")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return load_pickle_checkpoint(path, allow_pickle=allow_pickle)
    raise WeightFileError(
        f"{path}: unknown weight file suffix {path.suffix!r}; expected {SAFETENSORS_SUFFIX} "
        f"or a PyTorch pickle ({', '.join(PICKLE_SUFFIXES)})"
    )
