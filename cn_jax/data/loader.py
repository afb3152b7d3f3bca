"""The host input pipeline: deterministic, resumable, sharded batches of decoded pairs.

Everything random is a pure function of (seed, epoch, dataset index), never of thread
timing, worker count or prefetch depth:

- the order of epoch e is ``default_rng([ORDER_TAG, seed, e]).permutation(N)``;
- each sample draws five uniforms from ``default_rng([SAMPLE_TAG, seed, e, index])``, always
  all five and in this order: prompt dropout, crop x, crop y, flip, caption choice. Drawing
  all of them whatever the options means that turning on random flips does not change which
  prompts are dropped.

So a run resumed from `Loader.position` sees exactly the batches it would have seen, and the
global batch is the same for any number of processes: batch b of epoch e holds the dataset
indices ``order[b*G : (b+1)*G]`` and process p of P keeps rows ``[p*G/P, (p+1)*G/P)``.

Threads: a producer thread walks the batch positions and submits one decode task per sample
to a pool of `num_workers` threads (PIL releases the GIL while decoding and resizing), each
writing its row straight into the batch's preallocated arrays and tokenizing its caption;
up to `prefetch` submitted batches wait in a queue. `__next__` takes the oldest one and
waits for its tasks (a task's `BadSampleError` is re-raised there, on the consumer thread):
the training thread only stacks the token ids.

Transport: pixels leave the loader as integers, uint8 for 8-bit sources (a quarter of the
host-to-device bytes of float32), and the jitted train step maps them to the models'
float ranges by the same formulas (`cn_jax.train.step.image_to_model_range`: bit-identical
floats). A source deeper than 8 bits (16-bit PNG depth maps) is sent as uint16 on 0..65535
so it keeps its depth: with ``"auto"`` each of image and condition is uint16 when any of
the first rows' is deeper than 8 bits (one dtype for the whole run: the step is compiled
for it), else uint8; a deeper row met later in a uint8 stream is rounded to 8 bits, with
one warning.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from cn_jax.data.sources import RECORD_COLUMNS, open_dataset
from cn_jax.data.transforms import (
    BadSampleError,
    image_size,
    preprocess_pair,
    preprocess_pair_pixels,
    size_numbers,
    source_is_deep,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Domain tags, so the order generator and the per-sample generators never share a seed.
ORDER_TAG = 0x0D
SAMPLE_TAG = 0x5A
ON_BAD_SAMPLE = ("error", "skip")
POSITION_KEYS = ("epoch", "batch", "skipped")
PIXEL_DTYPES = ("auto", "uint8", "uint16", "float32")
PROBE_ROWS = 4  # rows whose depth "auto" reads to pick uint8 or uint16


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The permutation of dataset indices that epoch `epoch` visits, in order."""
    return np.random.default_rng([ORDER_TAG, seed, epoch]).permutation(num_examples)


@dataclass(frozen=True)
class SampleChoices:
    """The random decisions for one sample, fixed by (seed, epoch, index).

    Attributes:
      drop_prompt: replace the caption by "" (classifier-free guidance training).
      crop: crop offset as fractions of the slack; (0.5, 0.5) without random crops.
      flip: flip image and condition horizontally.
      caption_u: uniform in [0, 1) choosing among a list of captions.
    """

    drop_prompt: bool
    crop: tuple[float, float]
    flip: bool
    caption_u: float


def sample_choices(
    seed: int,
    epoch: int,
    index: int,
    proportion_empty_prompts: float,
    random_crop: bool,
    random_flip: bool,
) -> SampleChoices:
    """Draw the random decisions of dataset row `index` in epoch `epoch`."""
    u = np.random.default_rng([SAMPLE_TAG, seed, epoch, index]).random(5)
    return SampleChoices(
        drop_prompt=bool(u[0] < proportion_empty_prompts),
        crop=(float(u[1]), float(u[2])) if random_crop else (0.5, 0.5),
        flip=bool(random_flip and u[3] < 0.5),
        caption_u=float(u[4]),
    )


