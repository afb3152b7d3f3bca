"""Tests for cn_jax.train.checkpoint: round trips, async saves, pruning, resharding,
a real SIGKILL in the middle of a save, and the errors."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from cn_jax.train.checkpoint import Checkpointer, UnreadableCheckpointError

REPO = Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's marker for a step not yet finalised


@flax.struct.dataclass
class _State:
    """Shaped like cn_jax.train.state.TrainState (a dataclass with an optional field)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None


def _params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    w[0, :4] = [np.nan, np.inf, -np.inf, -0.0]  # bit-exactness, not just closeness
    return {
        "controlnet": {
            "conv_in": {"kernel": jnp.asarray(w), "bias": jnp.asarray(rng.standard_normal(8))},
            "mid": {
                "scale": jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16),
                "count": jnp.asarray(rng.integers(-(2**31), 2**31, (8,)), jnp.int32),
            },
        },
        "blocks": [
            {"kernel": jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)},
            {"kernel": jnp.asarray(rng.standard_normal((8,)), jnp.bfloat16)},
        ],
    }


def _full_state(seed: int) -> dict:
    """A train state with a real optax state (chain + multi_transform: empty and
    masked nodes, namedtuples) and rng key data (uint32)."""
    params = _params(seed)
    labels = jax.tree_util.tree_map(lambda _: "a", params)
    labels["blocks"][1]["kernel"] = "frozen"
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.multi_transform({"a": optax.adamw(1e-3), "frozen": optax.set_to_zero()}, labels),
    )
    # One real update, so the optimizer state is not all zeros.
    grads = jax.tree_util.tree_map(lambda x: jnp.ones_like(x) * 0.5, params)
    _, opt_state = tx.update(grads, tx.init(params), params)
    train = _State(step=jnp.asarray(seed + 7, jnp.int32), params=params, opt_state=opt_state)
    return {"train": train, "rng": jax.random.key_data(jax.random.key(seed))}


def _bits(x) -> np.ndarray:
    """The raw bytes of an array, so NaN == NaN and -0.0 != 0.0."""
    a = np.asarray(x)
    return a.view(np.dtype(f"u{a.dtype.itemsize}")) if a.dtype.itemsize in (1, 2, 4, 8) else a


def _assert_bit_exact(got, want) -> None:
    got_flat, got_def = jax.tree_util.tree_flatten(got)
    want_flat, want_def = jax.tree_util.tree_flatten(want)
    assert got_def == want_def
    assert len(got_flat) == len(want_flat) > 0
    for g, w in zip(got_flat, want_flat):
        assert np.asarray(g).dtype == np.asarray(w).dtype
        assert np.asarray(g).shape == np.asarray(w).shape
        np.testing.assert_array_equal(_bits(g), _bits(w))


def _abstract(tree, sharding):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )


def _zeros(tree):
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


def _tmp_dirs(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if TMP_SUFFIX in n)


META = {"data": {"epoch": 2, "index": 1234}, "config": {"lr": 1e-4, "name": "sd15"}, "ok": True}


# -- round trip ---------------------------------------------------------------------------------


def test_round_trip_is_bit_exact(tmp_path):
    state = _full_state(0)
    dtypes = {np.asarray(x).dtype for x in jax.tree_util.tree_leaves(state)}
    assert {np.dtype(t) for t in (np.float32, ml_dtypes.bfloat16, np.int32, np.uint32)} <= dtypes

    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(10, state, META)
        ck.wait()
        # Concrete arrays as the target: their values must not leak into the result.
        got, meta = ck.restore(10, _zeros(state))
    _assert_bit_exact(got, state)
    assert isinstance(got["train"], _State) and got["train"].ema_params is None
    assert meta == META

    # A fresh Checkpointer (a resumed run) reads it back from abstract shapes alone.
    replicated = SingleDeviceSharding(jax.devices()[0])
    with Checkpointer(tmp_path / "ck") as ck:
        assert ck.latest_step() == 10
        got, meta = ck.restore(None, _abstract(state, replicated))
    _assert_bit_exact(got, state)
    assert meta == META


# -- async saving -------------------------------------------------------------------------------


def test_async_saves_land_even_when_the_source_is_donated(tmp_path):
    directory = tmp_path / "ck"
    s1, s2 = _full_state(1), _full_state(2)
    want1, want2 = jax.tree_util.tree_map(np.asarray, (s1, s2))
    ck = Checkpointer(directory, async_save=True)
    ck.save(1, s1, {"n": 1})
    assert ck.latest_step() == 1
    # The train step donates its state right after saving: the write must not need it.
    for x in jax.tree_util.tree_leaves(s1):
        x.delete()
    ck.save(2, s2, {"n": 2})  # waits for step 1 first
    for x in jax.tree_util.tree_leaves(s2):
        x.delete()
    ck.wait()
    on_disk = sorted(os.listdir(directory))
    assert "1" in on_disk and "2" in on_disk and not _tmp_dirs(directory)
    assert os.path.exists(directory / "2" / "commit_success.txt")
    assert ck.all_steps() == [1, 2]
    target = _abstract(want1, SingleDeviceSharding(jax.devices()[0]))
    got1, meta1 = ck.restore(1, target)
    got2, meta2 = ck.restore(2, target)
    ck.close()
    _assert_bit_exact(got1, want1)
    _assert_bit_exact(got2, want2)
    assert (meta1, meta2) == ({"n": 1}, {"n": 2})


