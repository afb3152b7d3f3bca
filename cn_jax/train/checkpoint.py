"""Training checkpoints: orbax, asynchronous, atomic, restorable onto any mesh.

One checkpoint per step, in `<directory>/<step>/`, holding two items:

- `state`: the array tree (trainable params, optimizer state, step, rng key
  data, ...), written by orbax's `StandardCheckpointHandler` (tensorstore,
  one shard per device, no host gather);
- `meta`: a JSON dict (data position, config, anything small), written by
  `JsonCheckpointHandler`.

Why it is safe to kill a run at any moment: orbax writes a step into
`<step>.orbax-checkpoint-tmp*` (or, on object stores without atomic rename,
into `<step>/` without its `commit_success.txt`) and only finalises it, by an
atomic rename after every array and the JSON are on disk, when the whole write
has finished. A directory that was never finalised is not a step: it is
ignored when listing steps and deleted when the next `Checkpointer` opens the
directory (`cleanup_tmp_directories`). Old steps beyond `max_to_keep` are
deleted only after the new step is finalised, so a crash never leaves fewer
good checkpoints than before.

Asynchronous saving: `save` returns once the arrays are copied off the
devices, so the caller may donate or overwrite them at once (the train step
donates its state); a background thread writes and finalises. The next `save`,
`restore` or `close` first waits for it, and an error in the background write
is raised there (or by `wait`).

Unreadable steps: `restore_latest` restores the newest step that reads back
(a step with an array file deleted, say), logs one line for each newer step it
skips, and sets those aside as `<step>.unreadable/` (kept for inspection, no
longer a step), so the resumed run can save those step numbers again. Only when
no step restores does it raise, naming the directory and each step's reason.

Multi-host: every process constructs the `Checkpointer` and calls `save`,
`restore`, `wait` and `close` in the same order with the same arguments, on a
directory all processes see (GCS, NFS). Orbax synchronises the processes and
splits the work itself: each process writes and reads only its own shards,
the primary process creates directories, writes the JSON and the commit
marker and renames. The one per-process branch here is `restore_latest`'s:
the processes agree on the step to restore (one that fails anywhere is
skipped everywhere), the primary sets the skipped steps aside, the others wait.
That path is tested in one process only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any

STATE = "state"  # orbax item names, i.e. the sub-directories of a step
META = "meta"
UNREADABLE = ".unreadable"  # suffix of a step set aside by `restore_latest`

log = logging.getLogger(__name__)


class UnreadableCheckpointError(ValueError):
    """A checkpoint step (or every step in a directory) does not restore; the
    message names the directory, the step(s) and why (`reason`, one line)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def _reason(e: BaseException) -> str:
    """One line for an exception from a restore.

    TensorStore's messages carry the whole JSON spec of the store they failed
    to open (`[tensorstore_spec='{...}']`, a thousand characters); the part
    before it names the array and the missing file."""
    text = re.sub(r"\s*\[tensorstore_spec=.*", "", str(e), flags=re.S)
    text = " ".join(text.split()) or type(e).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


class _QuietClosedLoop:
    """Drops the "Event loop is closed" RuntimeErrors that a failed orbax
    restore leaves behind while it is active.

    When one array of a step fails to read, orbax's `asyncio.run` closes its
    loop while other reads are still in flight; their completion callbacks
    then post to the closed loop, and Python prints each as a traceback
    (through sys.unraisablehook) although the error itself is handled. They
    fire while the failed call unwinds (measured), so the hook stays 50 ms
    longer after a failure. Every other unraisable exception goes
    to the previous hook."""

    def __enter__(self):
        self._previous = sys.unraisablehook
        sys.unraisablehook = self._hook
        return self

    def _hook(self, unraisable) -> None:
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        self._previous(unraisable)

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            # A failed read's sibling reads may finish a moment after the error
            # surfaces; on local disk within a millisecond.
            time.sleep(0.05)
        sys.unraisablehook = self._previous


