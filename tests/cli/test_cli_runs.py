"""The real CLI end to end on tiny models and tiny data, for every task: train, eval, compare, report, params."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from cli_support import QUIET, save_tiny_bert, sentiment_rows, write_conll, write_csv, write_squad, write_yaml

from kdistill.cli import main


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("sentiment")
    teacher = save_tiny_bert(root / "teacher", num_labels=2)
    train = write_csv(root / "train.csv", sentiment_rows(96, seed=1))
    valid = write_csv(root / "valid.csv", sentiment_rows(32, seed=2))
    return root, teacher, train, valid


def _config(root: Path, teacher: Path, train: Path, valid: Path, body: str) -> Path:
    text = f"""task: sequence_classification
data:
  files: {{train: {train}, validation: {valid}}}
  label_names: [negative, positive]
teacher:
  path: {teacher}
training:
  batch_size: 32
  learning_rate: 2.0e-3
  lr_scheduler: constant
  max_steps: 12
{QUIET}{body}"""
    return write_yaml(root / f"run-{abs(hash(body)) % 10**8}.yaml", text)


def test_train_teacher_then_distil_then_eval_compare_report_params(sentiment, capsys):
    root, teacher, train, valid = sentiment
    # 1. train the teacher on the task
    teacher_cfg = _config(root, teacher, train, valid, f"mode: train_teacher\noutput_dir: {root / 'teacher-run'}\n")
    assert main(["train", str(teacher_cfg), "training.max_steps=45"]) == 0
    teacher_run = root / "teacher-run"
    assert json.loads((teacher_run / "run.json").read_text())["status"] == "complete"
    teacher_eval = json.loads((teacher_run / "eval.json").read_text())
    assert teacher_eval["validation/accuracy"] > 0.75  # the cue words make this learnable
    # 2. distil it into a 2-layer student copied from its layers, with a hidden match
    body = f"""student:
  kind: from_teacher
  layers: [0, 3]
distill:
  kd_weight: 0.7
  hard_weight: 0.3
  temperature: 2.0
  layer_map: uniform
output_dir: {root / "distilled"}
"""
    cfg = _config(root, teacher_run / "student", train, valid, body)
    assert main(["train", str(cfg), "training.max_steps=20"]) == 0
    run = root / "distilled"
    assert (run / "config.yaml").is_file() and "layer_map: uniform" in (run / "config.yaml").read_text()
    assert (run / "student" / "model.safetensors").is_file() and (run / "student" / "tokenizer.json").is_file()
    assert (run / "projections.safetensors").is_file()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train/kd", "train/hard", "train/hidden:layer 2->layer 1", "train/hidden:layer 4->layer 2"} <= set(
        lines[-1]
    )
    # 3. eval writes the numbers it prints
    capsys.readouterr()
    assert main(["eval", str(run), "--out", str(root / "eval.json")]) == 0
    printed = capsys.readouterr().out
    written = json.loads((root / "eval.json").read_text())
    assert f"{written['accuracy']:.4f}" in printed
    assert written["accuracy"] == json.loads((run / "eval.json").read_text())["validation/accuracy"]
    # 4. compare: teacher vs student, with a compare.json
    assert main(["compare", "--teacher", str(teacher_run), "--student", str(run), "--data", str(run),
                 "--out", str(root / "cmp")]) == 0  # fmt: skip
    result = json.loads((root / "cmp" / "compare.json").read_text())
    rows = {row["name"]: row for row in result["models"]}
    assert rows["distilled"]["params"] < rows["teacher"]["params"]
    assert rows["distilled"]["compression"] == pytest.approx(rows["teacher"]["params"] / rows["distilled"]["params"])
    assert 0.0 <= rows["distilled"]["agreement"] <= 1.0 and rows["distilled"]["latency_p50_ms"] > 0
    assert "accuracy" in capsys.readouterr().out
    # 5. report: one HTML file with embedded images
    (run / "compare.json").write_text((root / "cmp" / "compare.json").read_text())
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    images = _img_sources(html)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    # 6. params
    assert main(["params", str(run), "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "bert" in out and "classifier" in out and "total" in out


def test_baseline_and_bilstm_students(sentiment):
    root, teacher, train, valid = sentiment
    baseline = _config(root, teacher, train, valid, f"mode: baseline\nstudent: {{kind: shrink, num_layers: 1, "
                       f"hidden_size: 16, num_heads: 2}}\noutput_dir: {root / 'baseline'}\n")  # fmt: skip
    assert main(["train", str(baseline)]) == 0
    assert json.loads((root / "baseline" / "run.json").read_text())["status"] == "complete"
    bilstm = _config(root, teacher, train, valid, f"student: {{kind: bilstm, vocab: own, hidden_size: 16, "
                     f"embed_dim: 16}}\noutput_dir: {root / 'bilstm'}\n")  # fmt: skip
    assert main(["train", str(bilstm)]) == 0
    saved = json.loads((root / "bilstm" / "student" / "config.json").read_text())
    assert saved["rnn"] == "lstm" and saved["hidden_size"] == 16
    assert list((root / "bilstm" / "student").glob("word_tokenizer*.json"))
    assert main(["eval", str(root / "bilstm")]) == 0


def test_token_classification_run(tmp_path):
    teacher = save_tiny_bert(tmp_path / "teacher", task="token", num_labels=5)
    train, valid = write_conll(tmp_path / "train.conll", 40, seed=1), write_conll(tmp_path / "valid.conll", 10, seed=2)
    cfg = write_yaml(
        tmp_path / "ner.yaml",
        f"""task: token_classification
