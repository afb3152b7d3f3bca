"""Tests for cn_jax.weights.safetensors_io: safetensors through the library, with our errors
and atomic writes, and pickle loading."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from cn_jax.weights import safetensors_io
from cn_jax.weights.errors import WeightFileError
from cn_jax.weights.safetensors_io import (
    SafetensorsFile,
    load_pickle_checkpoint,
    read_safetensors,
    read_weights,
    write_safetensors,
)

RNG = np.random.default_rng(0)

# Every dtype we support, keyed by its safetensors name.
ALL_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "C64": np.complex64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
# Types the reference numpy bindings understand (no bfloat16 / float8 in numpy).
NUMPY_NATIVE = [n for n in ALL_DTYPES if n not in ("BF16", "F8_E4M3", "F8_E5M2")]


def _sample(dtype, shape=(3, 5)) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return RNG.random(shape) > 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        # Include the extremes: a sign or width mix-up shows up there.
        values = RNG.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
        values.flat[0], values.flat[1] = info.min, info.max
        return values
    if dtype == np.complex64:
        return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(dtype)
    # Scale so float8's small range still yields varied values.
    return (RNG.standard_normal(shape) * 4).astype(dtype)


def _assert_same(a: np.ndarray, b: np.ndarray) -> None:
    """Exact equality, including dtype, shape and bit pattern (so -0.0 / NaN count)."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.tobytes() == b.tobytes()


