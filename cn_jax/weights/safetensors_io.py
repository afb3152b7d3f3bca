"""A small, streaming reader and writer for the safetensors format, plus guarded pickle loading.

The safetensors layout is::

    [8 bytes]  N, the header length, unsigned little-endian
    [N bytes]  UTF-8 JSON object: {name: {"dtype": str, "shape": [int, ...],
                                          "data_offsets": [begin, end]}, ...}
               with an optional "__metadata__": {str: str} entry
    [rest]     the raw little-endian tensor bytes; offsets are relative to the start of this
               section

We implement it ourselves instead of using ``safetensors.numpy`` because:

* ``safetensors.numpy.load_file`` first reads the whole file into ``bytes`` and then builds
  the arrays, which holds two full copies of a multi-GB checkpoint in memory at once. Here each
  tensor is read straight from disk into its own freshly allocated array (``readinto``), so
  loading never holds more than the result plus the tensor being read.
* numpy has no bfloat16; ``ml_dtypes.bfloat16`` (shipped with JAX) fills that gap, and the
  reference numpy bindings do not know it.
* A truncated download or a corrupt header should say so, naming the file and the tensor,
  instead of surfacing as a low-level Rust or numpy error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import ml_dtypes
import numpy as np

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

# The reserved header entry holding free-form string metadata.
_METADATA_KEY = "__metadata__"

# The reference implementation refuses headers above 100 MB. We do the same: a real header is
# a few hundred KB even for the largest checkpoints, so a bigger value means the first 8 bytes
# are garbage (e.g. an HTML error page saved under a .safetensors name), and we must not try
# to allocate and parse gigabytes of it.
_MAX_HEADER_BYTES = 100_000_000

# safetensors dtype strings <-> numpy dtypes. All are stored little-endian. The float8 types
# have no numpy equivalent, so, like bfloat16, they come from ml_dtypes.
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
}
# Keyed by the native-byte-order dtype, so big-endian input arrays are recognised too.
_DTYPE_NAMES: dict[np.dtype, str] = {dt: name for name, dt in _DTYPES.items()}

_LITTLE_ENDIAN_HOST = sys.byteorder == "little"

# Read at most this many bytes per system call, so a multi-GB tensor does not hit platform
# limits on a single read (macOS rejects reads above 2 GiB).
_READ_CHUNK = 1 << 30


def _supported_dtypes() -> str:
    return ", ".join(_DTYPES)


def _byte_view(array: np.ndarray) -> memoryview:
    """Returns a flat, writable-if-possible byte view of a C-contiguous array.

    Going through ``uint8`` is needed because the buffer protocol cannot describe ml_dtypes
    types (bfloat16, float8), so ``memoryview(array)`` fails for them.
    """
    return memoryview(array.reshape(-1).view(np.uint8))


def _check_int(value: Any) -> bool:
    # bool is a subclass of int, but `true` in a shape is certainly corruption.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _TensorInfo:
    """One validated header entry."""

    __slots__ = ("begin", "dtype", "end", "name", "shape")

    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...], begin: int, end: int):
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.begin = begin
        self.end = end


class SafetensorsFile:
    """A safetensors file opened for reading, one tensor at a time.

    The header is read and fully validated when the file is opened, so a corrupt or truncated
    file fails immediately with a :class:`WeightFileError` that names the file, rather than
    half-way through building a model. Tensor data is only read on :meth:`get`, straight into
    a new array, so reading a large checkpoint tensor by tensor never needs a second copy of
    it in memory.

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
        self._lock = threading.Lock()  # get() seeks and reads on one shared handle.
        try:
            self._file: IO[bytes] | None = open(self.path, "rb")  # Closed by close().
        except FileNotFoundError as e:
            raise WeightFileError(f"weight file not found: {self.path}") from e
        except IsADirectoryError as e:
            raise WeightFileError(f"{self.path} is a directory, not a safetensors file") from e
        except OSError as e:
            raise WeightFileError(f"cannot open weight file {self.path}: {e}") from e
        try:
            self._parse_header()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- header parsing

    def _error(self, message: str) -> WeightFileError:
        return WeightFileError(f"{self.path}: {message}")

    def _parse_header(self) -> None:
        assert self._file is not None
        file_size = os.fstat(self._file.fileno()).st_size
        self._file_size = file_size
        if file_size < 8:
            raise self._error(
                f"not a safetensors file: it is {file_size} bytes long, shorter than the "
                "8-byte header length field (empty or truncated download?)"
            )
        header_len = int.from_bytes(self._file.read(8), "little")
        if header_len > _MAX_HEADER_BYTES:
            raise self._error(
                f"not a safetensors file or corrupt: header length field says {header_len} "
                f"bytes, above the {_MAX_HEADER_BYTES}-byte limit"
            )
        if 8 + header_len > file_size:
            raise self._error(
                f"truncated or corrupt: header length field says {header_len} bytes, but only "
                f"{file_size - 8} bytes follow it (file size {file_size} bytes)"
            )
        raw = self._file.read(header_len)
        if len(raw) != header_len:  # The file shrank after fstat.
            raise self._error(f"truncated: could not read the {header_len}-byte header")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._error(f"corrupt header, not valid UTF-8 JSON: {e}") from e
        if not isinstance(header, dict):
            raise self._error(
                f"corrupt header: expected a JSON object, got {type(header).__name__}"
            )

        self._data_start = 8 + header_len
        self.metadata: dict[str, str] = self._parse_metadata(header.pop(_METADATA_KEY, None))
        tensors: dict[str, _TensorInfo] = {}
        for name, entry in header.items():
            tensors[name] = self._parse_entry(name, entry)
        self._tensors = tensors
        self._keys = sorted(tensors)
        self._check_within_file()

    def _parse_metadata(self, metadata: Any) -> dict[str, str]:
        if metadata is None:
            return {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._error(f"corrupt header: {_METADATA_KEY!r} must map strings to strings")
        return metadata

    def _parse_entry(self, name: str, entry: Any) -> _TensorInfo:
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise self._error(f"corrupt header: {where} is not a JSON object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise self._error(f"corrupt header: {where} lacks {', '.join(missing)}")

        dtype_name = entry["dtype"]
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise self._error(
                f"{where} has unknown dtype {dtype_name!r} (supported: {_supported_dtypes()})"
            )
        dtype = _DTYPES[dtype_name]

        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_check_int(d) for d in shape):
            raise self._error(
                f"corrupt header: {where} has shape {shape!r}; expected a list of "
                "non-negative integers"
            )

        offsets = entry["data_offsets"]
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise self._error(
                f"corrupt header: {where} has data_offsets {offsets!r}; expected [begin, end]"
            )
        begin, end = offsets
        if not (_check_int(begin) and _check_int(end)):
            raise self._error(
                f"corrupt header: {where} has data_offsets {offsets!r}; expected non-negative "
                "integers"
            )
        if begin > end:
            raise self._error(
                f"corrupt header: {where} has data_offsets {offsets!r} with begin > end"
            )
        # Python ints: no overflow however large the claimed shape.
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise self._error(
                f"corrupt header: {where} spans {end - begin} bytes, but shape {shape} of "
                f"{dtype_name} needs {expected} bytes"
            )
        return _TensorInfo(name, dtype, tuple(shape), begin, end)

    def _check_within_file(self) -> None:
        # Checked once for all tensors at open time, so a truncated download is reported
        # before any work is done, naming the first tensor (in file order) that is cut off.
        data_size = self._file_size - self._data_start
        beyond = [t for t in self._tensors.values() if t.end > data_size]
        if not beyond:
            return
        first = min(beyond, key=lambda t: (t.begin, t.name))
        needed = self._data_start + max(t.end for t in self._tensors.values())
        raise self._error(
            f"file is truncated or corrupt: tensor {first.name!r} (bytes {first.begin}-"
            f"{first.end} of the data section) extends beyond the end of the file; the header "
            f"expects a file of at least {needed} bytes, but it is {self._file_size} bytes "
            f"({len(beyond)} of {len(self._tensors)} tensors affected). Re-download or "
            "re-convert it."
        )

    # ------------------------------------------------------------------ public API

    def keys(self) -> list[str]:
        """Returns the tensor names, sorted."""
        return list(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def _info(self, key: str) -> _TensorInfo:
        try:
            return self._tensors[key]
        except KeyError:
            count = len(self._tensors)
            raise WeightFileError(
                f"{self.path}: no tensor named {key!r} (the file has {count} tensors)"
            ) from None

    def shape(self, key: str) -> tuple[int, ...]:
        """Returns the shape of tensor ``key`` without reading its data.

        Raises:
            WeightFileError: If the file has no tensor ``key``.
        """
        return self._info(key).shape

    def dtype(self, key: str) -> np.dtype:
        """Returns the numpy dtype of tensor ``key`` (ml_dtypes types for BF16 and F8).

        Raises:
            WeightFileError: If the file has no tensor ``key``.
        """
        return self._info(key).dtype

    def get(self, key: str) -> np.ndarray:
        """Reads tensor ``key`` into a new array.

        The array owns its memory (it is not a view of the file or of a shared buffer), so it
        can be modified and outlives the file.

        Raises:
            WeightFileError: If the file has no tensor ``key``, is closed, or was truncated
                after it was opened.
        """
        info = self._info(key)
        out = np.empty(info.shape, dtype=info.dtype)
        if out.nbytes:
            self._read_into(info, _byte_view(out))
        if not _LITTLE_ENDIAN_HOST:  # The file is little-endian; return native arrays.
            out.byteswap(inplace=True)
        return out

    def _read_into(self, info: _TensorInfo, buffer: memoryview) -> None:
        with self._lock:
            if self._file is None:
                raise WeightFileError(f"{self.path}: cannot read {info.name!r}, file is closed")
            self._file.seek(self._data_start + info.begin)
            done, total = 0, len(buffer)
            while done < total:
                n = self._file.readinto(buffer[done : min(total, done + _READ_CHUNK)])
                if not n:
                    raise WeightFileError(
                        f"{self.path}: file is truncated: reading tensor {info.name!r} hit the "
                        f"end of the file after {done} of {total} bytes (was it modified "
                        "while open?)"
                    )
                done += n

    def close(self) -> None:
        """Closes the file. Safe to call more than once."""
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort, for callers that forget close(); getattr because __init__ may have
        # failed before _file existed.
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()

    def __repr__(self) -> str:
        state = "closed" if self._file is None else "open"
        return f"SafetensorsFile({str(self.path)!r}, {len(self._tensors)} tensors, {state})"


def read_safetensors(path: PathLike, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Reads tensors from a safetensors file.

    Args:
        path: The file to read.
        keys: Names of the tensors to read; all of them if None.

    Returns:
        A dict from name to array, in sorted key order (or the order of ``keys``). Each array
        owns its memory.

    Raises:
        WeightFileError: If the file is missing or corrupt, or lacks one of ``keys``.
    """
    with SafetensorsFile(path) as f:
        if keys is None:
            wanted = f.keys()
        else:
            wanted = list(keys)
            missing = [k for k in wanted if k not in f]
            if missing:
                shown = ", ".join(repr(k) for k in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise WeightFileError(f"{f.path}: no tensors named {shown}{more}")
        return {k: f.get(k) for k in wanted}


# ---------------------------------------------------------------------------------- writing


def _dtype_and_shape(key: str, value: Any) -> tuple[Any, np.dtype, tuple[int, ...]]:
    """Finds a value's dtype and shape, converting it with ``np.asarray`` only if needed.

    numpy and JAX arrays expose ``dtype`` and ``shape``, so their data is not touched here:
    the writer converts each value to numpy only when writing it, one at a time, instead of
    holding host copies of every (possibly on-device) array at once.

    Returns:
        The value (converted if it had to be), its dtype and its shape.
    """
    dtype = getattr(value, "dtype", None)
    shape = getattr(value, "shape", None)
    try:
        dtype = np.dtype(dtype) if dtype is not None else None
    except TypeError:  # e.g. a torch dtype: let numpy convert the value.
        dtype = None
    if dtype is None or not isinstance(shape, tuple):
        value = np.asarray(value)
        dtype, shape = value.dtype, value.shape
    if dtype.newbyteorder("=") not in _DTYPE_NAMES:
        raise TypeError(
            f"tensor {key!r} has dtype {dtype}, which safetensors cannot store "
            f"(supported: {', '.join(str(d) for d in _DTYPES.values())})"
        )
    return value, dtype, tuple(int(d) for d in shape)


def _as_little_endian_c(key: str, value: Any, dtype: np.dtype, shape: tuple[int, ...]):
    array = np.asarray(value)
    if array.dtype != dtype or array.shape != shape:
        # Guards against objects whose dtype/shape attributes lie about their data; writing
        # them would produce a header that does not match the bytes.
        raise WeightFileError(
            f"tensor {key!r}: np.asarray gave {array.dtype}{array.shape}, but the value "
            f"reported {dtype}{shape}"
        )
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not _LITTLE_ENDIAN_HOST):
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Not possible (nor needed) on Windows.
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_safetensors(
    path: PathLike,
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes tensors to a safetensors file, atomically.

    The data goes to a temporary file in the same folder, which is fsynced and then renamed
    over ``path`` with ``os.replace``. A crash or error part-way therefore never leaves a
    half-written file under the final name: either the old file or the complete new one is
    there.

    The header lists the tensors in sorted key order and is padded with spaces to a multiple
    of 8 bytes, as the reference library does. The data section is ordered like the reference
    library's too, by decreasing item size and then name, so every tensor starts at an
    offset aligned to its item size (which zero-copy readers rely on).

    Args:
        path: Destination file; its folder must exist.
        tensors: Name -> array. Anything ``np.asarray`` accepts works, e.g. JAX arrays (which
            are copied to the host one at a time, while writing). Also accepts an iterable of
            ``(name, array)`` pairs.
        metadata: Optional string -> string metadata, stored under ``__metadata__``.

    Raises:
        TypeError: If a key or a metadata entry is not a string, or a tensor's dtype cannot
            be stored (e.g. object or float128).
        WeightFileError: If a key is repeated or is the reserved name ``__metadata__``.
        OSError: If the file cannot be written.
    """
    path = Path(path)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors

    # Pass 1: validate everything and build the header before touching the disk.
    entries: list[tuple[str, Any, np.dtype, tuple[int, ...]]] = []
    seen: set[str] = set()
    for key, value in items:
        if not isinstance(key, str):
            raise TypeError(f"tensor names must be strings, got {key!r} ({type(key).__name__})")
        if key == _METADATA_KEY:
            raise WeightFileError(f"{path}: {key!r} is reserved for metadata, not a tensor name")
        if key in seen:
            raise WeightFileError(f"{path}: duplicate tensor name {key!r}")
        seen.add(key)
        value, dtype, shape = _dtype_and_shape(key, value)
        entries.append((key, value, dtype, shape))

    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(
                    f"metadata must map strings to strings, got {k!r}: {v!r} "
                    f"({type(k).__name__}: {type(v).__name__})"
                )

    entries.sort(key=lambda e: (-e[2].itemsize, e[0]))
    layout: dict[str, dict[str, Any]] = {}
    offset = 0
    for key, _, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        layout[key] = {
            "dtype": _DTYPE_NAMES[dtype.newbyteorder("=")],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header: dict[str, Any] = {}
    if metadata is not None:
        header[_METADATA_KEY] = dict(metadata)
    header.update(sorted(layout.items()))
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    # Pass 2: stream the data to a temporary file next to the destination (same file system,
    # so os.replace is an atomic rename). O_EXCL plus a random name avoids clobbering anything;
    # mode 0o666 lets the umask decide permissions, as for a normally created file.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(header_bytes).to_bytes(8, "little"))
            f.write(header_bytes)
            for key, value, dtype, shape in entries:
                array = _as_little_endian_c(key, value, dtype, shape)
                if array.nbytes:
                    f.write(_byte_view(array))
                del array  # Free any converted copy before converting the next tensor.
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


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
