"""Sequence classification: labels, pairs, two tokenizations, and preprocess → collate → model → metrics."""

from __future__ import annotations

import datasets
import pytest
import torch
from task_support import confident, minilm_tokenizer, tiny_bert

from kdistill.data.word_tokenizer import WordTokenizer
from kdistill.distillers import Distiller, Objective
from kdistill.errors import InvalidArgumentError
from kdistill.models.students import build_student
from kdistill.tasks import (
    TASKS,
    QuestionAnsweringTask,
    SequenceClassificationTask,
    Task,
    TokenClassificationTask,
    make_batches,
)

NAMES = ("negative", "neutral", "positive")
ROWS = [
    {"text": "A wonderful, warm film.", "label": "positive"},
    {"text": "Dull and far too long.", "label": "negative"},
    {"text": "It exists.", "label": "neutral"},
    {"text": "I would watch it again tomorrow!", "label": "positive"},
    {"text": "The plot collapses halfway through.", "label": "negative"},
]
NLI = [
    {"premise": "A man plays a guitar.", "hypothesis": "Someone makes music.", "label": 0},
    {"premise": "A man plays a guitar.", "hypothesis": "Nobody is there.", "label": 2},
    {"premise": "Two dogs run.", "hypothesis": "Animals are outside.", "label": 1},
]


def test_single_texts_become_tokens_and_label_ids() -> None:
    task = SequenceClassificationTask(label_names=NAMES)
    tokenizer = minilm_tokenizer()
    examples = task.preprocess(ROWS, tokenizer=tokenizer, max_length=32)
    assert [e["labels"] for e in examples] == [2, 0, 1, 2, 0]
    assert [e["example_id"] for e in examples] == list(range(5))
    first = examples[0]
    assert tokenizer.convert_ids_to_tokens(first["input_ids"]) == [
        "[CLS]", "a", "wonderful", ",", "warm", "film", ".", "[SEP]",
    ]  # fmt: skip
    assert first["token_type_ids"] == [0] * 8
    assert len(task.preprocess(ROWS, tokenizer=tokenizer, max_length=4)[3]["input_ids"]) == 4


def test_pairs_carry_both_segments() -> None:
    task = SequenceClassificationTask(text_column="premise", text_pair_column="hypothesis")
    dataset = datasets.Dataset.from_list(NLI).cast_column(
        "label", datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])
    )
    task = task.with_label_names(dataset)
    assert task.label_names == ("entailment", "neutral", "contradiction") and task.num_labels == 3
    examples = task.preprocess(dataset, tokenizer=minilm_tokenizer(), max_length=32)
    tokens = minilm_tokenizer().convert_ids_to_tokens(examples[1]["input_ids"])
    assert tokens[tokens.index("[SEP]") + 1 :] == ["nobody", "is", "there", ".", "[SEP]"]
    assert examples[1]["token_type_ids"].count(1) == 5
    assert [e["labels"] for e in examples] == [0, 2, 1]


def test_label_outside_the_set_names_label_row_and_set() -> None:
    rows = [*ROWS[:2], {"text": "Meh.", "label": "mixed"}]
    with pytest.raises(InvalidArgumentError, match=r"'mixed' in row 2 .*\['negative', 'neutral', 'positive'\]"):
        SequenceClassificationTask(label_names=NAMES).preprocess(rows, tokenizer=minilm_tokenizer())
    with pytest.raises(InvalidArgumentError, match=r"label 7 in row 0"):
        SequenceClassificationTask(label_names=NAMES).preprocess(
            [{"text": "x", "label": 7}], tokenizer=minilm_tokenizer()
        )
    with pytest.raises(InvalidArgumentError, match="'sentence' is not in the dataset"):
        SequenceClassificationTask(text_column="sentence").preprocess(
            datasets.Dataset.from_list(ROWS), tokenizer=minilm_tokenizer()
        )


def test_inferred_names_and_unlabelled_rows() -> None:
    task = SequenceClassificationTask().with_label_names(ROWS)
    assert task.label_names == NAMES  # sorted distinct strings
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": -1}, {"text": "c", "label": 0}]
    examples = SequenceClassificationTask().preprocess(rows, tokenizer=minilm_tokenizer())
    assert [e["labels"] for e in examples] == [1, -100, 0]  # -1 (GLUE test splits) = unlabelled
    batch = task.collate(examples)
    logits = [[confident(torch.tensor([1, 2, 2]), 3)]]
    assert task.compute_metrics(logits, [batch]) == {"accuracy": 0.5, "macro_f1": 1 / 3}  # rows 0 and 2 scored


def test_pipeline_model_forward_and_perfect_logits() -> None:
    task = TASKS.get("sequence")(label_names=NAMES)
    examples = task.preprocess(ROWS, tokenizer=minilm_tokenizer(), max_length=32)
    batches = make_batches(examples, task.collate, batch_size=2)
    model = tiny_bert("sequence").train()
    logits = task.predict(model, batches)
    assert model.training  # predict restores the mode
    assert [tuple(head.shape) for [head] in logits] == [(2, 3), (2, 3), (1, 3)]
    metrics = task.evaluate(model, examples, batch_size=2)
    assert set(metrics) == {"accuracy", "macro_f1"} and 0.0 <= metrics["accuracy"] <= 1.0
    perfect = [[confident(batch["labels"], 3)] for batch in batches]
    assert task.compute_metrics(perfect, batches) == {"accuracy": 1.0, "macro_f1": 1.0}
    wrong = [[confident((batch["labels"] + 1) % 3, 3)] for batch in batches]
    assert task.compute_metrics(wrong, batches) == {"accuracy": 0.0, "macro_f1": 0.0}


def test_a_word_level_student_gets_its_own_tokenization_and_distils() -> None:
    task = SequenceClassificationTask(label_names=NAMES)
    word_tokenizer = WordTokenizer.build([row["text"] for row in ROWS])
    examples = task.preprocess(ROWS, tokenizer=word_tokenizer, teacher_tokenizer=minilm_tokenizer(), max_length=32)
    assert set(examples[0]) == {"student", "teacher", "labels", "example_id"}
    assert word_tokenizer.decode(examples[0]["student"]["input_ids"]) == "a wonderful , warm film ."
    assert examples[0]["teacher"]["input_ids"][0] == minilm_tokenizer().cls_token_id
    batch = task.collate(examples)
    assert batch["student"]["input_ids"].shape[1] != batch["teacher"]["input_ids"].shape[1]

    teacher = tiny_bert("sequence")
    student = build_student("bilstm", teacher, vocab=word_tokenizer, embedding_dim=8, hidden_size=8, dropout=0.0)
    distiller = Distiller(student, teacher, Objective(kd_weight=0.5, hard_weight=0.5), view=task.view)
    module = distiller.setup(batch)
    terms = distiller.compute_terms(module, batch, {"kd": 1.0, "hard": 1.0}, 0, 1)
    assert terms["kd"].total.isfinite() and terms["kd"].total > 0
    terms["kd"].total.backward()
    assert student.embedding.weight.grad is not None
    assert [head.shape for [head] in task.predict(teacher, [batch], inputs="teacher")] == [torch.Size([5, 3])]


def test_every_task_has_the_shared_shape() -> None:
    for task in (SequenceClassificationTask(), TokenClassificationTask(), QuestionAnsweringTask()):
        assert isinstance(task, Task)
        assert TASKS.get(task.name) is type(task)
        assert task.auto_model_class.__name__.startswith("AutoModelFor")
