"""Sequence classification: one label per text or per text pair (sentiment, topic, NLI, paraphrase)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill.core.views import SequenceView
from kdistill.data.collate import PadCollator
from kdistill.errors import InvalidArgumentError
from kdistill.eval.metrics import accuracy, macro_f1
from kdistill.tasks.base import (
    IGNORE_INDEX,
    chunks,
    column_values,
    evaluate_task,
    label_to_id,
    predict_logits,
    resolve_label_names,
    token_inputs,
    tokenizers_differ,
)


@dataclass(frozen=True)
class SequenceClassificationTask:
    """Texts (or pairs of texts) → one class each. Metrics: accuracy and macro-F1.

    Args:
        text_column: the text (the premise, for pairs).
        text_pair_column: the second text (hypothesis, paraphrase candidate), or None.
        label_column: the label: a name from ``label_names`` or an id; None or a negative id marks an unlabelled
            row (label ``-100``: no loss, no metric), as in GLUE's test splits.
        label_names: the classes in id order; None infers them (see :meth:`with_label_names`).
    """

    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_names: tuple[str, ...] | None = None
    name: str = "sequence"

    @property
    def view(self) -> SequenceView:
        """Logits ``(B, C)``, labels ``(B,)``."""
        return SequenceView()

    @property
    def collate(self) -> PadCollator:
        """Pads ``input_ids`` (and a teacher's separate ``input_ids``) to the longest example."""
        return PadCollator()

    @property
    def auto_model_class(self) -> type:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    @property
    def num_labels(self) -> int:
        """The number of classes (needs ``label_names``)."""
        if self.label_names is None:
            raise InvalidArgumentError("the task's label_names are unknown; call with_label_names(dataset) first")
        return len(self.label_names)

    def with_label_names(self, dataset: Any, label_names: Sequence[str] | None = None) -> SequenceClassificationTask:
        """A copy with the label set fixed: ``label_names``, the task's, the ``ClassLabel`` names, or the data's."""
        names = label_names if label_names is not None else self.label_names
        return dataclasses.replace(self, label_names=resolve_label_names(dataset, self.label_column, names))

    def preprocess(
        self,
        dataset: Any,
        *,
        tokenizer: Any,
        teacher_tokenizer: Any = None,
        max_length: int | None = 128,
        label_names: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Tokenize each row into ``{"input_ids", ["token_type_ids"], "labels": int, "example_id": int}``.

        With a ``teacher_tokenizer`` that differs from ``tokenizer``, each example is
        ``{"student": {...}, "teacher": {...}, "labels", "example_id"}`` (two tokenizations of the same text).

        Args:
            dataset: a ``datasets.Dataset`` or a list of row dicts.
            tokenizer: the student's tokenizer (a Hugging Face tokenizer or a ``WordTokenizer``).
            teacher_tokenizer: the teacher's, when it is another one.
            max_length: truncation length in tokens (pairs: the longer text loses tokens first).
            label_names: override of the task's label set.

        Raises:
            InvalidArgumentError: a missing column, or a label outside the label set (naming the label, the row
                index and the set).
        """
        names = resolve_label_names(dataset, self.label_column, label_names or self.label_names)
        index_of = {label: i for i, label in enumerate(names)}
        texts = [_text(v, self.text_column, i) for i, v in enumerate(column_values(dataset, self.text_column))]
        pairs = None
        if self.text_pair_column is not None:
            pair_values = column_values(dataset, self.text_pair_column)
            pairs = [_text(v, self.text_pair_column, i) for i, v in enumerate(pair_values)]
        labels = [
            label_to_id(v, index_of, i, self.label_column)
            for i, v in enumerate(column_values(dataset, self.label_column))
        ]
        student_rows = _encode(tokenizer, texts, pairs, max_length)
        teacher_rows = None
        if tokenizers_differ(tokenizer, teacher_tokenizer):
            teacher_rows = _encode(teacher_tokenizer, texts, pairs, max_length)
        examples: list[dict[str, Any]] = []
        for row, label in enumerate(labels):
            if teacher_rows is None:
                examples.append({**student_rows[row], "labels": label, "example_id": row})
            else:
                examples.append(
                    {"student": student_rows[row], "teacher": teacher_rows[row], "labels": label, "example_id": row}
                )
        return examples

    def adapt_teacher(self, teacher: nn.Module, *, tokenizer: Any, teacher_tokenizer: Any = None) -> nn.Module:
        """The teacher as the distiller runs it: unchanged for this task."""
        return teacher

    def predict(
        self, model: nn.Module, batches: Sequence[Mapping[str, Any]], *, inputs: str = "student"
    ) -> list[list[torch.Tensor]]:
        """Logits ``[(B, C)]`` per batch (eval mode, no gradients)."""
        return predict_logits(model, batches, self.view, inputs=inputs)

    def compute_metrics(
        self,
        logits_per_batch: Sequence[Sequence[torch.Tensor]],
        batches: Sequence[Mapping[str, Any]],
        examples_meta: Any = None,
    ) -> dict[str, float]:
        """``accuracy`` and ``macro_f1`` (fractions in [0, 1]) over the labelled rows of ``batches``.

        Args:
            logits_per_batch: per batch, the one head's logits ``(B, C)``.
            batches: the batches the logits came from (their ``labels``).
            examples_meta: unused (the labels travel in the batches).
        """
        predictions, golds = self.outcomes(logits_per_batch, batches)
        if not golds:
            raise InvalidArgumentError("there are no labelled rows to score")
        num_labels = len(self.label_names) if self.label_names is not None else None
        return {
            "accuracy": float(accuracy(predictions, golds)),
            "macro_f1": float(macro_f1(predictions, golds, num_labels=num_labels)),
        }

    def outcomes(
        self, logits_per_batch: Sequence[Sequence[torch.Tensor]], batches: Sequence[Mapping[str, Any]]
    ) -> tuple[list[int], list[int]]:
        """The predicted and the gold class of every labelled row, in order: what the metrics are computed from, and
        what a paired bootstrap resamples (:mod:`kdistill.eval.significance`)."""
        predictions: list[int] = []
        golds: list[int] = []
        for logits, batch in zip(logits_per_batch, batches, strict=True):
            labels = torch.as_tensor(batch["labels"]).cpu()
            counted = labels != IGNORE_INDEX
            predictions += logits[0].argmax(-1)[counted].tolist()
            golds += labels[counted].tolist()
        return predictions, golds

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


def _text(value: Any, column: str, row: int) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"row {row} of column {column!r} is {type(value).__name__}, not a text: {value!r}")
    return value


def _encode(tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int | None) -> list[dict]:
    rows: list[dict[str, list[int]]] = []
    for span in chunks(len(texts)):
        batch_texts = texts[span.start : span.stop]
        batch_pairs = pairs[span.start : span.stop] if pairs is not None else None
        encoding = tokenizer(batch_texts, batch_pairs, truncation=max_length is not None, max_length=max_length)
        rows += [token_inputs(encoding, i) for i in range(len(batch_texts))]
    return rows