data:
  files: {{train: {train}, validation: {valid}}}
  label_names: [O, B-PER, I-PER, B-LOC, I-LOC]
teacher: {{path: {teacher}}}
student: {{kind: from_teacher, layers: [0, 3]}}
distill: {{kd_weight: 0.5, hard_weight: 0.5, temperature: 2.0}}
training:
  batch_size: 8
  learning_rate: 3.0e-3
  lr_scheduler: constant
  max_steps: 40
{QUIET}output_dir: {tmp_path / "ner"}
""",
    )
    assert main(["train", str(cfg)]) == 0
    metrics = json.loads((tmp_path / "ner" / "eval.json").read_text())
    assert {"validation/precision", "validation/recall", "validation/f1"} <= set(metrics)
    assert metrics["validation/f1"] > 0.5  # names and cities are learnable from the word identity


def test_question_answering_run(tmp_path):
    teacher = save_tiny_bert(tmp_path / "teacher", task="qa", num_labels=2)
    train, valid = write_squad(tmp_path / "train.jsonl", 40, seed=1), write_squad(tmp_path / "valid.jsonl", 8, seed=2)
    cfg = write_yaml(
        tmp_path / "qa.yaml",
        f"""task: question_answering
data:
  files: {{train: {train}, validation: {valid}}}
  max_length: 32
teacher: {{path: {teacher}}}
student: {{kind: from_teacher, layers: [0, 3]}}
distill: {{kd_weight: 0.5, hard_weight: 0.5}}
training:
  batch_size: 8
  learning_rate: 3.0e-3
  max_steps: 10
{QUIET}output_dir: {tmp_path / "qa"}
""",
    )
    assert main(["train", str(cfg)]) == 0
    metrics = json.loads((tmp_path / "qa" / "eval.json").read_text())
    assert {"validation/exact_match", "validation/f1"} <= set(metrics)
    assert 0.0 <= metrics["validation/f1"] <= 100.0


def _img_sources(html: str) -> list[str]:
    sources = []

    class Images(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                sources.append(dict(attrs).get("src", ""))

    Images().feed(html)
    return sources


def test_the_same_run_twice_gives_the_same_model(sentiment, tmp_path):
    """Everything random in a run comes from its seed: a task head drawn fresh on a base model (as with the
    packaged MiniLM) and the student's new weights, whatever the process drew before."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, BertModel

    _root, teacher, train, valid = sentiment
    base = tmp_path / "base"
    save_tiny_bert(base, num_labels=2)
    BertModel(AutoConfig.from_pretrained(teacher)).save_pretrained(base)  # no head: the run must draw one
    finals = []
    for name in ("a", "b"):
        torch.rand(7)  # the global RNG is elsewhere on the second run
        body = f"mode: train_teacher\noutput_dir: {tmp_path / name}\n"
        assert main(["train", str(_config(tmp_path, base, train, valid, body)), "training.max_steps=2"]) == 0
        finals.append(load_file(str(tmp_path / name / "student" / "model.safetensors")))
    assert finals[0].keys() == finals[1].keys() and any("classifier" in key for key in finals[0])
    for key, value in finals[0].items():
        assert torch.equal(value, finals[1][key]), key