def _key_name(key: Any) -> str:
    """One path component; dict keys, attributes and indices alike.

    Orbax stores namedtuple and dataclass fields as dict keys, so a target built
    from `TrainState(...)` and the saved metadata (plain dicts and lists) meet
    on these names.
    """
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat(tree: PyTree) -> dict[str, Any]:
    """`"a/b/0/c" -> leaf`, in tree order."""
    return {
        "/".join(_key_name(k) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _shape(x: Any) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)
    return tuple(np.shape(x) if shape is None else shape)


def _is_prng_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _everywhere(ok: bool) -> bool:
    """True when `ok` holds on every process (just `ok` in a single process)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _abstract_leaf(path: str, x: Any) -> Any:
    """What orbax needs to restore one leaf: shape, dtype and sharding."""
    if _is_prng_key(x):
        raise TypeError(
            f"restore target leaf {path!r} is a typed PRNG key; restore its key data "
            "(uint32) and rewrap it with jax.random.wrap_key_data"
        )
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
        raise ValueError(
            f"restore target leaf {path!r} has no sharding: give "
            "jax.ShapeDtypeStruct(shape, dtype, sharding=...) so it is placed on this mesh"
        )
    return x  # a ShapeDtypeStruct with sharding, or a numpy array / scalar (restored on host)


class Checkpointer:
    """Saves and restores `(state, meta)` per training step in one directory.

    Args:
      directory: where the steps live (local path or a URL orbax understands,
        such as `gs://...`); created if missing.
      max_to_keep: newest steps kept; older ones are deleted once a newer one is
        finalised. None keeps all.
      async_save: write in a background thread; `save` returns once the arrays
        are off the devices.
      read_only: only read: the directory is neither created nor cleaned of
        unfinished saves, and `save` raises. For looking at a run before
        deciding to write to it.

    Use as a context manager, or call `close()`, so the last save finishes.
    """

    def __init__(
        self,
        directory,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
        directory = os.fspath(directory)
        # Orbax wants absolute paths; URLs (gs://...) pass through.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self._existed = epath.Path(self.directory).exists()
        self._read_only = read_only
        # Not orbax's own `read_only` option: that logs a warning on every open.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            enable_async_checkpointing=async_save and not read_only,
            cleanup_tmp_directories=not read_only,  # drop what a killed save left behind
            create=not read_only,
        )
        # Handlers registered up front (not inferred at the first save), so a
        # manager opened on an existing directory can read metadata and restore.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                META: ocp.JsonCheckpointHandler(),
            },
        )

    def __repr__(self) -> str:
        return f"Checkpointer({self.directory!r}, steps={self.all_steps()})"

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        """Steps in the directory, ascending, including one this object is still writing."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step, or None when the directory holds none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: PyTree, meta: dict) -> None:
        """Starts writing `state` and `meta` as `step` (waits for the previous save first).

        Args:
          step: the training step; must be newer than every step already here.
          state: a tree of arrays (sharded `jax.Array`s are written shard by
            shard). Typed PRNG keys must be saved as `jax.random.key_data`.
          meta: a JSON-serialisable dict (JSON turns tuples into lists and
            non-string keys into strings).

        Raises:
          ValueError: `step` is not newer than the latest step.
          TypeError: `meta` is not JSON-serialisable, or a leaf is a typed key.
        """
        step = int(step)
        if self._read_only:
            raise ValueError(f"cannot save step {step}: {self.directory} was opened read-only")
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"cannot save step {step} in {self.directory}: it already holds step {latest}; "
                "steps in one directory must increase"
            )
        if not isinstance(meta, Mapping):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        try:
            json.dumps(dict(meta))  # fail here, not in the background thread
        except (TypeError, ValueError) as e:
            raise TypeError(f"meta for step {step} is not JSON-serialisable: {e}") from e
        for path, leaf in _flat(state).items():
            if _is_prng_key(leaf):
                raise TypeError(
                    f"state leaf {path!r} is a typed PRNG key; save jax.random.key_data(key) "
                    "(uint32) instead"
                )
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(dict(meta))}
            ),
            force=True,  # the step policy is ours (checked above), not orbax's interval
        )

    def restore(self, step: int | None, target: PyTree) -> tuple[PyTree, dict]:
        """Reads one step back, laid out like `target`.

        Args:
          step: the step to read; None reads the latest.
          target: the tree to fill, with the same structure and shapes as the
            saved one: `jax.ShapeDtypeStruct`s with a `sharding`, or concrete
            arrays (their shape, dtype and sharding are used; their values are
            not). Each array comes back with the target's sharding, on
            whatever mesh that names (resharding is free), and in the target's
            dtype (orbax casts when it differs from the saved one). Numpy
            leaves come back as numpy arrays.

        Returns:
          `(state, meta)`: `state` has `target`'s tree structure.

        Raises:
          FileNotFoundError: no checkpoint (or not that step) in the directory.
          ValueError: `target`'s structure or a shape differs from the saved
            one; names the first differing path and both shapes.
          UnreadableCheckpointError: the step's files do not read back (one
            deleted or damaged); names the step and the first failure.
        """
        step = self._existing_step(step)
        abstract = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(target),
            [_abstract_leaf(p, x) for p, x in _flat(target).items()],
        )
        self._check_matches(step, abstract)
        restored = self._read(
            step,
            {STATE: ocp.args.StandardRestore(abstract), META: ocp.args.JsonRestore()},
        )
        return restored[STATE], dict(restored[META] or {})

    def restore_meta(self, step: int | None = None) -> dict:
        """The JSON dict saved with `step` (None: the latest), without its arrays.

        Raises:
          FileNotFoundError: no checkpoint (or not that step) in the directory.
          UnreadableCheckpointError: the step's meta does not read back.
        """
        step = self._existing_step(step)
        return dict(self._read(step, {META: ocp.args.JsonRestore()})[META] or {})

    def restore_latest(self, target: PyTree) -> tuple[int, PyTree, dict]:
        """The newest step that restores, as `(step, state, meta)`.

        A newer step that does not restore (a file deleted or damaged, a shape
        that differs) is skipped with one warning line naming it and why, and
        set aside as `<step>.unreadable/` in the directory: no longer a step,
        so the resumed run can save that step again, but kept for inspection.

        Raises:
          FileNotFoundError: the directory holds no checkpoint.
          UnreadableCheckpointError: no step restores; names the directory and
            each step's reason. Nothing is set aside then.
        """
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if not steps:
            self._existing_step(None)  # raises FileNotFoundError
        skipped: dict[int, str] = {}
        for step in reversed(steps):
            try:
                state, meta = self.restore(step, target)
                error = None
            except Exception as e:  # any failure of this step: try an older one
                reason = e.reason if isinstance(e, UnreadableCheckpointError) else _reason(e)
                state, meta, error = None, None, reason
            # All processes take the same step, even if only one failed to read.
            if _everywhere(error is None):
                break
            skipped[step] = error or "another process could not restore it"
            older = "; trying an older one" if step != steps[0] else ""
            log.warning(
                "checkpoint step %d in %s does not restore: %s%s",
                step, self.directory, skipped[step], older,
            )  # fmt: skip
        else:
            lines = "".join(f"\n  step {s}: {why}" for s, why in skipped.items())
            raise UnreadableCheckpointError(f"no checkpoint in {self.directory} restores:{lines}")
        if skipped:
            self._set_aside(sorted(skipped))
            log.warning(
                "resuming from step %d of %s; set aside unreadable step(s) %s as <step>%s",
                step, self.directory, ", ".join(map(str, sorted(skipped))), UNREADABLE,
            )  # fmt: skip
        return step, state, meta

    def _existing_step(self, step: int | None) -> int:
        """`step` (None: the latest) after the save in flight, if it is in the directory."""
        self._manager.wait_until_finished()  # a step still being written is not readable
        steps = self.all_steps()
        if not steps:
            why = "" if self._existed else " (the directory did not exist)"
            raise FileNotFoundError(f"no checkpoint in {self.directory}{why}")
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; steps there: {steps}"
            )
        return int(step)

    def _read(self, step: int, items: dict) -> Any:
        """Orbax's restore of `items`; its failures become one UnreadableCheckpointError."""
        try:
            with _QuietClosedLoop():
                return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise self._unreadable(step, _reason(e)) from e

    def _unreadable(self, step: int, reason: str) -> UnreadableCheckpointError:
        return UnreadableCheckpointError(
            f"checkpoint step {step} in {self.directory} does not restore: {reason}", reason
        )

    def _set_aside(self, steps: list[int]) -> None:
        """Renames each step's directory to `<step>.unreadable` (a free name), then
        re-lists the steps. The primary process renames; the others wait."""
        if jax.process_index() == 0:
            root = epath.Path(self.directory)
            for step in steps:
                dest, n = root / f"{step}{UNREADABLE}", 1
                while dest.exists():
                    n += 1
                    dest = root / f"{step}{UNREADABLE}-{n}"
                (root / str(step)).rename(dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("cn_jax.checkpoint.set_aside")
        self._manager.reload()

    def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """Path -> shape of every array saved at `step`, from orbax's metadata."""
        try:
            with _QuietClosedLoop():  # reading the metadata opens every array
                try:
                    items = self._manager.metadata(step).item_metadata
                except (AttributeError, TypeError):  # orbax before StepMetadata
                    items = self._manager.item_metadata(step)
            tree = items[STATE] if items is not None and STATE in items else None
        except Exception as e:
            raise self._unreadable(step, _reason(e)) from e
        tree = getattr(tree, "tree", tree)  # TreeMetadata wraps the tree in newer orbax
        if not tree:  # its _METADATA file is gone: orbax returns None
            raise self._unreadable(step, f"no array metadata in {STATE}/")
        return {p: tuple(getattr(m, "shape", ()) or ()) for p, m in _flat(tree).items()}

    def _check_matches(self, step: int, abstract: PyTree) -> None:
        """Raises ValueError at the first path where `abstract` and the checkpoint differ."""
        saved = self._saved_shapes(step)
        wanted = {p: _shape(x) for p, x in _flat(abstract).items()}
        where = f"checkpoint step {step} in {self.directory}"
        for path, shape in wanted.items():
            if path not in saved:
                raise ValueError(
                    f"{where} does not match the restore target at {path!r}: "
                    f"saved: absent, target: {shape}"
                )
            if saved[path] != shape:
                raise ValueError(
                    f"{where} does not match the restore target at {path!r}: "
                    f"saved shape {saved[path]}, target shape {shape}"
                )
        for path, shape in saved.items():
            if path not in wanted:
                raise ValueError(
                    f"{where} does not match the restore target at {path!r}: "
                    f"saved shape {shape}, target: absent"
                )

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is finalised; raises its error."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the save in flight, then releases orbax's threads."""
        self._manager.close()