def _torch_bits(t: torch.Tensor) -> bytes:
    """Raw bytes of a CPU tensor, for any dtype (numpy cannot hold bfloat16)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _write_raw(path: Path, header: object, data: bytes = b"", header_len: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)


# ------------------------------------------------------------------------------ round trips


def test_round_trip_every_dtype(tmp_path):
    tensors = {f"t_{name}": _sample(dt) for name, dt in ALL_DTYPES.items()}
    tensors["scalar"] = np.array(2.5, dtype=np.float32)
    tensors["empty"] = np.zeros((0, 7), dtype=np.float16)
    tensors["odd_u8"] = np.arange(3, dtype=np.uint8)  # Odd byte count before aligned types.
    path = tmp_path / "all.safetensors"
    write_safetensors(path, tensors)

    loaded = read_safetensors(path)
    assert list(loaded) == sorted(tensors)
    for key, value in tensors.items():
        _assert_same(loaded[key], value)

    with SafetensorsFile(path) as f:
        assert f.keys() == sorted(tensors)
        assert len(f) == len(tensors)
        assert "t_BF16" in f and "nope" not in f
        assert f.metadata == {}
        for name, dt in ALL_DTYPES.items():
            assert f.dtype(f"t_{name}") == np.dtype(dt)
            assert f.shape(f"t_{name}") == (3, 5)
        arr = f.get("t_F32")
        # A private copy: no memory shared with the file or with another read of the key.
        assert not np.shares_memory(arr, f.get("t_F32"))
    # Writable, and it outlives the file.
    assert arr.flags.writeable
    arr[0, 0] = 123.0
    _assert_same(read_safetensors(path, keys=["t_F32"])["t_F32"], tensors["t_F32"])


def test_header_layout_is_the_reference_one_padded_and_aligned(tmp_path):
    tensors = {"b": _sample(np.uint8, (3,)), "a": _sample(np.float64, (2,)), "c": _sample("f2")}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, metadata={"format": "np"})
    raw = path.read_bytes()
    # Byte for byte what the reference writer produces: deterministic, and any reader of
    # reference files reads ours.
    reference = tmp_path / "reference.safetensors"
    safetensors.numpy.save_file(tensors, reference, metadata={"format": "np"})
    assert raw == reference.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    text = raw[8 : 8 + n].decode()
    assert text == text.rstrip() + " " * (len(text) - len(text.rstrip()))  # Space padding.
    header = json.loads(text)
    # Data order (decreasing item size, then name), listed in that order in the header.
    assert list(header) == ["__metadata__", "a", "c", "b"]
    for key, value in tensors.items():
        begin, end = header[key]["data_offsets"]
        assert begin % value.dtype.itemsize == 0, key
        assert end - begin == value.nbytes
    assert len(raw) == 8 + n + sum(v.nbytes for v in tensors.values())


def test_writer_accepts_noncontiguous_bigendian_and_jax(tmp_path):
    import jax.numpy as jnp

    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {
        "transposed": base.T,
        "strided": base[::2, ::3],
        "big_endian": np.arange(5, dtype=">i4"),
        "jax_bf16": jnp.linspace(-3, 3, 7, dtype=jnp.bfloat16),
        "jax_f32": jnp.ones((2, 2), jnp.float32),
        "list": [[1.0, 2.0]],
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors)
    loaded = read_safetensors(path)
    _assert_same(loaded["transposed"], np.ascontiguousarray(base.T))
    _assert_same(loaded["strided"], np.ascontiguousarray(base[::2, ::3]))
    _assert_same(loaded["big_endian"], np.arange(5, dtype=np.int32))
    _assert_same(loaded["jax_bf16"], np.asarray(tensors["jax_bf16"]))
    _assert_same(loaded["jax_f32"], np.ones((2, 2), np.float32))
    _assert_same(loaded["list"], np.array([[1.0, 2.0]]))
    # The reference reader agrees on the byte order.
    np.testing.assert_array_equal(
        safetensors.numpy.load_file(path)["big_endian"], np.arange(5, dtype=np.int32)
    )


# ------------------------------------------------------- interoperability with the reference


def test_reference_numpy_reads_our_files(tmp_path):
    tensors = {name: _sample(ALL_DTYPES[name]) for name in NUMPY_NATIVE}
    tensors["scalar"] = np.array(7, dtype=np.int64)
    tensors["empty"] = np.zeros((2, 0), dtype=np.float32)
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, tensors)
    theirs = safetensors.numpy.load_file(path)
    assert sorted(theirs) == sorted(tensors)
    for key, value in tensors.items():
        _assert_same(theirs[key], value)


def test_reference_torch_reads_our_bf16_and_f16(tmp_path):
    bf16 = _sample(ml_dtypes.bfloat16, (4, 3))
    f16 = _sample(np.float16, (5,))
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, {"bf16": bf16, "f16": f16})
    theirs = safetensors.torch.load_file(path)
    assert theirs["bf16"].dtype == torch.bfloat16
    assert tuple(theirs["bf16"].shape) == (4, 3)
    assert _torch_bits(theirs["bf16"]) == bf16.tobytes()
    assert theirs["f16"].dtype == torch.float16
    assert _torch_bits(theirs["f16"]) == f16.tobytes()
    # Same values, not just the same bits under some other interpretation.
    np.testing.assert_array_equal(theirs["bf16"].float().numpy(), bf16.astype(np.float32))


def test_we_read_reference_torch_files(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "bf16": torch.randn(3, 4).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 3).to(torch.float16),
        "f32": torch.randn(6),
        "i64": torch.arange(-5, 5),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
    }
    path = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    ours = read_safetensors(path)
    assert sorted(ours) == sorted(tensors)
    expected_dtypes = {
        "bf16": ml_dtypes.bfloat16,
        "f16": np.float16,
        "f32": np.float32,
        "i64": np.int64,
        "u8": np.uint8,
        "bool": np.bool_,
        "scalar": np.float64,
    }
    for key, t in tensors.items():
        assert ours[key].dtype == np.dtype(expected_dtypes[key]), key
        assert ours[key].shape == tuple(t.shape), key
        assert ours[key].tobytes() == _torch_bits(t), key
    np.testing.assert_array_equal(ours["bf16"].astype(np.float32), tensors["bf16"].float().numpy())
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt"}


def test_metadata_round_trip_both_ways(tmp_path):
    meta = {"format": "np", "note": "ünïcode ✓", "empty": ""}
    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, {"x": np.ones(2, np.float32)}, metadata=meta)
    with safetensors.safe_open(ours, framework="np") as f:
        assert f.metadata() == meta
    with SafetensorsFile(ours) as f:
        assert f.metadata == meta

    theirs = tmp_path / "theirs.safetensors"
    safetensors.numpy.save_file({"x": np.ones(2, np.float32)}, theirs, metadata=meta)
    with SafetensorsFile(theirs) as f:
        assert f.metadata == meta


# -------------------------------------------------------------------------- corrupt files


@pytest.fixture
def valid_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    write_safetensors(
        path,
        {"a.weight": np.ones((4, 4), np.float32), "b.weight": np.ones((8,), np.float32)},
    )
    return path


def test_truncated_file_names_file_and_first_tensor(valid_file):
    size = valid_file.stat().st_size
    # Data order is a.weight (64 bytes) then b.weight (32 bytes); cutting 40 bytes reaches
    # into a.weight, which must be the tensor named.
    with open(valid_file, "r+b") as f:
        f.truncate(size - 40)
    with pytest.raises(WeightFileError) as info:
        SafetensorsFile(valid_file)
    message = str(info.value)
    assert "truncated" in message
    assert "model.safetensors" in message
    assert "'a.weight'" in message
    assert str(size) in message and str(size - 40) in message  # Expected vs actual size.
    with pytest.raises(WeightFileError, match="truncated"):
        read_weights(valid_file)


def test_truncated_by_one_byte(valid_file):
    with open(valid_file, "r+b") as f:
        f.truncate(valid_file.stat().st_size - 1)
    with pytest.raises(WeightFileError, match=r"truncated.*'b\.weight'"):
        read_safetensors(valid_file)


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"])
def test_shorter_than_length_field(tmp_path, content):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightFileError, match="tiny.safetensors"):
        SafetensorsFile(path)


def test_garbage_header(tmp_path):
    path = tmp_path / "garbage.safetensors"
    _write_raw(path, b"<html>not found</html>")
    with pytest.raises(WeightFileError, match=r"garbage\.safetensors.*JSON"):
        SafetensorsFile(path)
    _write_raw(path, b"\xff\xfe\x00\x01")
    with pytest.raises(WeightFileError, match="garbage.safetensors"):
        SafetensorsFile(path)
    _write_raw(path, [1, 2, 3])
    with pytest.raises(WeightFileError, match="JSON object"):
        SafetensorsFile(path)


def test_header_length_too_large(tmp_path):
    path = tmp_path / "long.safetensors"
    _write_raw(path, {}, header_len=1000)
    with pytest.raises(WeightFileError, match=r"long\.safetensors.*1000"):
        SafetensorsFile(path)
    # A random first 8 bytes usually decode to an absurd length.
    path.write_bytes(b"PK\x03\x04" + b"\xff" * 60)
    with pytest.raises(WeightFileError, match="long.safetensors"):
        SafetensorsFile(path)


def test_byte_count_mismatch(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    _write_raw(path, header, b"\0" * 24)
    with pytest.raises(WeightFileError, match=r"bad\.safetensors.*'w'.*20 bytes.*24 bytes"):
        SafetensorsFile(path)


def test_unknown_dtype(tmp_path):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, {"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(WeightFileError, match=r"bad\.safetensors.*'w'.*unknown dtype 'F128'"):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}, "data_offsets"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "begin > end"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [1]}, "data_offsets"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_malformed_entries(tmp_path, entry, match):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, {"w": entry}, b"\0" * 8)
    with pytest.raises(WeightFileError, match=match) as info:
        SafetensorsFile(path)
    assert "bad.safetensors" in str(info.value)


def test_bad_metadata(tmp_path):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, {"__metadata__": {"epoch": 3}})
    with pytest.raises(WeightFileError, match="__metadata__"):
        SafetensorsFile(path)


def _f32(begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    ("header", "size", "match"),
    [
        # Overlapping: y starts inside x.
        ({"x": _f32(0, 8), "y": _f32(4, 12)}, 12, r"'y' \(bytes 4-12\) overlaps tensor 'x'"),
        # Duplicate offsets: both tensors claim the same bytes.
        ({"x": _f32(0, 8), "y": _f32(0, 8)}, 8, r"'y' \(bytes 0-8\) overlaps tensor 'x'"),
        # A gap: bytes 8-12 belong to no tensor.
        ({"x": _f32(0, 8), "y": _f32(12, 20)}, 20, r"bytes 8-12 before tensor 'y'"),
        # Trailing bytes after the last tensor.
        ({"x": _f32(0, 8)}, 12, r"4 bytes follow the last tensor"),
    ],
)
def test_bad_layout_refused_in_one_line(tmp_path, header, size, match):
    """The library refuses these (ours once accepted overlaps); the message names the file
    and the tensors, on one line."""
    path = tmp_path / "layout.safetensors"
    _write_raw(path, header, b"\0" * size)
    with pytest.raises(WeightFileError, match=match) as info:
        SafetensorsFile(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    with pytest.raises(WeightFileError, match=match):
        read_weights(path)


def test_unexplained_library_error_is_wrapped(valid_file, monkeypatch):
    """Whatever the library refuses becomes a WeightFileError naming the file, even where
    we cannot tell more than the library's own message."""
    with open(valid_file, "r+b") as f:
        f.truncate(valid_file.stat().st_size - 1)
    monkeypatch.setattr(safetensors_io, "_explain", lambda path: None)
    with pytest.raises(WeightFileError, match=r"model\.safetensors: not a valid safetensors"):
        SafetensorsFile(valid_file)