def pick_caption(caption: Any, u: float) -> str:
    """One caption from a stored caption value: a string, a list of strings, or None ("")."""
    if caption is None:
        return ""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, Sequence) and not isinstance(caption, bytes):
        return str(caption[int(u * len(caption))]) if len(caption) else ""
    raise TypeError(f"a caption must be a string or a list of strings, got {caption!r}")


@dataclass
class _Pending:
    """A submitted batch: its decode tasks and the arrays they fill."""

    epoch: int
    batch: int
    positions: np.ndarray  # positions in the epoch order, before wrapping (for the mask)
    futures: list[Future] | None
    results: list[tuple[int, str, int, Any, Any]] | None  # filled directly when decoding inline
    pixels: np.ndarray | None  # None: the loader reads no target images
    conditions: np.ndarray


@dataclass
class _Failure:
    """An exception raised on the producer thread, handed to the consumer."""

    error: BaseException


_END = object()  # the producer has produced num_epochs epochs


class Loader:
    """Iterate over decoded, augmented, tokenized batches of this process's share.

    Each item is a dict of numpy arrays for `global_batch_size // process_count` rows:

    - ``pixel_values``: (n, R, R, 3) uint8 (or uint16 on 0..65535, see the module
      docstring; float32 in [-1, 1] with ``image_dtype="float32"``), the target images;
    - ``conditioning_pixel_values``: (n, R, R, C) uint8 / uint16 (float32 in [0, 1] with
      ``condition_dtype="float32"``), the conditions;
    - ``input_ids``: (n, L) int32 (SDXL's two tokenizers: (n, 2, L)) if `tokenize` is
      given, else ``captions``: list of n str
      (after prompt dropout: a dropped prompt is "");
    - ``time_ids``: (n, 6) float32 with ``time_ids=True``: SDXL's size numbers;
    - ``index``: (n,) int64, the dataset rows used (after bad-sample replacement);
    - ``mask``: (n,) bool, only with ``drop_last=False``: False for the rows that pad the
      last, short batch of an epoch (they repeat rows from the epoch's start, so every batch
      has the same shape).

    Iteration runs over epochs without end unless `num_epochs` is given. Call `close()` (or
    use ``with Loader(...) as loader:``) to stop the threads.

    Attributes:
      position: where the next batch comes from, JSON-serialisable; store it in a checkpoint
        and pass it back as `start_position` to resume at exactly the next batch.
      wait_seconds: total time `__next__` spent waiting for data (decode not yet finished).
      skipped: bad samples this process replaced (``on_bad_sample="skip"``), including those
        counted before a resume.
      steps_per_epoch: batches per epoch.
    """

    def __init__(
        self,
        dataset: Any,
        global_batch_size: int,
        resolution: int,
        seed: int,
        proportion_empty_prompts: float = 0.5,
        conditioning_channels: int = 3,
        random_crop: bool = False,
        random_flip: bool = False,
        on_bad_sample: str = "error",
        num_workers: int = 2,
        prefetch: int = 2,
        process_index: int = 0,
        process_count: int = 1,
        tokenize: Callable[[list[str]], np.ndarray] | None = None,
        start_position: Mapping[str, Any] | None = None,
        drop_last: bool = True,
        num_epochs: int | None = None,
        image_dtype: str = "auto",
        condition_dtype: str = "auto",
        images: bool = True,
        time_ids: bool = False,
    ):
        """Set up the loader; no thread starts before the first batch is asked for.

        Args:
          dataset: records {image, conditioning_image, caption} indexable by int with a
            length: what `open_dataset` returns, any `datasets.Dataset` with those columns,
            a list of dicts; or a path, which is opened with `open_dataset`.
          global_batch_size: rows per batch summed over all processes.
          resolution: side R of the square images.
          seed: the data seed (>= 0): order, dropout, crops, flips and caption choice.
          proportion_empty_prompts: probability that a caption is replaced by "".
          conditioning_channels: 3 (RGB) or 1 (grayscale) conditions.
          random_crop: random instead of centre crops.
          random_flip: flip horizontally with probability 0.5.
          on_bad_sample: "error" raises `BadSampleError` from `__next__`; "skip" replaces a
            bad sample by the next good one in the epoch order and counts it in `skipped`.
          num_workers: decode threads; 0 decodes inline in `__next__` (no threads at all).
          prefetch: submitted batches queued ahead of the consumer (>= 1).
          process_index: this process's index p.
          process_count: the number of processes P; must divide `global_batch_size`.
          tokenize: list of captions -> (n, L) integer array, called by the worker threads
            with one caption at a time, one call at a time (a lock): a transformers 5 CLIP
            tokenizer keeps padding and truncation as state of its Rust backend, and two
            threads calling `cn_jax.tokenizer.tokenize` at once got unpadded ids back.
            Without it batches carry the captions as strings.
          start_position: a `position` from an earlier run, to resume from.
          drop_last: drop an epoch's last, short batch; False pads it (see ``mask``).
          num_epochs: stop after this many epochs (counted from epoch 0); None: never stop.
          image_dtype, condition_dtype: how the target images and the conditions travel:
            "uint8", "uint16", "float32" (model ranges, made on the host), or "auto" (uint16
            if one of the first `PROBE_ROWS` rows is deeper than 8 bits, else uint8).
          images: False: do not decode the target images (only their sizes are read, for
            the condition's geometry) and leave ``pixel_values`` out of the batches; for
            training on cached latents.
          time_ids: add ``time_ids`` (n, 6) float32 to the batches: SDXL's size numbers of
            each sample, its stored image's (height, width), the crop's (top, left) and the
            target (R, R) (`transforms.size_numbers`), from the crop and flip used.

        Raises:
          ValueError: an argument is out of range, the dataset is smaller than the global
            batch, or `start_position` does not belong to this dataset and batch size.
        """
        if isinstance(dataset, str | os.PathLike):
            dataset = open_dataset(dataset)
        columns = getattr(dataset, "column_names", None)
        if columns is not None and not set(RECORD_COLUMNS) <= set(columns):
            raise ValueError(
                f"the dataset has columns {columns}, not {list(RECORD_COLUMNS)}; open it "
                "with cn_jax.data.open_dataset, which names and normalises them"
            )
        num_examples = len(dataset)
        _check(
            isinstance(seed, int | np.integer) and seed >= 0,
            f"seed must be an int >= 0, got {seed!r}",
        )
        _check(global_batch_size >= 1, f"global_batch_size must be >= 1, got {global_batch_size}")
        _check(resolution >= 1, f"resolution must be >= 1, got {resolution}")
        _check(
            0.0 <= proportion_empty_prompts <= 1.0,
            f"proportion_empty_prompts must lie in [0, 1], got {proportion_empty_prompts}",
        )
        _check(
            conditioning_channels in (1, 3),
            f"conditioning_channels must be 1 or 3, got {conditioning_channels}",
        )
        _check(
            on_bad_sample in ON_BAD_SAMPLE,
            f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}",
        )
        _check(num_workers >= 0, f"num_workers must be >= 0, got {num_workers}")
        _check(prefetch >= 1, f"prefetch must be >= 1, got {prefetch}")
        _check(
            process_count >= 1 and 0 <= process_index < process_count,
            f"process_index {process_index} is not in [0, process_count={process_count})",
        )
        _check(
            global_batch_size % process_count == 0,
            f"global_batch_size {global_batch_size} is not divisible by process_count "
            f"{process_count}",
        )
        _check(num_epochs is None or num_epochs >= 1, f"num_epochs must be >= 1, got {num_epochs}")
        for name, value in (("image_dtype", image_dtype), ("condition_dtype", condition_dtype)):
            _check(value in PIXEL_DTYPES, f"{name} must be one of {PIXEL_DTYPES}, got {value!r}")
        _check(
            num_examples >= global_batch_size,
            f"the dataset has {num_examples} examples, fewer than global_batch_size "
            f"{global_batch_size}: use a smaller batch or more data",
        )

        self.dataset = dataset
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.resolution = resolution
        self.seed = int(seed)
        self.proportion_empty_prompts = proportion_empty_prompts
        self.conditioning_channels = conditioning_channels
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.on_bad_sample = on_bad_sample
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.process_index = process_index
        self.process_count = process_count
        self.tokenize = tokenize
        self.drop_last = drop_last
        self.num_epochs = num_epochs
        _check(
            (image_dtype == "float32") == (condition_dtype == "float32"),
            "image_dtype and condition_dtype are float32 together or not at all",
        )
        _check(
            images or image_dtype != "float32",
            "images=False sends conditions as integers: not with float32 transport",
        )
        self.images = images
        self.time_ids = time_ids
        self.image_dtype = self._transport(image_dtype, "image") if images else np.dtype("uint8")
        self.condition_dtype = self._transport(condition_dtype, "conditioning_image")
        self._quantised_warned = False
        self._tokenize_lock = threading.Lock()
        if drop_last:
            self.steps_per_epoch = num_examples // global_batch_size
        else:
            self.steps_per_epoch = math.ceil(num_examples / global_batch_size)

        self._epoch, self._batch, self.skipped = 0, 0, 0
        if start_position is not None:
            self._epoch, self._batch, self.skipped = self._check_position(start_position)
        self.wait_seconds = 0.0

        self._orders: dict[int, np.ndarray] = {}  # epoch -> order; only the producer writes
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._producer: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._error: BaseException | None = None
        self._closed = False

    # ------------------------------------------------------------------ public

    @property
    def position(self) -> dict[str, int]:
        """Where the next batch comes from: ``{"epoch", "batch", "skipped"}`` plus the seed,
        dataset size and global batch size it is only valid for (checked on resume)."""
        return {
            "epoch": self._epoch,
            "batch": self._batch,
            "skipped": self.skipped,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size,
        }

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("the loader is closed")
        if self._error is not None:
            # After a failure the producer has moved on; do not pretend the stream continues.
            raise RuntimeError("the loader failed earlier; see the previous error") from (
                self._error
            )
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        try:
            start = time.perf_counter()
            if self.num_workers == 0:
                pending = self._submit(self._epoch, self._batch)
            else:
                self._start_threads()
                pending = self._queue.get()
                if pending is _END:
                    raise StopIteration
                if isinstance(pending, _Failure):
                    raise pending.error
                pending.results = [f.result() for f in pending.futures]
            self.wait_seconds += time.perf_counter() - start
            out = self._finish(pending)
        except StopIteration:
            raise
        except BaseException as e:
            self._error = e
            raise
        self._epoch, self._batch = self._advance(self._epoch, self._batch)
        return out

    def close(self) -> None:
        """Stop the producer and worker threads (idempotent); the loader cannot be reused."""
        self._closed = True
        self._stop.set()
        if self._producer is not None:
            while self._producer.is_alive():
                self._drain()  # unblock a producer waiting to put
                self._producer.join(timeout=0.05)
            self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _check_position(self, position: Mapping[str, Any]) -> tuple[int, int, int]:
        missing = [k for k in POSITION_KEYS if k not in position]
        if missing:
            raise ValueError(f"start_position {dict(position)} lacks {missing}")
        for key, mine in (
            ("seed", self.seed),
            ("num_examples", self.num_examples),
            ("global_batch_size", self.global_batch_size),
        ):
            if key in position and position[key] != mine:
                raise ValueError(
                    f"start_position has {key}={position[key]}, but this loader has {key}="
                    f"{mine}: the order would differ, so it cannot resume exactly"
                )
        epoch, batch, skipped = (int(position[k]) for k in POSITION_KEYS)
        if epoch < 0 or not 0 <= batch < self.steps_per_epoch or skipped < 0:
            raise ValueError(
                f"start_position {dict(position)} is out of range (epochs >= 0, batch in "
                f"[0, {self.steps_per_epoch}))"
            )
        return epoch, batch, skipped

    def _transport(self, dtype: str, column: str) -> np.dtype:
        """The dtype a column travels in; "auto" reads the first rows' depth."""
        if dtype != "auto":
            return np.dtype(dtype)
        for index in range(min(PROBE_ROWS, self.num_examples)):
            try:
                value = self.dataset[index][column]
            except Exception:  # a bad row: reported where it is used, by on_bad_sample
                continue
            if source_is_deep(value):
                return np.dtype(np.uint16)
        return np.dtype(np.uint8)

    def _advance(self, epoch: int, batch: int) -> tuple[int, int]:
        batch += 1
        return (epoch + 1, 0) if batch == self.steps_per_epoch else (epoch, batch)

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            order = epoch_order(self.seed, epoch, self.num_examples)
            # Keep the current and next epoch only; pending batches hold their own reference.
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order
        return order

    def _submit(self, epoch: int, batch: int) -> _Pending:
        """Allocate the batch arrays and decode (inline or on the pool) this process's rows."""
        n, r = self.local_batch_size, self.resolution
        first = batch * self.global_batch_size + self.process_index * n
        positions = np.arange(first, first + n)
        pixels = np.empty((n, r, r, 3), self.image_dtype) if self.images else None
        conditions = np.empty((n, r, r, self.conditioning_channels), self.condition_dtype)
        order = self._order(epoch)
        pending = _Pending(epoch, batch, positions, None, None, pixels, conditions)
        args = [(epoch, order, int(j), pixels, conditions, row) for row, j in enumerate(positions)]
        if self._pool is None:
            pending.results = [self._load(*a) for a in args]
        else:
            pending.futures = [self._pool.submit(self._load, *a) for a in args]
        return pending

    def _load(
        self,
        epoch: int,
        order: np.ndarray,
        position: int,
        pixels: np.ndarray,
        conditions: np.ndarray,
        row: int,
    ) -> tuple[int, str, int, Any, Any]:
        """Decode the sample at `position` of the epoch order into `row` of the batch.

        Returns (dataset index used, caption after dropout, samples skipped before it, its
        token ids or None, its size numbers or None): the caption is tokenized here, on the
        worker thread.
        """
        n = len(order)
        for attempt in range(n):
            # Positions past the end (padding of a short last batch) wrap to the start.
            index = int(order[(position + attempt) % n])
            try:
                record = read_record(self.dataset, index)
                choices = sample_choices(
                    self.seed,
                    epoch,
                    index,
                    self.proportion_empty_prompts,
                    self.random_crop,
                    self.random_flip,
                )
                pair = (record["image"], record["conditioning_image"], self.resolution)
                geometry = dict(
                    conditioning_channels=self.conditioning_channels, crop=choices.crop,
                    flip=choices.flip, row=index,
                )  # fmt: skip
                if self.image_dtype == np.float32 and self.condition_dtype == np.float32:
                    pixels[row], conditions[row] = preprocess_pair(*pair, **geometry)
                else:
                    image, conditions[row], quantised = preprocess_pair_pixels(
                        *pair, **geometry, image_dtype=self.image_dtype,
                        condition_dtype=self.condition_dtype, target=self.images,
                    )  # fmt: skip
                    if pixels is not None:
                        pixels[row] = image
                    if quantised and not self._quantised_warned:
                        self._quantised_warned = True
                        log.warning(
                            "row %d is deeper than 8 bits but this run sends its images as "
                            "uint8 (chosen from the first rows): rounded to 8 bits; set "
                            "image_dtype / condition_dtype to uint16 to keep the depth",
                            index,
                        )
                sizes = None
                if self.time_ids:
                    size = image_size(record["image"], row=index, column="image")
                    sizes = size_numbers(size, self.resolution, choices.crop, choices.flip)
            except BadSampleError:
                if self.on_bad_sample == "error":
                    raise
                continue
            caption = (
                "" if choices.drop_prompt else pick_caption(record["caption"], choices.caption_u)
            )
            ids = None
            if self.tokenize is not None:
                with self._tokenize_lock:  # one call at a time: see `__init__`'s `tokenize`
                    ids = np.asarray(self.tokenize([caption]))
            return index, caption, attempt, ids, sizes
        raise BadSampleError(f"no sample of the {n} in the dataset could be decoded")

    def _finish(self, pending: _Pending) -> dict[str, Any]:
        """Turn a completed batch into the output dict (its rows tokenized by the workers)."""
        indices, captions, skipped, row_ids, sizes = zip(*pending.results)
        out: dict[str, Any] = {"conditioning_pixel_values": pending.conditions}
        if pending.pixels is not None:
            out["pixel_values"] = pending.pixels
        if self.tokenize is not None:
            shapes = {r.shape for r in row_ids}
            if len(shapes) != 1 or len(next(iter(shapes))) < 2 or next(iter(shapes))[0] != 1:
                raise ValueError(
                    f"tokenize returned shapes {sorted(shapes)} for one caption each; "
                    "expected (1, length) (SDXL's two tokenizers: (1, 2, length)), the same "
                    "for every caption"
                )
            out["input_ids"] = np.concatenate(row_ids).astype(np.int32)
        else:
            out["captions"] = list(captions)
        if self.time_ids:
            out["time_ids"] = np.stack(sizes)
        out["index"] = np.asarray(indices, np.int64)
        if not self.drop_last:
            out["mask"] = pending.positions < self.num_examples
        self.skipped += sum(skipped)
        return out

    def _start_threads(self) -> None:
        if self._producer is not None:
            return
        self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="cn_jax-decode")
        self._producer = threading.Thread(
            target=self._produce,
            args=(self._epoch, self._batch),
            name="cn_jax-loader",
            daemon=True,
        )
        self._producer.start()

    def _produce(self, epoch: int, batch: int) -> None:
        """Producer thread: submit batches in order, keeping `prefetch` of them queued."""
        try:
            while not self._stop.is_set():
                if self.num_epochs is not None and epoch >= self.num_epochs:
                    self._put(_END)
                    return
                self._put(self._submit(epoch, batch))
                epoch, batch = self._advance(epoch, batch)
        except BaseException as e:  # hand any failure to the consumer instead of dying silently
            self._put(_Failure(e))

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Pending) and item.futures:
                for f in item.futures:
                    f.cancel()


