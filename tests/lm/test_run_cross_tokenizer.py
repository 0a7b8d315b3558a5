"""Causal-LM runs whose teacher tokenizes differently (``kdistill train`` with ``task: causal_lm``).

With ``distill.cross_tokenizer: uld`` or ``align`` the run trains a student with its own tokenizer (word level, 128
ids) from a teacher with a BPE tokenizer and another chat template (60 ids) and writes ``student/`` and ``eval.json``,
whose teacher metrics are marked not measured. Without a method the run is refused before anything is written,
naming both tokenizers and the option; so are the combinations that cannot work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_cross_tokenizer_loss import make_bpe_chat_tokenizer, make_teacher
from test_run import write_model, write_records
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny_chat_tokenizer
from kdistill.cli import main
from kdistill.runs.causal_lm import CROSS_NOT_MEASURED


def _teacher_with_its_own_tokenizer(directory: Path) -> Path:
    make_bpe_chat_tokenizer().save_pretrained(directory)
    make_teacher().save_pretrained(directory)
    return directory


@pytest.fixture
def run_config(tmp_path: Path) -> dict:
    return {
        "task": "causal_lm",
        "data": {
            "files": {
                "train": str(write_records(tmp_path / "train.jsonl", 8)),
                "validation": str(write_records(tmp_path / "validation.jsonl", 4, seed=1)),
            },
            "max_length": 40,
        },
        "teacher": {"path": str(_teacher_with_its_own_tokenizer(tmp_path / "teacher"))},
        "student": {"kind": "pretrained", "path": str(write_model(tmp_path / "student", num_layers=1, seed=4))},
        "distill": {"kd_weight": 1.0, "hard_weight": 0.5, "temperature": 1.0},
        "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "log_with": [], "progress": False},
        "output_dir": str(tmp_path / "run"),
    }


def _write(config: dict, tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_different_tokenizers_without_a_method_are_refused_naming_both(run_config, tmp_path: Path, capsys) -> None:
    assert main(["train", str(_write(run_config, tmp_path))]) == 2
    error = capsys.readouterr().err
    assert "needs one tokenizer" in error and "set distill.cross_tokenizer to 'uld' or 'align'" in error
    student_size, teacher_size = len(make_tiny_chat_tokenizer()), len(make_bpe_chat_tokenizer())
    assert student_size != teacher_size
    assert f"student, {student_size} tokens" in error and f"teacher, {teacher_size} tokens" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["uld", "align"])
def test_a_cross_tokenizer_run_writes_the_student_and_its_scores(run_config, tmp_path: Path, method: str) -> None:
    path = _write(run_config, tmp_path)
    assert main(["train", str(path), f"distill.cross_tokenizer={method}"]) == 0
    out = tmp_path / "run"
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    scores = json.loads((out / "eval.json").read_text())
    assert scores["not_measured"] == CROSS_NOT_MEASURED
    assert {"validation/perplexity", "validation/next_token_accuracy"} <= set(scores)
    assert not any("teacher" in key for key in scores)
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert AutoTokenizer.from_pretrained(out / "student").get_vocab() == make_tiny_chat_tokenizer().get_vocab()
    trained = dict(student.named_parameters())
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert any(not torch.equal(p, trained[name]) for name, p in start.named_parameters())  # it trained


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distill.chunked_loss=true"], "distill.chunked_loss cannot be used with distill.cross_tokenizer='uld'"),
        (["distill.on_policy_fraction=0.5"], "distill.on_policy_fraction=0.5 cannot be used with"),
        (["distill.teacher_cache=nowhere"], "distill.teacher_cache cannot be used with distill.cross_tokenizer"),
        (["student.kind=from_teacher", "student.layers=[0]"], "student and teacher share one tokenizer"),
    ],
)
def test_what_cannot_work_across_tokenizers_is_refused(run_config, tmp_path: Path, capsys, overrides, message):
    path = _write(run_config, tmp_path)
    assert main(["train", str(path), "distill.cross_tokenizer=uld", *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