def test_truncated_while_open(valid_file):
    with SafetensorsFile(valid_file) as f:
        with open(valid_file, "r+b") as raw:
            raw.truncate(valid_file.stat().st_size - 40)
        with pytest.raises(WeightFileError, match=r"model\.safetensors.*'a\.weight'"):
            f.get("a.weight")


def test_bf16_round_trip_keeps_every_bit(tmp_path):
    """bfloat16 comes back as ml_dtypes.bfloat16, bit for bit (signed zeros, inf, NaN,
    subnormals), and the reference flax reader sees the same values."""
    bits = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x0001, 0x3F80, 0xC2F7], np.uint16)
    values = bits.view(ml_dtypes.bfloat16).reshape(2, 4)
    path = tmp_path / "bf16.safetensors"
    write_safetensors(path, {"w": values})
    loaded = read_safetensors(path)["w"]
    _assert_same(loaded, values)
    import safetensors.flax

    theirs = np.asarray(safetensors.flax.load_file(path)["w"])
    assert theirs.dtype == values.dtype and theirs.tobytes() == values.tobytes()


def test_integer_tensors_stay_integers(tmp_path):
    """No silent casts on reading: an int tensor comes back with its own dtype, so a loader
    expecting float weights sees the mismatch (it is the loader that refuses it)."""
    path = tmp_path / "ints.safetensors"
    write_safetensors(path, {"position_ids": np.arange(6, dtype=np.int64).reshape(1, 6)})
    with SafetensorsFile(path) as f:
        assert f.dtype("position_ids") == np.int64
        _assert_same(f.get("position_ids"), np.arange(6, dtype=np.int64).reshape(1, 6))


