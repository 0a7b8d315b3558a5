"""Load a task's splits through Hugging Face ``datasets``: a hub dataset by name, or local files by split.

Local files are read by extension: ``.csv`` (undecodable bytes become U+FFFD rather than failing the run),
``.json`` / ``.jsonl`` (JSON lines, or one JSON array), ``.parquet``, and ``.txt`` (one text per line, in the
column ``"text"``). One split can be cut into several with seeded ratios, and any split capped to a seeded sample.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdistill.errors import KdistillError

if TYPE_CHECKING:
    import datasets

# extension → the `datasets` builder that reads it
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
_BUILDER_KWARGS: dict[str, dict[str, Any]] = {"csv": {"encoding_errors": "replace"}}
_RATIO_TOLERANCE = 1e-6


class DataError(KdistillError, ValueError):
    """Data that cannot be used as given: a missing file, an unknown format, an empty split, a missing column."""


def load_splits(
    source: str | None = None,
    *,
    files: Mapping[str, str | Path] | None = None,
    subset: str | None = None,
    split_ratios: Mapping[str, float] | None = None,
    seed: int = 0,
    limit: Mapping[str, int] | None = None,
) -> datasets.DatasetDict:
    """The splits of a dataset as a ``datasets.DatasetDict``.

    Args:
        source: a hub dataset name (``"imdb"``, ``"glue"``), loaded with ``datasets.load_dataset`` (needs network
            or a local cache). Exactly one of ``source`` and ``files`` is given.
        files: split name → local file (``{"train": "train.csv", "validation": "dev.jsonl"}``); the format comes
            from each file's extension (see ``SUPPORTED_EXTENSIONS``), so splits may mix formats.
        subset: the hub dataset's configuration (``"sst2"`` of ``"glue"``).
        split_ratios: cut the one loaded split into new ones, e.g. ``{"train": 0.8, "validation": 0.1,
            "test": 0.1}``; the ratios are positive and sum to 1; rows are shuffled with ``seed`` first.
        seed: seed of every shuffle here.
        limit: split name → maximum rows; a split over its cap keeps a seeded random sample of that many rows.

    Raises:
        DataError: a missing file (naming the split and path), an unknown extension (listing the supported ones),
            an empty split (naming it), ratios that are not positive or do not sum to 1 (naming them), a limit
            for a split that does not exist, or a hub dataset that cannot be loaded.
    """
    import datasets

    if (source is None) == (files is None):
        raise DataError("give exactly one of source (a hub dataset name) and files (split -> local path)")
    if source is not None:
        dataset_dict = _load_hub(source, subset)
    else:
        assert files is not None
        if not files:
            raise DataError("files is empty; map at least one split name to a file")
        dataset_dict = datasets.DatasetDict({split: _load_file(split, Path(path)) for split, path in files.items()})
    for split, dataset in dataset_dict.items():
        if len(dataset) == 0:
            raise DataError(f"split {split!r} is empty")
    if split_ratios is not None:
        dataset_dict = split_by_ratios(dataset_dict, split_ratios, seed)
    if limit is not None:
        dataset_dict = apply_limits(dataset_dict, limit, seed)
    return dataset_dict


def check_columns(dataset: Any, required: Mapping[str, str | None]) -> None:
    """Check that every required column exists.

    Args:
        dataset: a ``datasets.Dataset`` or ``DatasetDict`` (each split is checked).
        required: role → column name, e.g. ``{"text_column": "sentence", "label_column": "label"}``; roles
            mapped to None (an optional column that is not used) are skipped.

    Raises:
        DataError: naming the missing column, its role, the split (for a ``DatasetDict``) and the columns that exist.
    """
    if hasattr(dataset, "column_names") and isinstance(dataset.column_names, Mapping):  # a DatasetDict
        for split, part in dataset.items():
            _check_split_columns(part.column_names, required, f" of split {split!r}")
        return
    _check_split_columns(list(dataset.column_names), required, "")


def _check_split_columns(columns: list[str], required: Mapping[str, str | None], where: str) -> None:
    for role, column in required.items():
        if column is not None and column not in columns:
            raise DataError(
                f"{role} {column!r} is not a column of the dataset{where}; its columns are: {', '.join(columns)}"
            )


def _load_hub(source: str, subset: str | None) -> Any:
    import datasets

    try:
        loaded = datasets.load_dataset(source, subset)
    except (ConnectionError, FileNotFoundError, ValueError, OSError) as error:
        where = f"{source!r}" + (f" (subset {subset!r})" if subset else "")
        raise DataError(f"could not load the dataset {where}: {error}") from error
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _load_file(split: str, path: Path) -> Any:
    import datasets

    if not path.is_file():
        raise DataError(f"the file for split {split!r} does not exist: {path}")
    extension = path.suffix.lower()
    builder = SUPPORTED_EXTENSIONS.get(extension)
    if builder is None:
        raise DataError(
            f"the file for split {split!r} ({path}) has the unsupported extension {extension or '(none)'!r}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if path.stat().st_size == 0:
        raise DataError(f"split {split!r} is empty (the file {path} has no bytes)")
    try:
        # read as "train" whatever the split's name: `datasets` reserves some names ("all") and restricts others
        return datasets.load_dataset(
            builder, data_files={"train": str(path)}, split="train", **_BUILDER_KWARGS.get(builder, {})
        )
    except ValueError as error:  # `datasets` refuses to build a split with no rows
        if "corresponds to no data" not in str(error):
            raise
        raise DataError(f"split {split!r} is empty (the file {path} has no rows)") from error
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error
        raise DataError(f"could not read the file for split {split!r} ({path}) as {builder}: {cause}") from error


def split_by_ratios(dataset_dict: Any, ratios: Mapping[str, float], seed: int) -> Any:
    import datasets

    if len(dataset_dict) != 1:
        raise DataError(
            f"split_ratios cut one split into several, but the data has splits {list(dataset_dict)}; "
            "give one file (or pick one split) to cut"
        )
    shown = ", ".join(f"{name}={value}" for name, value in ratios.items())
    if not ratios or any(not isinstance(v, (int, float)) or v <= 0 for v in ratios.values()):
        raise DataError(f"split_ratios must be positive numbers; got {shown or '(none)'}")
    if not math.isclose(sum(ratios.values()), 1.0, abs_tol=_RATIO_TOLERANCE):
        raise DataError(f"split_ratios must sum to 1; {shown} sum to {sum(ratios.values()):g}")
    ((source_split, dataset),) = dataset_dict.items()
    shuffled = dataset.shuffle(seed=seed)
    sizes = _largest_remainder(len(shuffled), list(ratios.values()))
    parts, start = {}, 0
    for (name, ratio), size in zip(ratios.items(), sizes, strict=True):
        if size == 0:
            raise DataError(
                f"split {name!r} is empty: ratio {ratio} of the {len(shuffled)} rows of {source_split!r} "
                "is under one row"
            )
        parts[name] = shuffled.select(range(start, start + size))
        start += size
    return datasets.DatasetDict(parts)


def _largest_remainder(total: int, ratios: list[float]) -> list[int]:
    """Integer sizes summing to ``total``, proportional to ``ratios`` (ratios sum to 1)."""
    exact = [total * ratio for ratio in ratios]
    sizes = [math.floor(value) for value in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes


def apply_limits(dataset_dict: Any, limit: Mapping[str, int], seed: int) -> Any:
    import datasets

    out = dict(dataset_dict)
    for split, cap in limit.items():
        if split not in out:
            raise DataError(f"limit names split {split!r}, but the splits are {list(out)}")
        if not isinstance(cap, int) or cap < 1:
            raise DataError(f"limit for split {split!r} must be a positive integer, got {cap!r}")
        if len(out[split]) > cap:
            out[split] = out[split].shuffle(seed=seed).select(range(cap))
    return datasets.DatasetDict(out)
