"""Token classification (NER, chunking): word-level BIO tags, aligned to the tokenizer's pieces.

Each word's first piece carries the word's tag; its other pieces and the special tokens carry ``-100`` (no hard
loss), while knowledge distillation counts every real token (:class:`~kdistill.core.views.TokenView`).
Metrics are entity-level precision, recall and F1 over whole words; a word cut off by truncation is predicted
``"O"``.

A word-level student with its own vocabulary (a BiLSTM over a :class:`~kdistill.data.word_tokenizer.WordTokenizer`)
learns from a subword teacher word by word: each example carries both tokenizations, and the teacher, wrapped in
:class:`FirstPieceLogits` (see :meth:`TokenClassificationTask.adapt_teacher`), is read at each word's first piece,
so both sides give logits ``(B, W, C)`` over the same words.

With ``cross_tokenizer`` set (``distill.cross_tokenizer``: ``"uld"`` or ``"align"``), the teacher keeps its own
word-piece positions instead: each example carries both tokenizations with each token's character span in the
row's text, and :class:`~kdistill.distillers.cross.CrossTokenizerDistiller` pairs the two sides (by order for ULD,
by the characters they cover for ``"align"``). The rows hold pre-split words, so their text is *defined* as the
words joined by single spaces: word ``k`` starts at ``sum(len(w) + 1 for w in words[:k])``, and a token's span is
its span inside its word shifted by that start. Any student tokenizer that gives ``word_ids`` and offsets works
(a ``WordTokenizer``, or a fast subword tokenizer with another vocabulary).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdistill.core.views import TokenView
from kdistill.data.word_tokenizer import WordTokenizer
from kdistill.errors import InvalidArgumentError, KdistillError
from kdistill.eval.metrics import entity_f1, get_entities
from kdistill.tasks.base import (
    IGNORE_INDEX,
    chunks,
    column_values,
    evaluate_task,
    label_to_id,
    predict_logits,
    require_fast,
    resolve_label_names,
    rows_of,
    token_inputs,
    tokenizers_differ,
)
from kdistill.tasks.token_examples import (
    FirstPieceLogits,
    TokenCollator,
    align_labels,
    cross_tokenizer_examples,
    word_aligned_example,
)

if TYPE_CHECKING:
    import datasets

OUTSIDE_TAG = "O"


@dataclass(frozen=True)
class TokenClassificationTask:
    """Words with one tag each → a tag per word. Metrics: entity ``precision``/``recall``/``f1``, word ``accuracy``.

    Args:
        tokens_column: the words of each row (a list of strings).
        tags_column: one tag per word: names (``"B-PER"``) or ids into ``label_names``.
        label_names: the tags in id order; None infers them (see :meth:`with_label_names`). Scoring needs them.
    """

    tokens_column: str = "tokens"
    tags_column: str = "tags"
    label_names: tuple[str, ...] | None = None
    name: str = "token"
    # None: one tokenization, or a word-level student read against the teacher's first pieces; "uld" / "align":
    # the teacher keeps its own pieces and examples carry both sides' character offsets (see the module docstring)
    cross_tokenizer: str | None = None

    def __post_init__(self) -> None:
        if self.cross_tokenizer not in (None, "uld", "align"):
            raise InvalidArgumentError(f"cross_tokenizer must be 'uld', 'align' or None, got {self.cross_tokenizer!r}")

    @property
    def view(self) -> TokenView:
        """Logits ``(B, T, C)``, labels ``(B, T)``; KD over every real token."""
        return TokenView()

    @property
    def collate(self) -> TokenCollator:
        """Pads ``input_ids`` and ``labels`` (with ``-100``) to the longest example (word-aligned pairs too)."""
        return TokenCollator()

    @property
    def auto_model_class(self) -> type:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    @property
    def num_labels(self) -> int:
        """The number of tags (needs ``label_names``)."""
        if self.label_names is None:
            raise InvalidArgumentError("the task's label_names are unknown; call with_label_names(dataset) first")
        return len(self.label_names)

    def with_label_names(self, dataset: Any, label_names: Sequence[str] | None = None) -> TokenClassificationTask:
        """A copy with the tag set fixed: ``label_names``, the task's own, the ``ClassLabel`` names, or the data's."""
        names = label_names if label_names is not None else self.label_names
        return dataclasses.replace(
            self, label_names=resolve_label_names(dataset, self.tags_column, names, per_token=True)
        )

    def preprocess(
        self,
        dataset: Any,
        *,
        tokenizer: Any,
        teacher_tokenizer: Any = None,
        max_length: int | None = 128,
        label_names: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Tokenize each row's words into ``{"input_ids", ["token_type_ids"], "labels": [...], "example_id",
        "labelled_words"}``.

        ``labels`` has one entry per token: the word's tag id on its first piece, ``-100`` elsewhere;
        ``labelled_words[k]`` is the word index of the ``k``-th token whose label is not ``-100`` (words lost to
        truncation, that tokenize to nothing, or whose tag is None have none).

        With a ``WordTokenizer`` student and another ``teacher_tokenizer``, examples are word-aligned:
        ``{"student": {"input_ids"}, "teacher": {"input_ids", ["token_type_ids"], "word_starts"}, "labels",
        "example_id", "labelled_words"}`` with one student token, one label and one teacher first-piece index
        (``word_starts``) per kept word (a word is kept when the teacher's truncation keeps a piece of it).

        With ``cross_tokenizer`` set and a ``teacher_tokenizer`` given (the same one or another), examples carry
        both tokenizations of the kept words, each side with its own ``offset_mapping`` (character spans in the
        words joined by single spaces; ``(0, 0)`` for special tokens): ``{"student": {"input_ids", ...,
        "offset_mapping"}, "teacher": {"input_ids", ..., "offset_mapping", "word_starts"}, "labels", "example_id",
        "labelled_words"}``. ``labels`` follow the student's tokens (first piece of each word); ``word_starts`` gives,
        per student token, the teacher's first piece of the same word, so the teacher can still be scored on the
        student's labels (:meth:`predict` with ``inputs="teacher"``).

        Args:
            dataset: a ``datasets.Dataset`` or a list of row dicts.
            tokenizer: a fast Hugging Face tokenizer (it must give ``word_ids``) or a ``WordTokenizer``.
            teacher_tokenizer: None, the same tokenizer, or (with a ``WordTokenizer`` student) the teacher's fast
                tokenizer.
            max_length: truncation length in tokens.
            label_names: override of the task's tag set.

        Raises:
            InvalidArgumentError: a row whose words and tags differ in number, a tag outside the tag set (naming
                it, the row and the set), a slow tokenizer, or two different subword tokenizers without
                ``cross_tokenizer`` (naming both).
        """
        cross = self.cross_tokenizer is not None and teacher_tokenizer is not None
        word_aligned = not cross and tokenizers_differ(tokenizer, teacher_tokenizer)
        if word_aligned and not isinstance(tokenizer, WordTokenizer):
            raise InvalidArgumentError(
                f"token classification with two tokenizers (student: {_tokenizer_name(tokenizer)}, teacher: "
                f"{_tokenizer_name(teacher_tokenizer)}) needs a word-level student (a WordTokenizer), whose logits "
                "are compared with the teacher's at each word's first piece, or distill.cross_tokenizer ('uld' or "
                "'align') to pair the two tokenizations; otherwise a subword student must share the teacher's "
                "tokenizer"
            )
        require_fast(tokenizer, "token classification")
        if word_aligned or cross:
            require_fast(teacher_tokenizer, "token classification (the teacher's tokenizer)")
        names = resolve_label_names(dataset, self.tags_column, label_names or self.label_names, per_token=True)
        index_of = {label: i for i, label in enumerate(names)}
        words_per_row = column_values(dataset, self.tokens_column)
        tags_per_row = column_values(dataset, self.tags_column)
        tag_ids: list[list[int]] = []
        for row, (words, tags) in enumerate(zip(words_per_row, tags_per_row, strict=True)):
            if len(words) != len(tags):
                raise InvalidArgumentError(
                    f"row {row} has {len(words)} words ({self.tokens_column!r}) but {len(tags)} tags "
                    f"({self.tags_column!r})"
                )
            tag_ids.append([label_to_id(tag, index_of, row, self.tags_column) for tag in tags])
        examples: list[dict[str, Any]] = []
        truncate = max_length is not None
        for span in chunks(len(words_per_row)):
            batch_words = [list(words) for words in words_per_row[span.start : span.stop]]
            if cross:
                examples += cross_tokenizer_examples(
                    batch_words, span, tag_ids, tokenizer, teacher_tokenizer, truncate, max_length
                )
                continue
            if word_aligned:
                encoding = teacher_tokenizer(
                    batch_words, is_split_into_words=True, truncation=truncate, max_length=max_length
                )
                for offset, row in enumerate(span):
                    examples.append(
                        word_aligned_example(encoding, offset, row, batch_words[offset], tag_ids[row], tokenizer)
                    )
                continue
            encoding = tokenizer(batch_words, is_split_into_words=True, truncation=truncate, max_length=max_length)
            for offset, row in enumerate(span):
                labels, labelled_words = align_labels(encoding.word_ids(offset), tag_ids[row])
                example = token_inputs(encoding, offset)
                example.update(labels=labels, example_id=row, labelled_words=labelled_words)
                examples.append(example)
        return examples

    def adapt_teacher(self, teacher: nn.Module, *, tokenizer: Any, teacher_tokenizer: Any = None) -> nn.Module:
        """The teacher as the distiller runs it: wrapped in :class:`FirstPieceLogits` when the examples are
        word-aligned (a ``WordTokenizer`` student with another teacher tokenizer), else the teacher itself (always
        with ``cross_tokenizer``: the teacher keeps its own positions)."""
        if self.cross_tokenizer is not None:
            return teacher
        if tokenizers_differ(tokenizer, teacher_tokenizer) and not isinstance(teacher, FirstPieceLogits):
            return FirstPieceLogits(teacher)
        return teacher

    def predict(
        self, model: nn.Module, batches: Sequence[Mapping[str, Any]], *, inputs: str = "student"
    ) -> list[list[torch.Tensor]]:
        """Logits ``[(B, T, C)]`` per batch (eval mode, no gradients); a teacher reading word-aligned batches is
        read at first pieces, ``(B, W, C)``."""
        word_aligned = inputs == "teacher" and any("word_starts" in batch.get("teacher", {}) for batch in batches)
        if word_aligned and not isinstance(model, FirstPieceLogits):
            model = FirstPieceLogits(model)
        return predict_logits(model, batches, self.view, inputs=inputs)

    def word_predictions(
        self,
        logits_per_batch: Sequence[Sequence[torch.Tensor]],
        batches: Sequence[Mapping[str, Any]],
    ) -> dict[int, dict[int, int]]:
        """example_id → {word index → predicted tag id}, read at each word's first piece."""
        predicted: dict[int, dict[int, int]] = {}
        for logits, batch in zip(logits_per_batch, batches, strict=True):
            labels = torch.as_tensor(batch["labels"]).cpu()
            tag_ids = logits[0].argmax(-1)  # (B, T)
            for row, example_id in enumerate(rows_of(batch)):
                positions = (labels[row] != IGNORE_INDEX).nonzero().squeeze(-1)  # (labelled tokens,)
                words = batch["labelled_words"][row]
                predicted[example_id] = dict(zip(words, tag_ids[row, positions].tolist(), strict=True))
        return predicted

    def compute_metrics(
        self,
        logits_per_batch: Sequence[Sequence[torch.Tensor]],
        batches: Sequence[Mapping[str, Any]],
        examples_meta: Any = None,
    ) -> dict[str, float]:
        """Entity-level ``precision``, ``recall``, ``f1`` and word-level ``accuracy`` (fractions in [0, 1]).

        Args:
            logits_per_batch: per batch, the one head's logits ``(B, T, C)``.
            batches: the batches the logits came from.
            examples_meta: the source rows (the dataset given to :meth:`preprocess`): their tags are the gold,
                words lost to truncation included. None takes the gold from the batches' labels.
        """
        true_tags, pred_tags = self._tag_lists(logits_per_batch, batches, examples_meta)
        scores = entity_f1(true_tags, pred_tags)
        pairs = [
            (t, p) for gold, pred in zip(true_tags, pred_tags, strict=True) for t, p in zip(gold, pred, strict=True)
        ]
        return {
            "precision": float(scores["precision"]),
            "recall": float(scores["recall"]),
            "f1": float(scores["f1"]),
            "accuracy": sum(t == p for t, p in pairs) / max(len(pairs), 1),
        }

    def sentence_counts(
        self,
        logits_per_batch: Sequence[Sequence[torch.Tensor]],
        batches: Sequence[Mapping[str, Any]],
        examples_meta: Any = None,
    ) -> list[list[int]]:
        """Per sentence (in example order): correct, predicted and gold entities, correct words and words, whose
        sums give :meth:`compute_metrics`'s F1 and accuracy; what a paired bootstrap resamples
        (:func:`kdistill.eval.significance.paired_count_comparison`)."""
        true_tags, pred_tags = self._tag_lists(logits_per_batch, batches, examples_meta)
        counts = []
        for gold, pred in zip(true_tags, pred_tags, strict=True):
            gold_entities, pred_entities = set(get_entities(gold)), set(get_entities(pred))
            right = sum(t == p for t, p in zip(gold, pred, strict=True))
            counts.append(
                [len(gold_entities & pred_entities), len(pred_entities), len(gold_entities), right, len(gold)]
            )
        return counts

    def _tag_lists(
        self,
        logits_per_batch: Sequence[Sequence[torch.Tensor]],
        batches: Sequence[Mapping[str, Any]],
        examples_meta: Any,
    ) -> tuple[list[list[str]], list[list[str]]]:
        """The gold and the predicted tags of every sentence, in example order."""
        if self.label_names is None:
            raise InvalidArgumentError("scoring needs the task's label_names; call with_label_names(dataset) first")
        names = self.label_names
        index_of = {label: i for i, label in enumerate(names)}
        predicted = self.word_predictions(logits_per_batch, batches)
        gold_from_batches = _gold_from_batches(batches) if examples_meta is None else {}
        true_tags: list[list[str]] = []
        pred_tags: list[list[str]] = []
        for example_id in sorted(predicted):
            if examples_meta is None:
                gold_ids = gold_from_batches[example_id]
            else:
                tags = examples_meta[example_id][self.tags_column]
                gold_ids = [label_to_id(tag, index_of, example_id, self.tags_column) for tag in tags]
            gold = [names[i] if i != IGNORE_INDEX else OUTSIDE_TAG for i in gold_ids]
            words = predicted[example_id]
            true_tags.append(gold)
            pred_tags.append([names[words[w]] if w in words else OUTSIDE_TAG for w in range(len(gold))])
        if not true_tags:
            raise InvalidArgumentError("there are no rows to score")
        return true_tags, pred_tags

    def evaluate(
        self,
        model: nn.Module,
        examples: Sequence[Mapping[str, Any]],
        examples_meta: Any = None,
        *,
        batch_size: int = 32,
    ) -> dict[str, float]:
        """Batch, predict and score ``examples`` (from :meth:`preprocess`)."""
        return evaluate_task(self, model, examples, examples_meta, batch_size=batch_size)


