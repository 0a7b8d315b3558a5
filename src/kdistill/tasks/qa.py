"""Extractive question answering in the SQuAD format: the answer is a span of the context.

A context longer than ``max_length`` is cut into overlapping windows (``doc_stride`` tokens of overlap); each
window is one example whose gold start/end token positions point at the answer, or at the CLS token (index 0)
when the answer is not inside the window. Models have two heads, start and end logits ``(B, T)``; an example's
answer is the best-scoring span (start ≤ end, at most ``max_answer_length`` tokens, context tokens only) over all
its windows. Metrics: SQuAD exact match and token F1, in percent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill.core.views import student_inputs
from kdistill.data.collate import PadCollator
from kdistill.errors import InvalidArgumentError
from kdistill.eval.metrics import squad_scores
from kdistill.tasks.base import (
    chunks,
    column_values,
    evaluate_task,
    output_field,
    predict_logits,
    require_fast,
    rows_of,
    token_inputs,
    tokenizers_differ,
)


@dataclass(frozen=True)
class QAView:
    """Two heads, start and end logits ``(B, T)``: each row is a distribution over the window's positions.

    The positions are the classes here, so the KD term counts rows, not tokens: ``kd_mask`` is None and
    ``count_logit_positions`` is the number of rows of both heads, ``2·B``, so KD, like the hard loss, is the mean
    of the start and end terms. Padded positions stay in both models' distributions (a view cannot mask classes);
    both models see the same padding.
    """

    start_key: str = "start_logits"
    end_key: str = "end_logits"

    def logits(self, outputs: Any) -> list[torch.Tensor]:
        """``[start_logits (B, T), end_logits (B, T)]``."""
        return [output_field(outputs, self.start_key), output_field(outputs, self.end_key)]

    def kd_mask(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        return None

    def labels(self, batch: Mapping[str, Any]) -> list[torch.Tensor] | None:
        """``[start_positions (B,), end_positions (B,)]``, or None when the batch has no gold positions."""
        if "start_positions" not in batch or "end_positions" not in batch:
            return None
        return [batch["start_positions"], batch["end_positions"]]

    def count_logit_positions(self, batch: Mapping[str, Any]) -> int:
        return 2 * int(student_inputs(batch)["input_ids"].shape[0])


@dataclass(frozen=True)
class QuestionAnsweringTask:
    """Question + context → the answer span. Metrics: ``exact_match`` and ``f1`` in percent.

    Args:
        question_column: the question text.
        context_column: the context text.
        answers_column: ``{"text": [...], "answer_start": [...]}`` (character offsets into the context); the first
            answer is the training target, all of them count as references. An empty list: no answer.
        max_length: tokens per window (question, context and special tokens).
        doc_stride: tokens shared by consecutive windows of one context; None: ``min(128, max_length // 3)``
            (SQuAD's 128 at ``max_length=384``).
        max_answer_length: longest predicted answer, in tokens.
    """

    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"
    max_length: int = 384
    doc_stride: int | None = None
    max_answer_length: int = 30
    name: str = "qa"

    def __post_init__(self) -> None:
        if self.max_length < 2 or self.max_answer_length < 1:
            raise InvalidArgumentError(
                f"max_length ({self.max_length}) must be >= 2 and max_answer_length ({self.max_answer_length}) >= 1"
            )
        self.stride_for(self.max_length)

    def stride_for(self, length: int) -> int:
        """The window overlap for windows of ``length`` tokens (checked to be in ``[0, length)``)."""
        stride = min(128, length // 3) if self.doc_stride is None else self.doc_stride
        if not 0 <= stride < length:
            raise InvalidArgumentError(f"doc_stride {stride} must be >= 0 and smaller than max_length {length}")
        return stride

    @property
    def view(self) -> QAView:
        """Start and end logits; labels ``[start_positions, end_positions]``."""
        return QAView()

    @property
    def collate(self) -> PadCollator:
        """Pads ``input_ids``; positions become ``(B,)`` tensors, ``context_offsets`` stay lists."""
        return PadCollator()

    @property
    def auto_model_class(self) -> type:
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering

    def preprocess(
        self,
        dataset: Any,
        *,
        tokenizer: Any,
        teacher_tokenizer: Any = None,
        max_length: int | None = None,
        label_names: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Tokenize each row into windows ``{"input_ids", ["token_type_ids"], "start_positions", "end_positions",
        "example_id", "context_offsets"}``.

        ``context_offsets[t]`` is the ``[start, end)`` character span of token ``t`` in the context, or None for
        question, special and padding tokens.

        Args:
            dataset: a ``datasets.Dataset`` or a list of row dicts.
            tokenizer: a fast Hugging Face tokenizer (offsets and overflowing windows).
            teacher_tokenizer: must be None or the same tokenizer (both models must see the same windows).
            max_length: override of the task's ``max_length``.
            label_names: unused (QA has no label set).

        Raises:
            InvalidArgumentError: a slow or different teacher tokenizer, or an answer whose text is not at its
                ``answer_start`` in the context (naming the row).
        """
        if tokenizers_differ(tokenizer, teacher_tokenizer):
            raise InvalidArgumentError(
                "question answering needs the teacher and the student to share a tokenizer (both must score the "
                "same windows); pass teacher_tokenizer=None"
            )
        require_fast(tokenizer, "question answering")
        length = max_length or self.max_length
        stride = self.stride_for(length)
        questions = [str(q).lstrip() for q in column_values(dataset, self.question_column)]
        contexts = [str(c) for c in column_values(dataset, self.context_column)]
        answers = [
            _first_answer(a, c, row, self.answers_column)
            for row, (a, c) in enumerate(zip(column_values(dataset, self.answers_column), contexts, strict=True))
        ]
        cls_id = getattr(tokenizer, "cls_token_id", None)
        examples: list[dict[str, Any]] = []
        for span in chunks(len(questions)):
            self._check_room(tokenizer, questions, span, length, stride)
            encoding = tokenizer(
                questions[span.start : span.stop],
                contexts[span.start : span.stop],
                truncation="only_second",
                max_length=length,
                stride=stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )
            for window, local_row in enumerate(encoding["overflow_to_sample_mapping"]):
                row = span.start + local_row
                sequence_ids = encoding.sequence_ids(window)
                offsets = [
                    [int(start), int(end)] if sequence == 1 else None
                    for (start, end), sequence in zip(encoding["offset_mapping"][window], sequence_ids, strict=True)
                ]
                input_ids = list(encoding["input_ids"][window])
                cls_index = input_ids.index(cls_id) if cls_id is not None and cls_id in input_ids else 0
                start, end = answer_positions(offsets, answers[row], cls_index)
                example = token_inputs(encoding, window)
                example.update(start_positions=start, end_positions=end, example_id=row, context_offsets=offsets)
                examples.append(example)
        return examples

    def _check_room(self, tokenizer: Any, questions: list[str], span: range, length: int, stride: int) -> None:
        """Every window must hold its question, the special tokens and more than ``doc_stride`` context tokens."""
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        question_ids = tokenizer(questions[span.start : span.stop], add_special_tokens=False)["input_ids"]
        for row, ids in zip(span, question_ids, strict=True):
            room = length - specials - len(ids)
            if room <= stride:
                raise InvalidArgumentError(
                    f"row {row}: the question takes {len(ids)} tokens, leaving {room} of max_length {length} for the "
                    f"context, not more than doc_stride {stride}; raise max_length or lower doc_stride"
                )

    def adapt_teacher(self, teacher: nn.Module, *, tokenizer: Any, teacher_tokenizer: Any = None) -> nn.Module:
        """The teacher as the distiller runs it: unchanged for this task."""
        return teacher

    def predict(
        self, model: nn.Module, batches: Sequence[Mapping[str, Any]], *, inputs: str = "student"
    ) -> list[list[torch.Tensor]]:
        """``[start_logits (B, T), end_logits (B, T)]`` per batch (eval mode, no gradients)."""
        return predict_logits(model, batches, self.view, inputs=inputs)

    def postprocess(
        self,
        logits_per_batch: Sequence[Sequence[torch.Tensor]],
        batches: Sequence[Mapping[str, Any]],
        contexts: Mapping[int, str] | Sequence[str],
    ) -> dict[int, str]:
        """example_id → predicted answer text: the best span over the example's windows (``""`` when none fits).

        Args:
            logits_per_batch: per batch, ``[start_logits (B, T), end_logits (B, T)]``.
            batches: the batches, with ``example_id`` and ``context_offsets``.
            contexts: the context of each example_id.
        """
        best: dict[int, tuple[float, str]] = {}
        for (start_logits, end_logits), batch in zip(logits_per_batch, batches, strict=True):
            for row, example_id in enumerate(rows_of(batch)):
                offsets = batch["context_offsets"][row]
                found = best_span(start_logits[row], end_logits[row], offsets, self.max_answer_length)
                if found is None:
                    best.setdefault(example_id, (float("-inf"), ""))
                    continue
                score, first, last = found
                if example_id not in best or score > best[example_id][0]:
                    best[example_id] = (score, contexts[example_id][offsets[first][0] : offsets[last][1]])
        return {example_id: text for example_id, (_, text) in best.items()}

    def compute_metrics(
        self,
        logits_per_batch: Sequence[Sequence[torch.Tensor]],
        batches: Sequence[Mapping[str, Any]],
        examples_meta: Any = None,
    ) -> dict[str, float]:
        """SQuAD ``exact_match`` and ``f1`` (percent) of the examples present in ``batches``.

        Args:
            logits_per_batch: per batch, ``[start_logits (B, T), end_logits (B, T)]``.
            batches: the batches the logits came from.
            examples_meta: the source rows (the dataset given to :meth:`preprocess`): contexts and answers.
        """
        if examples_meta is None:
            raise InvalidArgumentError("QA scoring needs examples_meta: the source rows with contexts and answers")
        ids = sorted({example_id for batch in batches for example_id in rows_of(batch)})
        rows = {example_id: examples_meta[example_id] for example_id in ids}
        contexts = {example_id: str(row[self.context_column]) for example_id, row in rows.items()}
        predicted = self.postprocess(logits_per_batch, batches, contexts)
        references = [list(as_columns(rows[i][self.answers_column])["text"]) or [""] for i in ids]
        scores = squad_scores([predicted[i] for i in ids], references)
        return {"exact_match": float(scores["exact_match"]), "f1": float(scores["f1"])}

    def evaluate(
        self,
        model: nn.Module,
        examples: Sequence[Mapping[str, Any]],
        examples_meta: Any = None,
        *,
        batch_size: int = 32,
    ) -> dict[str, float]:
        """Batch, predict and score ``examples`` (from :meth:`preprocess`) against ``examples_meta``."""
        return evaluate_task(self, model, examples, examples_meta, batch_size=batch_size)


def _first_answer(answers: Any, context: str, row: int, column: str) -> tuple[int, int] | None:
    """The first answer's ``[start, end)`` characters, checked against the context; None when there is none."""
    answers = as_columns(answers)
    if not isinstance(answers, Mapping) or "text" not in answers or "answer_start" not in answers:
        raise InvalidArgumentError(
            f"row {row}: column {column!r} must be {{'text': [...], 'answer_start': [...]}}, got {answers!r}"
        )
    texts, starts = list(answers["text"]), list(answers["answer_start"])
    if len(texts) != len(starts):
        raise InvalidArgumentError(f"row {row}: {len(texts)} answer texts but {len(starts)} answer_start values")
    if not texts:
        return None
    start, text = int(starts[0]), str(texts[0])
    if context[start : start + len(text)] != text:
        raise InvalidArgumentError(
            f"row {row}: the answer {text!r} is not at answer_start {start} of the context "
            f"(found {context[start : start + len(text)]!r})"
        )
    return start, start + len(text)


def as_columns(answers: Any) -> Any:
    """SQuAD answers as ``{"text": [...], "answer_start": [...]}``, also when given as a list of per-answer dicts."""
    if isinstance(answers, (list, tuple)) and all(isinstance(a, Mapping) for a in answers):
        return {"text": [a.get("text") for a in answers], "answer_start": [a.get("answer_start") for a in answers]}
    return answers


def answer_positions(
    offsets: Sequence[Sequence[int] | None], answer: tuple[int, int] | None, cls_index: int = 0
) -> tuple[int, int]:
    """The first and last token of the answer's characters ``[start, end)`` in one window.

    Args:
        offsets: per token, its ``[start, end)`` characters in the context, or None outside the context.
        answer: the answer's characters, or None (no answer).
        cls_index: the position both point at when the window does not hold the whole answer.
    """
    context_tokens = [t for t, span in enumerate(offsets) if span is not None]
    if answer is None or not context_tokens:
        return cls_index, cls_index
    start_char, end_char = answer
    first_token, last_token = context_tokens[0], context_tokens[-1]
    if offsets[first_token][0] > start_char or offsets[last_token][1] < end_char:
        return cls_index, cls_index
    start = max(t for t in context_tokens if offsets[t][0] <= start_char)
    end = min(t for t in context_tokens if offsets[t][1] >= end_char)
    return start, end


def best_span(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    offsets: Sequence[Sequence[int] | None],
    max_answer_length: int,
) -> tuple[float, int, int] | None:
    """The highest ``start_logits[i] + end_logits[j]`` over context tokens with ``i <= j < i + max_answer_length``.

    Args:
        start_logits, end_logits: ``(T,)`` (positions past ``len(offsets)`` are padding and never chosen).
        offsets: per token, its context span or None.
        max_answer_length: most tokens in a span.

    Returns:
        ``(score, i, j)``, or None when the window holds no context token.
    """
    length = min(len(offsets), start_logits.shape[0])
    in_context = torch.tensor([offsets[t] is not None for t in range(length)], dtype=torch.bool)  # (T,)
    if not in_context.any():
        return None
    start, end = start_logits[:length].float(), end_logits[:length].float()
    scores = start[:, None] + end[None, :]  # (T, T): row = start token, column = end token
    allowed = torch.ones(length, length, dtype=torch.bool).triu().tril(max_answer_length - 1)
    allowed &= in_context[:, None] & in_context[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    flat = int(scores.argmax())
    return float(scores.view(-1)[flat]), flat // length, flat % length
