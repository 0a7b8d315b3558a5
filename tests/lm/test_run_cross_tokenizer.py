"""Causal-LM runs whose teacher tokenizes differently: without a cross-tokenizer method (the default) the run is
refused before anything is written, naming both tokenizers; ``distill.cross_tokenizer`` is refused by name for
causal-LM runs (not available for them yet) instead of being ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_run import write_model, write_records

from conftest import make_tiny_chat_tokenizer, make_tiny_llama
from kdistill.cli import main


def _teacher_with_its_own_tokenizer(directory: Path) -> Path:
    make_tiny_chat_tokenizer(vocab=100).save_pretrained(directory)  # a smaller vocabulary: other ids for words
    model = make_tiny_llama(vocab=100, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def run_yaml(tmp_path: Path) -> Path:
    config = {
        "task": "causal_lm",
        "data": {"files": {"train": str(write_records(tmp_path / "train.jsonl", 8))}, "max_length": 24},
        "teacher": {"path": str(_teacher_with_its_own_tokenizer(tmp_path / "teacher"))},
        "student": {"kind": "pretrained", "path": str(write_model(tmp_path / "student", num_layers=1, seed=4))},
        "distill": {"kd_weight": 1.0, "hard_weight": 0.0, "temperature": 1.0},
        "training": {"max_steps": 2, "batch_size": 4, "log_with": [], "progress": False},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_different_tokenizers_are_refused_naming_both(run_yaml: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", str(run_yaml)]) == 2
    error = capsys.readouterr().err
    assert "needs one tokenizer" in error
    student_size, teacher_size = len(make_tiny_chat_tokenizer()), len(make_tiny_chat_tokenizer(vocab=100))
    assert student_size != teacher_size
    assert f"student, {student_size} tokens" in error and f"teacher, {teacher_size} tokens" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["uld", "align"])
def test_cross_tokenizer_is_refused_by_name_for_causal_lm(run_yaml: Path, tmp_path: Path, capsys, method) -> None:
    assert main(["train", str(run_yaml), f"distill.cross_tokenizer={method}"]) == 2
    assert f"distill.cross_tokenizer='{method}' is not available for task causal_lm" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
