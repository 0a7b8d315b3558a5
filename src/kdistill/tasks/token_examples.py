"""Token-classification examples and batches: labels aligned to pieces, and the two-tokenization forms.

* :func:`align_labels`: word tags → one label per token (the word's first piece), ``-100`` elsewhere;
* :func:`word_aligned_example`: a word-level student against a subword teacher, one position per word, the
  teacher read at each word's first piece by :class:`FirstPieceLogits`;
* :func:`cross_tokenizer_examples`: both tokenizations, each token with its character span in the words joined by
  single spaces (``distill.cross_tokenizer``);
* :class:`TokenCollator` pads any of these.

:mod:`kdistill.tasks.token` (the task) chooses between them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import TokenClassifierOutput

from kdistill.core.batch import model_inputs
from kdistill.data.collate import PadCollator
from kdistill.data.word_tokenizer import WordTokenizer
from kdistill.tasks.base import IGNORE_INDEX, token_inputs


def align_labels(word_ids: Sequence[int | None], word_tags: Sequence[int]) -> tuple[list[int], list[int]]:
    """Word tags → token labels: the first piece of each word gets its tag, other pieces and specials ``-100``.

    Args:
        word_ids: the word of each token (None for special tokens), as a fast tokenizer's ``word_ids()``.
        word_tags: the tag id of each word.

    Returns:
        ``(labels, labelled_words)``: a label per token, and the word index of each labelled token.
    """
    labels: list[int] = []
    labelled_words: list[int] = []
    previous: int | None = None
    for word in word_ids:
        if word is None or word == previous:
            labels.append(IGNORE_INDEX)
        else:
            labels.append(word_tags[word])
            if word_tags[word] != IGNORE_INDEX:
                labelled_words.append(word)
        previous = word
    return labels, labelled_words


def _text_offsets(
    spans: Sequence[Sequence[int]], word_ids: Sequence[int | None], word_starts: Sequence[int]
) -> list[list[int]]:
    """Spans inside each word (what tokenizers give for pre-split words) → spans in the words joined by spaces."""
    out = []
    for (start, end), word in zip(spans, word_ids, strict=True):
        out.append([0, 0] if word is None else [word_starts[word] + int(start), word_starts[word] + int(end)])
    return out


def cross_tokenizer_examples(
    batch_words: list[list[str]],
    span: range,
    tag_ids: list[list[int]],
    tokenizer: Any,
    teacher_tokenizer: Any,
    truncate: bool,
    max_length: int | None,
) -> list[dict[str, Any]]:
    """Examples with both tokenizations and their character offsets.

    See :meth:`~kdistill.tasks.token.TokenClassificationTask.preprocess` for their keys.

    The teacher tokenizes the words first; the student then tokenizes the words the teacher kept (at least one
    piece), so that truncation leaves both sides on the same text as far as the student's own limit allows.
    """
    options = {"is_split_into_words": True, "truncation": truncate, "max_length": max_length}
    teacher_encoding = teacher_tokenizer(batch_words, return_offsets_mapping=True, **options)
    kept_per_row = []
    for offset in range(len(batch_words)):
        present = {word for word in teacher_encoding.word_ids(offset) if word is not None}
        kept_per_row.append(sorted(present))
    student_words = [[words[w] for w in kept] for words, kept in zip(batch_words, kept_per_row, strict=True)]
    student_encoding = tokenizer(student_words, return_offsets_mapping=True, **options)
    examples = []
    for offset, row in enumerate(span):
        words, kept = batch_words[offset], kept_per_row[offset]
        starts = [0]
        for word in words[:-1]:
            starts.append(starts[-1] + len(word) + 1)  # the text is the words joined by single spaces
        teacher_words = teacher_encoding.word_ids(offset)
        first_piece: dict[int, int] = {}
        for position, word in enumerate(teacher_words):
            if word is not None and word not in first_piece:
                first_piece[word] = position
        local_words = student_encoding.word_ids(offset)  # indices into `kept`
        student_words_of = [None if w is None else kept[w] for w in local_words]
        labels, labelled = align_labels(local_words, [tag_ids[row][w] for w in kept])
        teacher = token_inputs(teacher_encoding, offset)
        teacher["offset_mapping"] = _text_offsets(teacher_encoding["offset_mapping"][offset], teacher_words, starts)
        teacher["word_starts"] = [0 if w is None else first_piece[w] for w in student_words_of]
        student = token_inputs(student_encoding, offset)
        student["offset_mapping"] = _text_offsets(student_encoding["offset_mapping"][offset], student_words_of, starts)
        examples.append(
            {
                "student": student,
                "teacher": teacher,
                "labels": labels,
                "example_id": row,
                "labelled_words": [kept[w] for w in labelled],
            }
        )
    return examples


def word_aligned_example(
    teacher_encoding: Any, offset: int, row: int, words: list[str], word_tags: list[int], tokenizer: WordTokenizer
) -> dict[str, Any]:
    """One word-aligned example (see :meth:`~kdistill.tasks.token.TokenClassificationTask.preprocess`): one student
    token, label and teacher first piece (``word_starts``) per word the teacher's truncation keeps a piece of."""
    first_piece: dict[int, int] = {}
    for position, word in enumerate(teacher_encoding.word_ids(offset)):
        if word is not None and word not in first_piece:
            first_piece[word] = position
    kept = [word for word in range(len(words)) if word in first_piece]
    teacher = token_inputs(teacher_encoding, offset)
    teacher["word_starts"] = [first_piece[word] for word in kept]
    student = {"input_ids": list(tokenizer([words[w] for w in kept], is_split_into_words=True)["input_ids"])}
    return {
        "student": student,
        "teacher": teacher,
        "labels": [word_tags[word] for word in kept],
        "example_id": row,
        "labelled_words": [word for word in kept if word_tags[word] != IGNORE_INDEX],
    }


