"""``distill.kd_kwargs.vocab_policy`` in evaluation as in training: a student with 8 more vocabulary entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_run_backends import _config
from transformers import AutoModelForCausalLM

from conftest import make_tiny_chat_tokenizer, make_tiny_llama
from kdistill.config import load_config
from kdistill.data.sft import render_sft
from kdistill.data.sft_collate import SFTCollator
from kdistill.errors import VocabMismatchError
from kdistill.runs.run import run


def _student(directory: Path) -> Path:
    make_tiny_chat_tokenizer().save_pretrained(directory)
    make_tiny_llama(num_layers=2, vocab=136, seed=5).save_pretrained(directory)
    return directory


def _reference(student, teacher, records: Path, policy: str) -> dict[str, float]:
    """Agreement and KL(teacher || student) per counted next token, in float64, written here from the definition."""
    tokenizer = make_tiny_chat_tokenizer()
    examples = render_sft([json.loads(line) for line in records.read_text().splitlines()], tokenizer, max_length=32)
    batch = SFTCollator(pad_token_id=tokenizer.pad_token_id)(list(examples))
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s, t = student(**inputs).logits.double(), teacher(**inputs).logits.double()
    counted = torch.zeros_like(batch["labels"], dtype=torch.bool)
    counted[:, :-1] = batch["labels"][:, 1:] != -100
    s, t = s[counted], t[counted]  # (n, 136), (n, 128)
    if policy == "truncate":
        s = s[:, :128]
    else:  # pad: the teacher gains 8 columns equal to its row's smallest logit
        t = torch.cat([t, t.min(-1, keepdim=True).values.expand(-1, 8)], -1)
    p_t, log_p_s = t.softmax(-1), s.log_softmax(-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1)
    return {
        "kl_to_teacher": float(kl.mean()),
        "teacher_agreement": float((s.argmax(-1) == t.argmax(-1)).double().mean()),
    }


@pytest.mark.parametrize("backend", ["trainer", "engine"])
@pytest.mark.parametrize("policy", ["truncate", "pad"])
def test_evaluation_compares_the_vocabularies_as_training_does(tmp_path: Path, backend: str, policy: str) -> None:
    config = _config(
        tmp_path, backend, training={"num_epochs": 1}, distill={"kd_kwargs": {"vocab_policy": policy}},
    )  # fmt: skip
    config["student"] = {"kind": "pretrained", "path": str(_student(tmp_path / "student-init"))}
    result = run(load_config(data=config))
    scores = json.loads((result.output_dir / "eval.json").read_text())
    student = AutoModelForCausalLM.from_pretrained(result.student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    reference = _reference(student, teacher, Path(config["data"]["files"]["validation"]), policy)
    assert scores["validation/kl_to_teacher"] == pytest.approx(reference["kl_to_teacher"], rel=1e-4)
    assert scores["validation/teacher_agreement"] == pytest.approx(reference["teacher_agreement"])


def test_differing_vocabularies_without_a_policy_are_refused_before_training(tmp_path: Path) -> None:
    config = _config(tmp_path, "trainer")
    config["student"] = {"kind": "pretrained", "path": str(_student(tmp_path / "student-init"))}
    with pytest.raises(VocabMismatchError, match=r"136.*128|128.*136"):
        run(load_config(data=config))
    assert not (tmp_path / "run-trainer" / "run.json").exists()
