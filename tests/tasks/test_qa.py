"""Extractive QA: windows and answer positions, span search, SQuAD scoring, and the two-headed view in a distiller."""

from __future__ import annotations

import datasets
import pytest
import torch
from task_support import minilm_tokenizer, tiny_bert

from kdistill.distillers import Distiller, Objective
from kdistill.errors import InvalidArgumentError
from kdistill.models.students import from_teacher
from kdistill.tasks import QuestionAnsweringTask, make_batches
from kdistill.tasks.qa import answer_positions, best_span


def _row(question: str, context: str, answer: str | None) -> dict:
    if answer is None:
        return {"question": question, "context": context, "answers": {"text": [], "answer_start": []}}
    return {
        "question": question,
        "context": context,
        "answers": {"text": [answer], "answer_start": [context.index(answer)]},
    }


LONG = (
    "The Vistula is the longest river in Poland. It rises in the Beskids at an elevation of 1,106 metres and "
    "flows north through Kraków and Warsaw. After about 1,047 kilometres it reaches the Bay of Gdańsk, where "
    "its delta spreads across the Żuławy lowlands. The river basin covers 194,424 square kilometres, most of it "
    "inside Poland, and its largest tributary is the Narew, joined by the Bug."
)
ROWS = [
    _row("Where does the Vistula rise?", LONG, "the Beskids"),
    _row("Which bay does the river reach?", LONG, "Bay of Gdańsk"),
    _row("What is the largest tributary?", LONG, "the Narew"),
    _row("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa in Florence.", "Leonardo da Vinci"),
    _row("  How tall is the tower?", "The tower, built in 1889, is 330 metres tall.", "330 metres"),
    _row("Who won?", "Nobody knows what happened that night.", None),
]


@pytest.fixture(scope="module")
def windows() -> tuple[QuestionAnsweringTask, list[dict]]:
    task = QuestionAnsweringTask(max_length=48, doc_stride=16, max_answer_length=12)
    return task, task.preprocess(datasets.Dataset.from_list(ROWS), tokenizer=minilm_tokenizer())


def test_positions_map_back_to_the_answer_text(windows: tuple[QuestionAnsweringTask, list[dict]]) -> None:
    _, examples = windows
    per_row: dict[int, list[dict]] = {}
    for example in examples:
        assert len(example["input_ids"]) <= 48
        per_row.setdefault(example["example_id"], []).append(example)
    assert len(per_row[0]) > 2 and len(per_row[3]) == 1  # the long context is cut into overlapping windows
    for row, row_windows in per_row.items():
        answer = ROWS[row]["answers"]["text"]
        found = 0
        for example in row_windows:
            start, end = example["start_positions"], example["end_positions"]
            offsets = example["context_offsets"]
            if start == 0:
                assert end == 0  # CLS: the answer is not (wholly) inside this window
                continue
            found += 1
            assert 0 < start <= end
            assert ROWS[row]["context"][offsets[start][0] : offsets[end][1]] == answer[0]
        assert found >= 1 if answer else found == 0
    assert [w["start_positions"] > 0 for w in per_row[2]] == [False, False, True, True]  # in both overlapping windows
    # the question is never part of the context
    first = examples[0]
    assert first["context_offsets"][0] is None and first["context_offsets"][1] is None


def test_answer_positions_edge_cases() -> None:
    offsets = [None, None, [0, 3], [4, 9], [10, 14], None]
    assert answer_positions(offsets, (4, 9)) == (3, 3)
    assert answer_positions(offsets, (5, 12)) == (3, 4)  # characters inside tokens widen to whole tokens
    assert answer_positions(offsets, (10, 20)) == (0, 0)  # runs past the window
    assert answer_positions(offsets, None, cls_index=5) == (5, 5)


def test_best_span_respects_order_length_and_context() -> None:
    offsets = [None, [0, 1], [2, 3], [4, 5], [6, 7], None]
    start = torch.tensor([9.0, 0.0, 5.0, 0.0, 2.0, 9.0])  # positions 0 and 5 are outside the context
    end = torch.tensor([9.0, 6.0, 0.0, 3.0, 1.0, 9.0])
    assert best_span(start, end, offsets, max_answer_length=30) == (8.0, 2, 3)  # 2 → 1 would end before it starts
    assert best_span(start, end, offsets, max_answer_length=1) == (6.0, 1, 1)
    assert best_span(start, end, [None] * 6, max_answer_length=3) is None