class FirstPieceLogits(nn.Module):
    """A subword token classifier read at each word's first piece, for word-level students.

    Its forward takes the model's inputs plus ``word_starts`` ``(B, W)`` (the first piece of each word, any value
    where the word is padding) and returns ``logits`` ``(B, W, C)``; without ``word_starts`` it returns the model's
    outputs. The wrapped model is ``self.model``, so feature paths gain the prefix ``model.``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        word_starts: torch.Tensor | None = None,
        output_attentions: bool | None = None,
    ) -> Any:
        """The model's outputs, or with ``word_starts`` ``(B, W)`` its logits read there: ``logits (B, W, C)``."""
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if output_attentions:
            given["output_attentions"] = True
        outputs = self.model(**model_inputs(self.model, {k: v for k, v in given.items() if v is not None}))
        if word_starts is None:
            return outputs
        logits = outputs.logits  # (B, T, C)
        index = word_starts.to(logits.device).long().unsqueeze(-1).expand(-1, -1, logits.shape[-1])  # (B, W, C)
        return TokenClassifierOutput(
            logits=logits.gather(1, index),  # (B, W, C)
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )


@dataclass(frozen=True)
class TokenCollator:
    """:class:`PadCollator` for plain examples; for word-aligned ones it pads the student's ids, the labels and the
    teacher's ``word_starts`` to the student's length ``W`` and the teacher's ids to its own length. Each side's
    ``offset_mapping`` (cross-tokenizer examples) becomes ``(B, T, 2)`` with ``(0, 0)`` on padding."""

    pad_id: int = 0

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        pad = PadCollator(pad_id=self.pad_id)
        if not examples or "student" not in examples[0]:
            return pad(examples)
        own = ("word_starts", "offset_mapping")
        student = pad([{k: v for k, v in e["student"].items() if k not in own} for e in examples])
        teacher = pad([{k: v for k, v in e["teacher"].items() if k not in own} for e in examples])
        length = student["input_ids"].shape[1]
        teacher["word_starts"] = _pad_rows([e["teacher"]["word_starts"] for e in examples], length, 0)
        if "offset_mapping" in examples[0]["student"]:
            student["offset_mapping"] = _pad_spans([e["student"]["offset_mapping"] for e in examples], length)
            spans = [e["teacher"]["offset_mapping"] for e in examples]
            teacher["offset_mapping"] = _pad_spans(spans, teacher["input_ids"].shape[1])
        return {
            "student": student,
            "teacher": teacher,
            "labels": _pad_rows([e["labels"] for e in examples], length, IGNORE_INDEX),
            "example_id": torch.tensor([e["example_id"] for e in examples]),
            "labelled_words": [list(e["labelled_words"]) for e in examples],
        }


def _pad_rows(rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)  # (B, W)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def _pad_spans(rows: Sequence[Sequence[Sequence[int]]], length: int) -> torch.Tensor:
    out = torch.zeros((len(rows), length, 2), dtype=torch.long)  # (B, T, 2); (0, 0) = no text
    for index, row in enumerate(rows):
        if row:
            out[index, : len(row)] = torch.as_tensor([list(pair) for pair in row], dtype=torch.long)
    return out