def test_config_metadata_round_trip(tmp_path):
    """Our own metadata (a JSON config under cn_jax_config) survives a write and a read."""
    config = json.dumps({"block_out_channels": [32, 64], "cross_attention_dim": 32})
    path = tmp_path / "cn.safetensors"
    write_safetensors(
        path, {"w": np.ones(2, np.float32)}, {"format": "pt", "cn_jax_config": config}
    )
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt", "cn_jax_config": config}
    write_safetensors(path, {"w": np.ones(2, np.float32)})  # None: no __metadata__ entry.
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert "__metadata__" not in json.loads(path.read_bytes()[8 : 8 + n])
    with SafetensorsFile(path) as f:
        assert f.metadata == {}


def test_missing_key_and_closed_file(valid_file):
    with SafetensorsFile(valid_file) as f:
        with pytest.raises(WeightFileError, match=r"model\.safetensors.*'nope'"):
            f.get("nope")
        with pytest.raises(WeightFileError, match="'nope'"):
            f.shape("nope")
    with pytest.raises(WeightFileError, match="closed"):
        f.get("a.weight")
    with pytest.raises(WeightFileError, match="'nope'"):
        read_safetensors(valid_file, keys=["a.weight", "nope"])


# ---------------------------------------------------------------------------------- writing


def test_writer_rejects_bad_input(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match="1"):
        write_safetensors(path, {1: np.zeros(1)})
    with pytest.raises(TypeError, match="'obj'"):
        write_safetensors(path, {"obj": np.array([object()])})
    with pytest.raises(TypeError, match="'s'"):
        write_safetensors(path, {"s": np.array(["text"])})
    with pytest.raises(WeightFileError, match="duplicate.*'w'"):
        write_safetensors(path, [("w", np.zeros(1)), ("w", np.ones(1))])
    with pytest.raises(WeightFileError, match="__metadata__"):
        write_safetensors(path, {"__metadata__": np.zeros(1)})
    with pytest.raises(TypeError, match="metadata"):
        write_safetensors(path, {"w": np.zeros(1)}, metadata={"epoch": 3})
    assert list(tmp_path.iterdir()) == []  # Rejected before anything was written.


class _ExplodingArray:
    """Reports a dtype and shape, but fails when its data is requested (like a full disk)."""

    dtype = np.dtype(np.float32)
    shape = (2,)

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("boom while writing")


