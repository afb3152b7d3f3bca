"""Open a local ControlNet training set, in any of the layouts people ship, as one table.

`open_dataset` reads, with Hugging Face `datasets` and never the network:

- **fill50k**: a folder with `prompt.json`, one JSON object per line
  ``{"source": "source/0.png", "target": "target/0.png", "prompt": "..."}`` (lllyasviel's
  layout; source = condition, target = image, prompt = caption);
- **imagefolder**: a folder with `metadata.jsonl`, one JSON object per line whose columns
  (named by the arguments) hold image paths relative to the folder and the caption. As in
  HF's imagefolder, `file_name` stands in for a missing image column and `<column>_file_name`
  for any missing image column;
- **disk**: a `Dataset.save_to_disk` folder (`datasets.load_from_disk`; a `DatasetDict` gives
  its `split`), whose image columns are `datasets.Image` (embedded bytes or paths), raw bytes
  or path strings;
- **parquet**: a `.parquet` file or a folder of them (`Dataset.from_parquet`, which caches an
  Arrow copy under `cache_dir`), with the same column kinds as **disk**.

Every format comes back as a `datasets.Dataset` with exactly three columns:

- ``image``, ``conditioning_image``: an absolute file path (`str`), raw bytes, or a
  `datasets.Image(decode=False)` dict ``{"bytes", "path"}``. Nothing is decoded here:
  decoding happens on the loader's worker threads, where a bad file becomes a
  `BadSampleError` naming it;
- ``caption``: a string or a list of strings (the loader picks one per sample).

Security: datasets come from strangers, so a path stored in the data is trusted only if it
stays inside the dataset folder. An absolute path, or one that leaves the folder through
``..`` or a symlink (checked on the fully resolved path), is refused at open time with a
`DatasetError` naming the file, the row and the path. Embedded image bytes carry no such
risk and their informational ``path`` is ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath
from typing import Any

import datasets
import pyarrow.compute as pc

FORMATS = ("auto", "fill50k", "imagefolder", "disk", "parquet")
RECORD_COLUMNS = ("image", "conditioning_image", "caption")
FILL50K_INDEX = "prompt.json"
IMAGEFOLDER_INDEX = "metadata.jsonl"
# Files `save_to_disk` writes: a Dataset folder has the first two, a DatasetDict the third.
DISK_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")


class DatasetError(ValueError):
    """A dataset is malformed or unsafe: bad index line, missing column, unsafe image path.

    The message names the file (and row) at fault. It subclasses `ValueError` because the
    problem lies in the data handed to cn_jax, not in the program.
    """


def open_dataset(
    path: str | os.PathLike,
    format: str = "auto",
    image_column: str = "image",
    conditioning_image_column: str = "conditioning_image",
    caption_column: str = "text",
    *,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Open a local training set as a table of {image, conditioning_image, caption} records.

    Args:
      path: the dataset folder, or a `.parquet` / `prompt.json` / `metadata.jsonl` file.
      format: "auto" (detect from the files present), "fill50k", "imagefolder", "disk" or
        "parquet".
      image_column: the column holding the target image (ignored for fill50k: "target").
      conditioning_image_column: the column holding the condition (fill50k: "source").
      caption_column: the column holding the caption, a string or a list of strings
        (fill50k: "prompt").
      split: the split to take from a `DatasetDict` saved to disk.
      cache_dir: where `datasets` keeps the Arrow copy of parquet files (default: its own
        cache, `HF_DATASETS_CACHE`).

    Returns:
      A `datasets.Dataset` with columns ``image``, ``conditioning_image`` (absolute path,
      bytes or ``{"bytes", "path"}`` dict) and ``caption`` (string or list of strings).

    Raises:
      FileNotFoundError: `path` does not exist.
      DatasetError: the format cannot be detected, a column is missing or of an unsupported
        type, an index line is malformed, or an image path is absolute or escapes the
        dataset folder (the message names the file, the row and the path).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset {str(p)!r} does not exist")
    if format not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}; expected one of {FORMATS}")
    if len({image_column, conditioning_image_column, caption_column}) < 3:
        raise DatasetError(
            f"image_column={image_column!r}, conditioning_image_column="
            f"{conditioning_image_column!r} and caption_column={caption_column!r} must differ"
        )
    if format == "auto":
        format = detect_format(p)
    columns = (image_column, conditioning_image_column, caption_column)
    if format == "fill50k":
        index = p if p.is_file() else p / FILL50K_INDEX
        return _from_json_lines(index, ("target", "source", "prompt"), fallbacks=False)
    if format == "imagefolder":
        index = p if p.is_file() else p / IMAGEFOLDER_INDEX
        return _from_json_lines(index, columns, fallbacks=True)
    if format == "disk":
        return _from_disk(p, columns, split)
    return _from_parquet(p, columns, cache_dir)


def detect_format(path: str | os.PathLike) -> str:
    """Name the layout of a dataset path: "fill50k", "imagefolder", "disk" or "parquet".

    A folder is tried in that order (an index file wins over stray parquet files).

    Raises:
      DatasetError: nothing recognisable is there (the message lists what was looked for).
    """
    p = Path(path)
    if p.is_file():
        if p.suffix == ".parquet":
            return "parquet"
        if p.name == FILL50K_INDEX:
            return "fill50k"
        if p.name == IMAGEFOLDER_INDEX:
            return "imagefolder"
    elif p.is_dir():
        if (p / FILL50K_INDEX).is_file():
            return "fill50k"
        if (p / IMAGEFOLDER_INDEX).is_file():
            return "imagefolder"
        if any((p / m).is_file() for m in DISK_MARKERS):
            return "disk"
        if _parquet_files(p):
            return "parquet"
    raise DatasetError(
        f"cannot tell the dataset format of {str(p)!r}: expected a folder with "
        f"{FILL50K_INDEX} (fill50k), {IMAGEFOLDER_INDEX} (imagefolder), a save_to_disk "
        f"folder ({' / '.join(DISK_MARKERS)}) or .parquet files"
    )


def resolve_inside(root: str, value: Any, where: str) -> str:
    """Resolve a stored relative image path against the dataset folder, refusing escapes.

    Args:
      root: the dataset folder, already resolved (`os.path.realpath`).
      value: the stored path.
      where: the file and row it came from, for the error message.

    Returns:
      The absolute, fully resolved path (symlinks followed).

    Raises:
      DatasetError: the value is not a non-empty string, is absolute (POSIX or Windows
        style), or resolves outside `root` (through ``..`` or a symlink).
    """
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where}: image path must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise DatasetError(f"{where}: image path {value!r} contains a NUL byte")
    if os.path.isabs(value) or PureWindowsPath(value).anchor:
        raise DatasetError(
            f"{where}: refusing absolute image path {value!r}; paths must be relative to "
            f"the dataset folder {root!r}"
        )
    # realpath resolves every symlink and '..' in order, so 'link/../x' and a symlinked file
    # are judged by where they really lead.
    resolved = os.path.realpath(os.path.join(root, value))
    if os.path.commonpath([root, resolved]) != root:
        raise DatasetError(
            f"{where}: refusing image path {value!r}: it resolves to {resolved!r}, outside "
            f"the dataset folder {root!r}"
        )
    return resolved


# --------------------------------------------------------------------------- JSON lines


def _read_json_lines(index: Path) -> Iterator[tuple[int, int, dict]]:
    """Yield (row, line number, object) for each non-blank line of a JSON-lines file."""
    row = 0
    with open(index, "rb") as f:  # decoded line by line: an error names its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(
                    f"{index}: line {lineno} (row {row}) is not UTF-8 text: byte "
                    f"{raw[e.start : e.start + 1]!r} at column {e.start + 1}"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{index}: line {lineno} (row {row}) is not JSON: {e}") from e
            if not isinstance(obj, dict):
                raise DatasetError(
                    f"{index}: line {lineno} (row {row}) is not a JSON object: {line.strip()!r}"
                )
            yield row, lineno, obj
            row += 1


def _from_json_lines(
    index: Path, columns: tuple[str, str, str], fallbacks: bool
) -> datasets.Dataset:
    """Build the record table from a fill50k `prompt.json` or an imagefolder `metadata.jsonl`."""
    if not index.is_file():
        raise DatasetError(f"dataset index {str(index)!r} does not exist")
    root = os.path.realpath(index.parent)
    names: tuple[str, str, str] | None = None
    out: dict[str, list] = {c: [] for c in RECORD_COLUMNS}
    for row, lineno, obj in _read_json_lines(index):
        where = f"{index}: row {row} (line {lineno})"
        if names is None:  # column names are fixed by the first row, as in HF imagefolder
            names = _pick_columns(obj, columns, fallbacks, where)
        missing = [n for n in names if n not in obj]
        if missing:
            raise DatasetError(f"{where}: missing key(s) {missing}; it has {sorted(obj)}")
        for out_name, name in zip(RECORD_COLUMNS[:2], names[:2]):
            out[out_name].append(resolve_inside(root, obj[name], f"{where}, {name!r}"))
        out["caption"].append(_check_caption(obj[names[2]], f"{where}, {names[2]!r}"))
    if names is None:
        raise DatasetError(f"{index}: no records")
    captions = out["caption"]
    if any(isinstance(c, list) for c in captions):
        # Arrow needs one type per column: a string caption becomes a list of one.
        out["caption"] = [c if isinstance(c, list) else [c] for c in captions]
        caption_feature: Any = datasets.List(datasets.Value("string"))
    else:
        caption_feature = datasets.Value("string")
    features = datasets.Features(
        image=datasets.Value("string"),
        conditioning_image=datasets.Value("string"),
        caption=caption_feature,
    )
    return datasets.Dataset.from_dict(out, features=features)


def _pick_columns(
    obj: dict, columns: tuple[str, str, str], fallbacks: bool, where: str
) -> tuple[str, str, str]:
    """Map the requested column names to the keys this index uses (HF `file_name` fallbacks)."""
    picked = []
    for i, name in enumerate(columns):
        candidates = [name]
        if fallbacks and i < 2:
            candidates.append(f"{name}_file_name")
            if i == 0:
                candidates.append("file_name")
        found = next((c for c in candidates if c in obj), None)
        if found is None:
            raise DatasetError(
                f"{where}: no column {' / '.join(map(repr, candidates))}; the row has "
                f"{sorted(obj)} (choose columns with image_column=, "
                "conditioning_image_column=, caption_column=)"
            )
        picked.append(found)
    return picked[0], picked[1], picked[2]


def _check_caption(value: Any, where: str) -> str | list[str]:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise DatasetError(f"{where}: a caption must be a string or a list of strings, got {value!r}")


# --------------------------------------------------------------------------- Arrow tables


def _from_disk(path: Path, columns: tuple[str, str, str], split: str) -> datasets.Dataset:
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DatasetError(
                f"{path}: the saved DatasetDict has splits {sorted(ds)}, not {split!r} "
                "(choose one with split=)"
            )
        ds = ds[split]
    if not isinstance(ds, datasets.Dataset):
        raise DatasetError(f"{path}: load_from_disk gave a {type(ds).__name__}, not a Dataset")
    return _normalise_table(ds, os.path.realpath(path), columns, str(path))


def _parquet_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*.parquet") if f.is_file())


def _from_parquet(
    path: Path, columns: tuple[str, str, str], cache_dir: str | os.PathLike | None
) -> datasets.Dataset:
    files = [path] if path.is_file() else _parquet_files(path)
    if not files:
        raise DatasetError(f"{path}: no .parquet files")
    root = path.parent if path.is_file() else path
    ds = datasets.Dataset.from_parquet(
        [str(f) for f in files], cache_dir=None if cache_dir is None else str(cache_dir)
    )
    return _normalise_table(ds, os.path.realpath(root), columns, str(path))


def _normalise_table(
    ds: datasets.Dataset, root: str, columns: tuple[str, str, str], source: str
) -> datasets.Dataset:
    """Check, resolve and rename the three columns of an Arrow-backed dataset.

    Only metadata-level operations are used (cast, rename, select, add an in-memory column of
    resolved paths), so nothing is written next to a stranger's dataset and embedded image
    bytes are never copied into Python.
    """
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DatasetError(
            f"{source}: no column(s) {missing}; the dataset has {ds.column_names} (choose "
            "columns with image_column=, conditioning_image_column=, caption_column=)"
        )
    ds = ds.select_columns(list(columns))
    for name in columns[:2]:
        ds = _normalise_image_column(ds, name, root, source)
    caption = ds.features[columns[2]]
    if not (
        _is_string(caption)
        or (
            isinstance(caption, datasets.features.features.Sequence) and _is_string(caption.feature)
        )
    ):
        raise DatasetError(
            f"{source}: caption column {columns[2]!r} has type {caption}; expected strings "
            "or lists of strings"
        )
    # Via temporary names, so that e.g. image_column="target", conditioning="image" works.
    tmp = {c: f"__cn_jax_{i}" for i, c in enumerate(columns)}
    ds = ds.rename_columns(tmp)
    ds = ds.rename_columns({tmp[c]: out for c, out in zip(columns, RECORD_COLUMNS)})
    return ds.select_columns(list(RECORD_COLUMNS))  # fixed order (add_column appends)


def _is_string(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _normalise_image_column(
    ds: datasets.Dataset, name: str, root: str, source: str
) -> datasets.Dataset:
    feature = ds.features[name]
    if isinstance(feature, datasets.Image):
        # Keep images encoded: the loader's workers decode them, in parallel, and turn a
        # corrupt one into a BadSampleError instead of failing inside `ds[i]`.
        ds = ds.cast_column(name, datasets.Image(decode=False))
        col = ds.data.column(name).combine_chunks()
        by_path = pc.is_null(col.field("bytes")).to_pylist()
        if not any(by_path):
            return ds
        # Some images are stored as paths: resolve and check those (rare: save_to_disk and
        # to_parquet embed bytes). This copies the column into Python once.
        values = col.to_pylist()
        for row, (value, ref) in enumerate(zip(values, by_path)):
            if ref:
                value["path"] = resolve_inside(
                    root, value["path"], f"{source}: row {row}, {name!r}"
                )
        return ds.remove_columns(name).add_column(
            name, values, feature=datasets.Image(decode=False)
        )
    if _is_string(feature):
        paths = ds.data.column(name).to_pylist()
        resolved = [
            resolve_inside(root, v, f"{source}: row {row}, {name!r}") for row, v in enumerate(paths)
        ]
        return ds.remove_columns(name).add_column(name, resolved, feature=datasets.Value("string"))
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        return ds
    raise DatasetError(
        f"{source}: image column {name!r} has type {feature}; expected datasets.Image, "
        "encoded bytes or relative path strings"
    )