@pytest.mark.parametrize("async_save", [True, False])
def test_max_to_keep_prunes_oldest(tmp_path, async_save):
    directory = tmp_path / "ck"
    tree = {"w": jnp.arange(4.0)}
    with Checkpointer(directory, max_to_keep=2, async_save=async_save) as ck:
        assert ck.latest_step() is None and ck.all_steps() == []
        for step in (5, 10, 15, 20):
            ck.save(step, jax.tree_util.tree_map(lambda x, s=step: x + s, tree), {"s": step})
        ck.wait()
        assert ck.all_steps() == [15, 20]
        assert ck.latest_step() == 20
    assert sorted(n for n in os.listdir(directory) if n.isdigit()) == ["15", "20"]
    with Checkpointer(directory, max_to_keep=2) as ck:
        assert ck.all_steps() == [15, 20]
        got, meta = ck.restore(None, _zeros(tree))
    np.testing.assert_array_equal(got["w"], np.arange(4.0) + 20)
    assert meta == {"s": 20}


def test_max_to_keep_none_keeps_everything(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=None) as ck:
        for step in range(1, 6):
            ck.save(step, {"w": jnp.zeros(2)}, {})
        ck.wait()
        assert ck.all_steps() == [1, 2, 3, 4, 5]


# -- resharding ---------------------------------------------------------------------------------


def _mesh(devices, shape=(2, 4)) -> Mesh:
    return Mesh(np.asarray(devices).reshape(shape), ("data", "fsdp"))


def _place(tree, sharding_for):
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding_for(x)), tree)


def _fsdp(mesh):
    """Shard the first dimension over both axes when it divides, else replicate."""

    def sharding_for(x):
        n = mesh.devices.size
        return NamedSharding(mesh, P(("data", "fsdp")) if x.ndim and x.shape[0] % n == 0 else P())

    return sharding_for


def _check_resharded(got, want, sharding_for) -> None:
    _assert_bit_exact(got, want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        expected = sharding_for(w)
        assert g.sharding.is_equivalent_to(expected, g.ndim), (g.sharding, expected)


@pytest.mark.devices(8)
def test_restore_reshards_between_meshes(tmp_path):
    assert jax.device_count() == 8, "marked devices(8): tests/conftest.py"
    devices = jax.devices()
    mesh = _mesh(devices)
    host = jax.tree_util.tree_map(np.asarray, _full_state(3))
    assert any(x.ndim and x.shape[0] % 8 == 0 for x in jax.tree_util.tree_leaves(host))

    replicated = lambda x: NamedSharding(mesh, P())
    sharded = _fsdp(mesh)
    # The other mesh shape and another device order: nothing about the saved layout is reused.
    other = _fsdp(_mesh(devices[::-1], (4, 2)))
    single = lambda x: SingleDeviceSharding(devices[5])

    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, _place(host, replicated), {})  # saved replicated on 8 devices
        ck.save(2, _place(host, sharded), {})  # saved sharded over ("data", "fsdp")
        ck.save(3, _place(host, single), {})  # saved on one device
        for step in (1, 2, 3):
            for sharding_for in (replicated, sharded, other, single):
                target = jax.tree_util.tree_map(
                    lambda x, f=sharding_for: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=f(x)),
                    host,
                )
                got, _ = ck.restore(step, target)
                _check_resharded(got, host, sharding_for)


# -- killed mid-save ----------------------------------------------------------------------------