def test_perfect_logits_score_100(windows: tuple[QuestionAnsweringTask, list[dict]]) -> None:
    task, examples = windows
    answered = [i for i, row in enumerate(ROWS) if row["answers"]["text"]]
    batches = make_batches([e for e in examples if e["example_id"] in answered], task.collate, batch_size=4)
    logits = []
    for batch in batches:
        shape = batch["input_ids"].shape
        start = torch.full(shape, -5.0).scatter(1, batch["start_positions"][:, None], 10.0)
        end = torch.full(shape, -5.0).scatter(1, batch["end_positions"][:, None], 10.0)
        logits.append([start, end])
    assert task.compute_metrics(logits, batches, ROWS) == {"exact_match": 100.0, "f1": 100.0}
    predicted = task.postprocess(logits, batches, [row["context"] for row in ROWS])
    assert predicted[4] == "330 metres"  # case and punctuation as in the context


def test_model_forward_and_scoring(windows: tuple[QuestionAnsweringTask, list[dict]]) -> None:
    task, examples = windows
    batches = make_batches(examples, task.collate, batch_size=4)
    model = tiny_bert("qa")
    logits = task.predict(model, batches)
    assert all(
        start.shape == end.shape == batch["input_ids"].shape
        for (start, end), batch in zip(logits, batches, strict=True)
    )
    metrics = task.evaluate(model, examples, ROWS, batch_size=4)
    assert set(metrics) == {"exact_match", "f1"} and 0.0 <= metrics["f1"] <= 100.0
    with pytest.raises(InvalidArgumentError, match="examples_meta"):
        task.compute_metrics(logits, batches)


def test_qa_view_in_a_distiller(windows: tuple[QuestionAnsweringTask, list[dict]]) -> None:
    task, examples = windows
    batch = task.collate(examples[:4])
    teacher = tiny_bert("qa")
    distiller = Distiller(
        from_teacher(teacher, [0]), teacher, Objective(kd_weight=1.0, hard_weight=1.0), view=task.view
    )
    module = distiller.setup(batch)
    counts = distiller.count_units(batch)
    assert counts["logit_positions"] == counts["label_positions"] == 8  # start and end rows of 4 windows
    terms = distiller.compute_terms(module, batch, {"kd": 1.0, "hard": 1.0}, 0, 1)
    assert terms["kd"].total.isfinite() and terms["hard"].total > 0


def test_answers_as_a_list_of_dicts() -> None:
    context = "Leonardo da Vinci painted the Mona Lisa in Florence."
    row = {"question": "Where?", "context": context, "answers": [{"text": "Florence", "answer_start": 43}]}
    [example] = QuestionAnsweringTask().preprocess([row], tokenizer=minilm_tokenizer())
    offsets = example["context_offsets"]
    assert context[offsets[example["start_positions"]][0] : offsets[example["end_positions"]][1]] == "Florence"


def test_bad_rows_and_settings() -> None:
    bad = {"question": "q?", "context": "abc def", "answers": {"text": ["xyz"], "answer_start": [4]}}
    with pytest.raises(InvalidArgumentError, match=r"row 0: the answer 'xyz' is not at answer_start 4"):
        QuestionAnsweringTask().preprocess([bad], tokenizer=minilm_tokenizer())
    with pytest.raises(InvalidArgumentError, match="doc_stride 64 must be >= 0 and smaller than max_length 64"):
        QuestionAnsweringTask(max_length=64, doc_stride=64)
    long_question = {**ROWS[3], "question": "who " * 30}
    with pytest.raises(InvalidArgumentError, match="row 1: the question takes 30 tokens, leaving 31 of max_length 64"):
        QuestionAnsweringTask(max_length=64, doc_stride=32).preprocess(
            [ROWS[3], long_question], tokenizer=minilm_tokenizer()
        )
    assert (
        QuestionAnsweringTask().stride_for(384) == 128 and QuestionAnsweringTask(max_length=128).stride_for(128) == 42
    )
    with pytest.raises(InvalidArgumentError, match="share a tokenizer"):
        QuestionAnsweringTask().preprocess(ROWS, tokenizer=minilm_tokenizer(), teacher_tokenizer=object())