def read_record(dataset: Any, index: int) -> Mapping[str, Any]:
    """Row `index` of the dataset; any failure to read it (e.g. a `datasets.Image` column
    that does not decode) is the row's `BadSampleError`."""
    try:
        return dataset[index]
    except Exception as e:
        raise BadSampleError(f"row {index}: cannot read the record: {e}") from e


def prefetch(items: Iterator[T], size: int = 2) -> Iterator[T]:
    """Yield `items` in order, keeping `size` of them produced ahead of the consumer.

    Training wraps an iterator that puts each batch on the devices: the transfer is
    asynchronous, so the next `size` batches' copies overlap the running step instead of
    starting when it ends.
    """
    buffer: collections.deque = collections.deque()
    for item in items:
        buffer.append(item)
        if len(buffer) > size:
            yield buffer.popleft()
    while buffer:
        yield buffer.popleft()


def check_first_rows(
    dataset: Any,
    resolution: int,
    conditioning_channels: int = 3,
    on_bad_sample: str = "error",
    rows: int = 4,
) -> None:
    """Decode the first `rows` samples as training will (centre crop, no flip), so a
    dataset whose images cannot be read fails in a second, before minutes of model
    set-up. With `on_bad_sample="error"` the first bad row raises its
    `BadSampleError`; with "skip" only rows that are all bad do (training skips some).
    """
    errors = []
    n = min(rows, len(dataset))
    for index in range(n):
        try:
            record = read_record(dataset, index)
            preprocess_pair(
                record["image"], record["conditioning_image"], resolution,
                conditioning_channels=conditioning_channels, row=index,
            )  # fmt: skip
        except BadSampleError as e:
            if on_bad_sample == "error":
                raise
            errors.append(e)
    if n and len(errors) == n:
        raise BadSampleError(f"none of the first {n} samples can be decoded: {errors[0]}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