def _tokenizer_name(tokenizer: Any) -> str:
    """A tokenizer as an error message names it: its class and where it was loaded from (or its vocabulary size)."""
    if isinstance(tokenizer, WordTokenizer):
        return repr(tokenizer)
    path = getattr(tokenizer, "name_or_path", None)
    if path:
        return f"{type(tokenizer).__name__} from {path}"
    return f"{type(tokenizer).__name__} with {len(tokenizer) if hasattr(tokenizer, '__len__') else '?'} tokens"


def _gold_from_batches(batches: Sequence[Mapping[str, Any]]) -> dict[int, list[int]]:
    gold: dict[int, list[int]] = {}
    for batch in batches:
        labels = torch.as_tensor(batch["labels"]).cpu()
        for row, example_id in enumerate(rows_of(batch)):
            ids = labels[row][labels[row] != IGNORE_INDEX].tolist()
            words = batch["labelled_words"][row]
            by_word = dict(zip(words, ids, strict=True))
            gold[example_id] = [by_word.get(w, IGNORE_INDEX) for w in range(max(words, default=-1) + 1)]
    return gold


def read_conll(path: str | Path, *, tokens_column: str = "tokens", tags_column: str = "tags") -> datasets.Dataset:
    """Read a CoNLL-style BIO file into a ``datasets.Dataset`` with a list of words and a list of tags per row.

    One token per line, the word first and the tag last (tab- or space-separated; middle columns such as POS tags
    are skipped); a blank line ends a sentence; ``-DOCSTART-`` lines are skipped.

    Raises:
        KdistillError: a missing file, or a line with a word but no tag (naming the file and line number).
    """
    import datasets

    file = Path(path)
    if not file.is_file():
        raise KdistillError(f"the CoNLL file does not exist: {file}")
    sentences: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    sentence_tags: list[str] = []
    with file.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
            fields = [field.strip() for field in fields if field.strip()]
            if not fields or fields[0] == "-DOCSTART-":
                if words:
                    sentences.append(words)
                    tags.append(sentence_tags)
                words, sentence_tags = [], []
                continue
            if len(fields) < 2:
                raise KdistillError(f"{file}:{number}: expected a word and a tag, got {line.strip()!r}")
            words.append(fields[0])
            sentence_tags.append(fields[-1])
    if words:
        sentences.append(words)
        tags.append(sentence_tags)
    return datasets.Dataset.from_dict({tokens_column: sentences, tags_column: tags})