_KILLED_CHILD = textwrap.dedent(
    """
    import glob, os, signal, sys, time
    import jax.numpy as jnp, numpy as np
    from cn_jax.train.checkpoint import Checkpointer

    directory, npz = sys.argv[1], sys.argv[2]
    first = dict(np.load(npz))
    first["half"] = first["half"].astype(jnp.bfloat16)
    ck = Checkpointer(directory)
    ck.save(1, {k: jnp.asarray(v) for k, v in first.items()}, {"step": 1, "data": [3, 4]})
    ck.wait()
    # Big enough that writing it takes far longer than reaching the kill below.
    big = np.random.default_rng(1).standard_normal(24_000_000, dtype=np.float32)
    ck.save(2, {"big": jnp.asarray(big), "step": jnp.asarray(2)}, {"step": 2})
    # save() has returned and the write goes on in a background thread; kill the
    # process once the unfinished step 2 is on disk, before it can be finalised.
    deadline = time.time() + 30
    while not glob.glob(os.path.join(directory, "2.orbax-checkpoint-tmp*")):
        if os.path.exists(os.path.join(directory, "2")):
            sys.exit(3)  # already finalised: save() did not return before the write ended
        if time.time() > deadline:
            sys.exit(4)
        time.sleep(0.001)
    if os.path.exists(os.path.join(directory, "2")):
        sys.exit(3)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    directory = tmp_path / "ck"
    rng = np.random.default_rng(0)
    first = {
        "w": rng.standard_normal((64, 32)).astype(np.float32),
        "half": rng.standard_normal((16,)).astype(np.float32),  # saved as bfloat16
        "i": rng.integers(-100, 100, (7,)).astype(np.int32),
        "key": rng.integers(0, 2**32, (2,), dtype=np.uint64).astype(np.uint32),
    }
    np.savez(tmp_path / "first.npz", **first)
    first["half"] = first["half"].astype(ml_dtypes.bfloat16)

    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, str(directory), str(tmp_path / "first.npz")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    # The kill really landed mid-save: step 2 exists only as an unfinished tmp dir.
    assert _tmp_dirs(directory) and _tmp_dirs(directory)[0].startswith("2" + TMP_SUFFIX)
    assert "2" not in os.listdir(directory)

    target = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=SingleDeviceSharding(jax.devices()[0]))
        for k, v in first.items()
    }
    with Checkpointer(directory) as ck:
        assert ck.latest_step() == 1
        assert ck.all_steps() == [1]
        got, meta = ck.restore(None, target)
        _assert_bit_exact(got, first)
        assert meta == {"step": 1, "data": [3, 4]}
        # Opening the directory deletes the debris (in a background thread in
        # orbax 0.12, synchronously in older versions).
        deadline = time.monotonic() + 20
        while _tmp_dirs(directory) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _tmp_dirs(directory)
        # The run resumes and saves step 2 again.
        ck.save(2, {"w": jnp.ones(3)}, {"step": 2})
        ck.wait()
        assert ck.all_steps() == [1, 2]
        assert not _tmp_dirs(directory)
        got, meta = ck.restore(2, {"w": jnp.zeros(3)})
    np.testing.assert_array_equal(got["w"], np.ones(3))
    assert meta == {"step": 2}


# -- errors -------------------------------------------------------------------------------------


def test_restore_without_checkpoint_names_the_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with Checkpointer(missing) as ck:
        with pytest.raises(
            FileNotFoundError, match=f"no checkpoint in {re.escape(str(missing))}.*did not exist"
        ):
            ck.restore(None, {"w": jnp.zeros(2)})
    with Checkpointer(missing) as ck:  # exists now, still empty
        with pytest.raises(FileNotFoundError, match=f"no checkpoint in {re.escape(str(missing))}$"):
            ck.restore(None, {"w": jnp.zeros(2)})
        ck.save(3, {"w": jnp.zeros(2)}, {})
        with pytest.raises(
            FileNotFoundError, match=r"no checkpoint for step 4 .*steps there: \[3\]"
        ):
            ck.restore(4, {"w": jnp.zeros(2)})


def test_mismatched_target_names_path_and_shapes(tmp_path):
    state = {
        "params": {"a": jnp.zeros((4, 3)), "b": jnp.zeros((2,))},
        "step": jnp.zeros((), jnp.int32),
    }
    with Checkpointer(tmp_path) as ck:
        ck.save(1, state, {})
        wrong_shape = {**state, "params": {"a": jnp.zeros((3, 4)), "b": jnp.zeros((2,))}}
        with pytest.raises(ValueError, match=r"'params/a'.*\(4, 3\).*\(3, 4\)"):
            ck.restore(1, wrong_shape)
        extra = {**state, "params": {**state["params"], "c": jnp.zeros((5,))}}
        with pytest.raises(ValueError, match=r"'params/c'.*saved: absent, target: \(5,\)"):
            ck.restore(1, extra)
        missing = {**state, "params": {"a": state["params"]["a"]}}
        with pytest.raises(ValueError, match=r"'params/b'.*saved shape \(2,\), target: absent"):
            ck.restore(1, missing)
        no_sharding = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state
        )
        with pytest.raises(ValueError, match="'params/a' has no sharding"):
            ck.restore(1, no_sharding)
        # The good target still works after all that.
        got, _ = ck.restore(1, _zeros(state))
    _assert_bit_exact(got, state)


def test_save_rejects_bad_input(tmp_path):
    with Checkpointer(tmp_path) as ck:
        ck.save(5, {"w": jnp.zeros(2)}, {})
        with pytest.raises(ValueError, match="cannot save step 5 .*holds step 5"):
            ck.save(5, {"w": jnp.zeros(2)}, {})
        with pytest.raises(ValueError, match="cannot save step 4"):
            ck.save(4, {"w": jnp.zeros(2)}, {})
        with pytest.raises(TypeError, match="meta for step 6 is not JSON-serialisable"):
            ck.save(6, {"w": jnp.zeros(2)}, {"bad": object()})
        with pytest.raises(TypeError, match="'rng' is a typed PRNG key"):
            ck.save(6, {"rng": jax.random.key(0)}, {})
        with pytest.raises(ValueError, match="max_to_keep"):
            Checkpointer(tmp_path / "other", max_to_keep=0)
        assert ck.all_steps() == [5]


# -- unreadable steps -----------------------------------------------------------------------------


def _delete_arrays(step_dir: Path) -> list[Path]:
    """Deletes the array data files of one step (what "an array file deleted" does)."""
    files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
    for p in files:
        p.unlink()
    return files


def test_restore_latest_skips_an_unreadable_newest_step(tmp_path, caplog, capfd):
    states = {s: _full_state(s) for s in (2, 4, 6)}
    with Checkpointer(tmp_path / "ck", max_to_keep=None) as ck:
        for s, state in states.items():
            ck.save(s, state, {"step": s})
    gone = _delete_arrays(tmp_path / "ck" / "6")
    capfd.readouterr()
    with Checkpointer(tmp_path / "ck", max_to_keep=None) as ck:
        # Read by step, the damaged one is one error naming the step and the file.
        with pytest.raises(UnreadableCheckpointError) as e:
            ck.restore(6, _zeros(states[6]))
        assert str(e.value).startswith(f"checkpoint step 6 in {tmp_path / 'ck'} does not restore: ")
        assert "\n" not in str(e.value) and "tensorstore_spec" not in str(e.value)
        assert any(p.name in str(e.value) for p in gone)

        with caplog.at_level(logging.WARNING, logger="cn_jax.train.checkpoint"):
            step, got, meta = ck.restore_latest(_zeros(states[4]))
        assert step == 4 and meta == {"step": 4}
        _assert_bit_exact(got, states[4])
        # Set aside, not deleted: the run saves step 6 again.
        assert ck.all_steps() == [2, 4]
        assert (tmp_path / "ck" / "6.unreadable" / "state").is_dir()
        ck.save(6, states[6], {"step": 6})
        ck.wait()
        _assert_bit_exact(ck.restore(6, _zeros(states[6]))[0], states[6])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert warnings[0].startswith(f"checkpoint step 6 in {tmp_path / 'ck'} does not restore: ")
    assert warnings[0].endswith("; trying an older one")
    assert any(p.name in warnings[0] for p in gone)
    assert warnings[1] == (
        f"resuming from step 4 of {tmp_path / 'ck'}; set aside unreadable step(s) 6 as "
        "<step>.unreadable"
    )
    # Orbax's reads still in flight when the step failed print nothing.
    assert "Traceback" not in capfd.readouterr().err


def test_restore_latest_names_every_step_when_none_restores(tmp_path):
    state = {"w": jnp.arange(4.0)}
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, state, {})
        ck.save(2, state, {})
    gone = _delete_arrays(tmp_path / "ck" / "2")
    (tmp_path / "ck" / "1" / "state" / "_METADATA").unlink()
    with Checkpointer(tmp_path / "ck") as ck:
        with pytest.raises(UnreadableCheckpointError) as e:
            ck.restore_latest(_zeros(state))
        lines = str(e.value).splitlines()
        assert lines[0] == f"no checkpoint in {tmp_path / 'ck'} restores:"
        assert lines[1].startswith("  step 2: NOT_FOUND: ")
        assert any(p.name in lines[1] for p in gone)
        assert lines[2] == "  step 1: no array metadata in state/"
        assert len(lines) == 3
        assert ck.all_steps() == [1, 2]  # nothing set aside when nothing restores
    with Checkpointer(tmp_path / "empty") as ck:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ck.restore_latest(_zeros(state))


def test_read_only_reads_meta_and_writes_nothing(tmp_path):
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(3, {"w": jnp.zeros(2)}, {"config": {"a": 1}})
    (tmp_path / "ck" / f"4{TMP_SUFFIX}").mkdir()  # a killed save: the writer would delete it
    with Checkpointer(tmp_path / "ck", read_only=True) as ck:
        assert ck.restore_meta() == {"config": {"a": 1}}
        with pytest.raises(ValueError, match="opened read-only"):
            ck.save(5, {"w": jnp.zeros(2)}, {})
    assert (tmp_path / "ck" / f"4{TMP_SUFFIX}").is_dir()
    with Checkpointer(tmp_path / "absent", read_only=True) as ck:
        assert ck.all_steps() == []
    assert not (tmp_path / "absent").exists()
