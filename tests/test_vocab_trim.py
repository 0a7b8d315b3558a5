"""Vocabulary trimming and factorized embeddings: the trimmed student reads every text as the teacher splits it,
loads with AutoTokenizer / AutoModel, and computes what the untrimmed one computes on text it kept."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent / "cli"))
from cli_support import save_tiny_bert, sentiment_rows, write_csv, write_yaml

from kdistill.cli import main
from kdistill.config import load_config
from kdistill.errors import InvalidArgumentError
from kdistill.models.birnn import BiRNNClassifier, BiRNNConfig
from kdistill.models.vocab import factorize_embedding, trim_embeddings, trim_tokenizer, used_token_ids

TRAIN = ["the movie was good", "the food is very bad", "mary loves paris"]
UNSEEN = ["london is awful", "a happy day at acme corp", "zzz qqq"]


@pytest.fixture
def tiny(tmp_path):
    path = save_tiny_bert(tmp_path / "bert", num_labels=2)
    return AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_a_trimmed_tokenizer_splits_as_the_original_and_reads_dropped_pieces_as_unk(tiny, tmp_path):
    _, tokenizer = tiny
    keep = used_token_ids(tokenizer, TRAIN)
    assert set(tokenizer.all_special_ids) <= set(keep) and len(keep) < len(tokenizer)
    trimmed = trim_tokenizer(tokenizer, keep)
    trimmed.save_pretrained(tmp_path / "tok")
    assert not (tmp_path / "tok" / "vocab.txt").exists()
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    new_of = {old: new for new, old in enumerate(keep)}
    unk = new_of[tokenizer.unk_token_id]
    for text in TRAIN + UNSEEN:
        original = tokenizer(text)["input_ids"]
        expected = [new_of.get(i, unk) for i in original]  # one piece for one piece; dropped ones read [UNK]
        assert trimmed(text)["input_ids"] == expected
        assert reloaded(text)["input_ids"] == expected
        assert max(expected) < len(keep)
    assert unk in reloaded("zzz qqq")["input_ids"]
    assert trimmed(TRAIN[0])["input_ids"].count(unk) == 0


def test_min_count_drops_rare_pieces(tiny):
    _, tokenizer = tiny
    texts = ["good good good", "good bad", "paris"]
    keep = used_token_ids(tokenizer, texts, min_count=2)
    ids = {tokenizer.convert_tokens_to_ids(w) for w in ("good", "bad", "paris")}
    assert tokenizer.convert_tokens_to_ids("good") in keep and not (
        ids - {tokenizer.convert_tokens_to_ids("good")}
    ) & set(keep)


def test_a_trimmed_model_computes_what_the_full_one_does_and_loads_with_automodel(tiny, tmp_path):
    model, tokenizer = tiny
    keep = used_token_ids(tokenizer, TRAIN)
    full = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert").eval()
    trimmed_model = trim_embeddings(model, keep)
    trimmed = trim_tokenizer(tokenizer, keep)
    assert trimmed_model.config.vocab_size == len(keep)
    assert trimmed_model.get_input_embeddings().weight.shape == (len(keep), full.config.hidden_size)
    trimmed_model.save_pretrained(tmp_path / "student")
    trimmed.save_pretrained(tmp_path / "student")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    batch_full = tokenizer(TRAIN, padding=True, return_tensors="pt")
    batch_trimmed = loaded_tokenizer(TRAIN, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = full(**batch_full).logits
        got = loaded(**batch_trimmed).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_a_factorized_embedding_is_the_truncated_svd_and_saves(tmp_path):
    torch.manual_seed(0)
    model = BiRNNClassifier(BiRNNConfig(vocab_size=50, num_labels=3, embedding_dim=24, hidden_size=8))
    weight = model.embedding.weight.detach().double().clone()
    small = factorize_embedding(model, 6, seed=3)
    assert small.config.embedding_dim == 6 and small.rnn.module.input_size == 6
    rows = small.embedding.weight.detach().double()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # Eckart-Young: rows @ V_r^T is the best rank-6 fit
    torch.testing.assert_close(rows @ vh[:6], (u[:, :6] * s[:6]) @ vh[:6], rtol=0, atol=5e-5)
    assert float((rows @ vh[:6] - weight).norm()) == pytest.approx(float(s[6:].pow(2).sum().sqrt()), rel=1e-4)
    again = factorize_embedding(model, 6, seed=3)  # the fresh recurrent layer is seeded
    torch.testing.assert_close(again.rnn.module.weight_ih_l0, small.rnn.module.weight_ih_l0)
    small.save_pretrained(tmp_path / "rnn")
    assert json.loads((tmp_path / "rnn" / "config.json").read_text())["embedding_dim"] == 6
    loaded = BiRNNClassifier.from_pretrained(tmp_path / "rnn")
    batch = torch.randint(0, 50, (2, 7))
    small.eval()
    torch.testing.assert_close(loaded(batch).logits, small(batch).logits)
    with pytest.raises(InvalidArgumentError, match="between 1 and the embedding size"):
        factorize_embedding(loaded, 6)


def _run(tmp_path: Path, student: dict, **more) -> dict:
    teacher = save_tiny_bert(tmp_path / "teacher", num_labels=2)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(64, seed=1))
    valid = write_csv(tmp_path / "valid.csv", sentiment_rows(16, seed=2))
    return {
        "task": "sequence_classification",
        "data": {"files": {"train": str(train), "validation": str(valid)}, "label_names": ["negative", "positive"]},
        "teacher": {"path": str(teacher)},
        "student": student,
        "training": {"batch_size": 16, "max_steps": 4, "log_with": [], "progress": False},
        "output_dir": str(tmp_path / "run"),
        **more,
    }


@pytest.mark.parametrize(
    "student",
    [
        {"kind": "from_teacher", "layers": [0, 3], "trim_vocab": True},
        {
            "kind": "shrink",
            "num_layers": 2,
            "hidden_size": 16,
            "num_heads": 2,
            "intermediate_size": 32,
            "trim_vocab": True,
        },
        {"kind": "bilstm", "hidden_size": 8, "trim_vocab": True, "trim_min_count": 2, "embed_rank": 4},
    ],
)
def test_runs_with_trimmed_students_save_what_loads(tmp_path, capsys, student):
    config = _run(tmp_path, student)
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", json.dumps(config)))]) == 0
    printed = capsys.readouterr().out
    assert "student vocabulary trimmed to the" in printed
    saved = tmp_path / "run" / "student"
    tokenizer = AutoTokenizer.from_pretrained(saved)
    rows = json.loads((saved / "config.json").read_text())["vocab_size"]
    texts = [r["text"] for r in sentiment_rows(64, seed=1)]
    ids = [i for row in tokenizer(texts + UNSEEN)["input_ids"] for i in row]
    assert max(ids) < rows < 60  # the tiny tokenizer has 90 pieces
    assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "eval.json")]) == 0
    assert "accuracy" in json.loads((tmp_path / "eval.json").read_text())
    capsys.readouterr()
    assert main(["params", str(saved)]) == 0
    record = json.loads((saved / "trimmed_vocabulary.json").read_text())
    pieces = len(AutoTokenizer.from_pretrained(tmp_path / "teacher"))
    assert record["kept"] == rows and record["of"] == pieces
    assert f"vocabulary trimmed to {rows:,} of {pieces} word pieces" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "token_classification"}, "student.trim_vocab trims sequence-classification students"),
        ({"student": {"kind": "from_teacher", "embed_rank": 8}}, "student.embed_rank factorizes a BiRNN's embedding"),
        ({"student": {"kind": "bilstm", "vocab": "own", "trim_vocab": True}}, "vocab: own is already"),
    ],
)
def test_bad_trimming_settings_are_refused_by_name(tmp_path, change, message):
    config = {**_run(tmp_path, {"kind": "from_teacher", "trim_vocab": True}), **change}
    with pytest.raises(ValueError, match=message):
        load_config(data=config)


def test_a_bpe_tokenizer_is_refused(tiny_chat_tokenizer):
    with pytest.raises(InvalidArgumentError, match="trims WordPiece vocabularies"):
        trim_tokenizer(tiny_chat_tokenizer, [0, 1, 2])


def test_compare_shows_what_trimming_saved(tmp_path, capsys):
    config = _run(tmp_path, {"kind": "from_teacher", "layers": [0, 3], "trim_vocab": True})
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", json.dumps(config)))]) == 0
    capsys.readouterr()
    args = ["compare", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "run"), "--data"]
    assert main([*args, str(tmp_path / "run"), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["models"]
    teacher, student = rows
    record = json.loads((tmp_path / "run" / "student" / "trimmed_vocabulary.json").read_text())
    assert teacher["vocabulary"] is None and student["vocabulary"] == record
    width = student["embedding_width"]
    assert student["embedding_params"] == record["kept"] * width  # a plain embedding: one row per kept piece
    assert f"vocabulary trimmed to {record['kept']:,} of {record['of']:,} word pieces" in printed
