"""DistillationTrainer optimizes the engine's Objective: weights and temperature on schedules, stages, refusals.

Losses are compared with float64 references written here (forward KL and cross-entropy over the counted next-token
positions, by hand), at the weights and temperature each schedule has at the step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import HfArgumentParser

from conftest import make_tiny_llama
from kdistill.errors import InvalidArgumentError
from kdistill.integrations import DistillationArguments, DistillationTrainer

SEQ = 9


def _examples(n: int = 4) -> list[dict[str, torch.Tensor]]:
    """Right-padded rows of unequal lengths with masked prompts."""
    generator = torch.Generator().manual_seed(5)
    rows = []
    for i in range(n):
        length = 4 + (i * 3) % (SEQ - 3)
        ids = torch.randint(5, 120, (SEQ,), generator=generator)
        mask = (torch.arange(SEQ) < length).long()
        ids = ids * mask
        labels = ids.masked_fill(mask == 0, -100)
        labels[: 1 + i % 2] = -100
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def _stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def _args(tmp_path: Path, **options: Any) -> DistillationArguments:
    return DistillationArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no",
        **options,
    )  # fmt: skip


def _reference(student: nn.Module, teacher: nn.Module, batch: dict, kd_weight: float, hard_weight: float, t: float):
    """(kd_weight · T² · Σ KL_T(p_teacher ‖ p_student) + hard_weight · Σ CE) / counted positions, in float64."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s_logits, t_logits = student(**inputs).logits.double(), teacher(**inputs).logits.double()
    counted = batch["labels"][:, 1:] != -100
    s_rows, t_rows = s_logits[:, :-1][counted], t_logits[:, :-1][counted]  # position t predicts label t + 1
    targets = batch["labels"][:, 1:][counted]
    s_logp, t_logp = (s_rows / t).log_softmax(-1), (t_rows / t).log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum()
    ce = -s_rows.log_softmax(-1).gather(-1, targets[:, None]).sum()
    return float((kd_weight * t**2 * kl + hard_weight * ce) / counted.sum())


def test_scheduled_weights_temperature_and_stages_equal_a_float64_reference(tmp_path: Path) -> None:
    student = make_tiny_llama(num_layers=1, hidden=16, seed=1).double()
    teacher = make_tiny_llama(num_layers=2, seed=0).double()
    args = _args(
        tmp_path,
        kd_weight={"name": "linear", "start": 1.0, "end": 0.0},
        temperature={"name": "linear", "start": 3.0, "end": 1.0},
        hard_weight=0.5,
        stages=[{"steps": 1, "weights": {"kd": 0.0}}, {"steps": None, "weights": {}}],  # CE alone first
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_examples())
    batch = _stack(_examples())
    count = int((batch["labels"][:, 1:] != -100).sum())
    student.train()
    trainer.state.max_steps = 4
    for step in range(4):
        trainer.state.global_step = step
        loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=count)
        kd_weight = 0.0 if step == 0 else 1.0 - step / 4
        expected = _reference(student, teacher, batch, kd_weight, 0.5, 3.0 - 2.0 * step / 4)
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-10), step


def test_t2_scaling_off_and_a_constant_schedule_dict(tmp_path: Path) -> None:
    student = make_tiny_llama(num_layers=1, hidden=16, seed=1).double()
    teacher = make_tiny_llama(num_layers=2, seed=0).double()
    args = _args(tmp_path, kd_weight={"name": "constant", "value": 2.0}, temperature=2.0, t2_scaling=False)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_examples())
    batch = _stack(_examples())
    student.eval()  # evaluation: the batch's own count
    loss = trainer.compute_loss(student, dict(batch))
    assert float(loss) == pytest.approx(_reference(student, teacher, batch, 2.0 / 2.0**2, 0.0, 2.0), rel=1e-10)


def test_a_training_run_follows_the_stages(tmp_path: Path) -> None:
    """Stage 1 trains on the labels only (the logged kd_loss is not the training signal), stage 2 on KD only."""
    student, teacher = make_tiny_llama(num_layers=1, hidden=16, seed=1), make_tiny_llama(num_layers=2, seed=0)
    args = _args(
        tmp_path, max_steps=4, per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-2, optim="sgd",
        lr_scheduler_type="constant", kd_weight=1.0, hard_weight=1.0,
        stages=[{"steps": 2, "weights": {"kd": 0.0}}, {"steps": None, "weights": {"hard": 0.0}}],
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=_examples(), data_collator=_stack
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for entry in logs[:2]:  # the loss is the CE alone; the KD term was not computed
        assert "kd_loss" not in entry and entry["loss"] == pytest.approx(entry["ce_loss"], rel=1e-5)
    for entry in logs[2:]:
        assert "ce_loss" not in entry and entry["loss"] == pytest.approx(entry["kd_loss"], rel=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": {"name": "flsw", "beta": 1.0, "gamma": 1.0}}, r"per-position temperatures.*backend: engine"),
        ({"temperature": {"name": "linear", "start": 2, "end": 1}, "teacher_cache": "x"}, "cannot be a schedule"),
        ({"kd_weight": {"name": "nope"}}, "unknown schedule 'nope'"),
        ({"kd_weight": 0.0, "hard_weight": {"name": "constant", "value": 0.0}}, "both 0"),
        ({"stages": [{"steps": 2, "weights": {"matches": 0.0, "hidden": 1.0}}]}, "'hidden', which is not a term"),
        ({"stages": [{"step": 2}]}, "stages\\[0\\] has 'step'"),
        ({"kd_weight": -1.0}, "kd_weight must be ≥ 0"),
        ({"temperature": "warm"}, "unknown temperature schedule 'warm'"),
    ],
)
def test_bad_schedules_are_refused_by_name(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        _args(tmp_path, **options)


def test_the_arguments_parse_from_a_command_line(tmp_path: Path) -> None:
    (args,) = HfArgumentParser(DistillationArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--kd_loss", "reverse_kl", "--kd_weight", "0.3", "--hard_weight", "0.7",
         "--temperature", "2.0", "--use_cpu", "true", "--report_to", "none"]
    )  # fmt: skip
    assert (args.kd_loss, args.kd_weight, args.hard_weight, args.temperature) == ("reverse_kl", 0.3, 0.7, 2.0)
    assert args.objective().weights(0, 1) == {"kd": 0.3, "hard": 0.7}