def test_failed_write_keeps_previous_file(valid_file):
    before = valid_file.read_bytes()
    # "a" is written first (same item size, sorted by name), then "z" explodes midway.
    new = {"a": np.zeros(1000, np.float32), "z": _ExplodingArray()}
    with pytest.raises(RuntimeError, match="boom"):
        write_safetensors(valid_file, new)
    assert valid_file.read_bytes() == before
    assert os.listdir(valid_file.parent) == [valid_file.name]


def test_failed_rename_keeps_previous_file(valid_file, monkeypatch):
    before = valid_file.read_bytes()

    def failing_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(safetensors_io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        write_safetensors(valid_file, {"a": np.zeros(10, np.float32)})
    monkeypatch.undo()
    assert valid_file.read_bytes() == before
    assert os.listdir(valid_file.parent) == [valid_file.name]


def test_write_replaces_existing_file(valid_file):
    write_safetensors(valid_file, {"new": np.arange(3, dtype=np.int16)})
    assert os.listdir(valid_file.parent) == [valid_file.name]
    assert list(read_safetensors(valid_file)) == ["new"]


# ---------------------------------------------------------------------- pickle checkpoints


@pytest.fixture
def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3),
        "conv.bias": torch.randn(4).to(torch.bfloat16),
        "norm.weight": torch.randn(4).to(torch.float16),
        "steps": torch.tensor(7),
    }


def _check_matches(loaded: dict[str, np.ndarray], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for key, t in expected.items():
        assert loaded[key].shape == tuple(t.shape), key
        assert loaded[key].tobytes() == _torch_bits(t), key
    assert loaded["conv.bias"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(
        loaded["conv.bias"].astype(np.float32), expected["conv.bias"].float().numpy()
    )


def test_pickle_refused_by_default(tmp_path, state_dict):
    path = tmp_path / "pytorch_model.bin"
    torch.save(state_dict, path)
    for load in (read_weights, load_pickle_checkpoint):
        with pytest.raises(WeightFileError) as info:
            load(path)
        message = str(info.value)
        assert "allow_pickle" in message
        assert "arbitrary code" in message
        assert "pytorch_model.bin" in message


def test_pickle_loads_with_opt_in(tmp_path, state_dict):
    path = tmp_path / "pytorch_model.bin"
    torch.save(state_dict, path)
    _check_matches(read_weights(path, allow_pickle=True), state_dict)
    _check_matches(load_pickle_checkpoint(path, allow_pickle=True), state_dict)


def test_ckpt_state_dict_is_unwrapped(tmp_path, state_dict):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state_dict, "global_step": 1000, "epoch": 3}, path)
    _check_matches(read_weights(path, allow_pickle=True), state_dict)


def test_pickle_skips_non_tensors(tmp_path, state_dict):
    path = tmp_path / "model.pt"
    torch.save({**state_dict, "config": {"lr": 1e-4}, "name": "unet"}, path)
    _check_matches(read_weights(path, allow_pickle=True), state_dict)


def test_pickle_unsafe_objects_rejected(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": _ExplodingArray}, path)  # A class: not allowed.
    with pytest.raises(WeightFileError, match=r"evil\.pth.*weights_only"):
        read_weights(path, allow_pickle=True)


def test_corrupt_pickle(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"definitely not a zip or a pickle")
    with pytest.raises(WeightFileError, match=r"broken\.pt"):
        read_weights(path, allow_pickle=True)


# ------------------------------------------------------------------------------- dispatch


def test_read_weights_dispatch(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": np.arange(4, dtype=np.float32)})
    _assert_same(read_weights(path)["w"], np.arange(4, dtype=np.float32))
    _assert_same(read_weights(str(path))["w"], np.arange(4, dtype=np.float32))

    other = tmp_path / "model.npz"
    other.write_bytes(b"whatever")
    with pytest.raises(WeightFileError, match=r"model\.npz.*'\.npz'"):
        read_weights(other)


def test_missing_file(tmp_path):
    for name in ("nope.safetensors", "nope.bin", "nope.xyz"):
        with pytest.raises(WeightFileError, match=rf"not found.*{name}"):
            read_weights(tmp_path / name, allow_pickle=True)
    with pytest.raises(WeightFileError, match="not found"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    with pytest.raises(WeightFileError, match="not found"):
        load_pickle_checkpoint(tmp_path / "nope.bin", allow_pickle=True)
    with pytest.raises(WeightFileError, match="directory"):
        read_weights(tmp_path)
