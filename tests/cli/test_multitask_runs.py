"""Multi-task runs from YAML: one student body shared by a classification and an NER head, each saved loadably."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from cli_support import QUIET, save_tiny_bert, sentiment_rows, write_conll, write_csv, write_yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from kdistill.cli import main


def _multitask_yaml(root: Path, tasks: str, name: str = "mt.yaml", out: str = "mt") -> Path:
    return write_yaml(
        root / name,
        f"""student: {{kind: from_teacher, layers: [0, 3]}}
distill: {{kd_weight: 0.5, hard_weight: 0.5, temperature: 2.0}}
training:
  batch_size: 8
  learning_rate: 3.0e-3
  lr_scheduler: constant
  max_steps: 30
{QUIET}output_dir: {root / out}
tasks:
{tasks}""",
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask")
    sentiment_teacher = save_tiny_bert(root / "sentiment-teacher", num_labels=2, seed=1)
    ner_teacher = save_tiny_bert(root / "ner-teacher", task="token", num_labels=5, seed=2)
    files = {
        "s_train": write_csv(root / "s_train.csv", sentiment_rows(64, seed=1)),
        "s_valid": write_csv(root / "s_valid.csv", sentiment_rows(24, seed=2)),
        "n_train": write_conll(root / "n_train.conll", 24, seed=1),
        "n_valid": write_conll(root / "n_valid.conll", 8, seed=2),
    }
    tasks = f"""  - name: sentiment
    task: sequence_classification
    data: {{files: {{train: {files["s_train"]}, validation: {files["s_valid"]}}}, label_names: [negative, positive]}}
    teacher: {{path: {sentiment_teacher}}}
  - name: ner
    task: token_classification
    data:
      files: {{train: {files["n_train"]}, validation: {files["n_valid"]}}}
      label_names: [O, B-PER, I-PER, B-LOC, I-LOC]
    teacher: {{path: {ner_teacher}}}
    distill: {{temperature: 1.0}}
"""
    return root, tasks, files


def test_a_multitask_run_trains_one_body_and_saves_each_task_loadably(world):
    root, tasks, files = world
    assert main(["train", str(_multitask_yaml(root, tasks))]) == 0
    out = root / "mt"
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    metrics = json.loads((out / "eval.json").read_text())
    assert {"sentiment/validation/accuracy", "ner/validation/f1"} <= set(metrics)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/sentiment/kd" in r for r in records) and any("train/ner/kd" in r for r in records)
    sentiment = AutoModelForSequenceClassification.from_pretrained(out / "student" / "sentiment").eval()
    ner = AutoModelForTokenClassification.from_pretrained(out / "student" / "ner")
    assert sentiment.config.num_hidden_layers == ner.config.num_hidden_layers == 2
    # one body: the two saved students hold the same trained encoder weights, which moved from the teacher's
    saved = [load_file(str(out / "student" / task / "model.safetensors")) for task in ("sentiment", "ner")]
    body = [key for key in saved[0] if key.startswith("bert.encoder.")]
    assert body and all(torch.equal(saved[0][key], saved[1][key]) for key in body)
    teacher = load_file(str(root / "sentiment-teacher" / "model.safetensors"))
    assert any(not torch.equal(saved[0][key], teacher[key]) for key in body)
    # eval.json's accuracy is what the reloaded model scores on the validation file
    tokenizer = AutoTokenizer.from_pretrained(out / "student" / "sentiment")
    with open(files["s_valid"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = sentiment(**batch).logits.argmax(-1).tolist()
    gold = [["negative", "positive"].index(r["label"]) for r in rows]
    accuracy = sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(rows)
    assert metrics["sentiment/validation/accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace("name: ner", "name: sentiment"), "two tasks are named 'sentiment'"),
        (lambda t: t.replace("task: token_classification", "task: causal_lm"), "'causal_lm' cannot take part"),
        (
            lambda t: t.replace("name: ner", "name: ner\n    sampling_weight: 2"),
            "unknown key 'tasks.1.sampling_weight' (valid here: data, distill, name, task, teacher)",
        ),
    ],
)
def test_bad_multitask_configs_are_one_line(world, capsys, edit, expected):
    root, tasks, _ = world
    config = _multitask_yaml(root, edit(tasks), name="bad.yaml", out="bad")
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (root / "bad").exists()
