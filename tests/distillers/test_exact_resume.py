"""A run that dies mid-epoch and resumes ends with every tensor equal to an uninterrupted run, with dropout on,
examples of uneven lengths, accumulation and more than one epoch (the data loader draws nothing from the global
generator, so the dropout masks after the resume are the ones the uninterrupted run drew)."""

from __future__ import annotations

import pytest
import torch
from support import flat_state, teacher_and_student, toy_examples
from torch import nn

from kdistill.distillers import Distiller, Match, Objective
from kdistill.training import TrainConfig, train


def _distiller() -> tuple[Distiller, nn.Module]:
    teacher, student = teacher_and_student()
    for module in student.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.1
    objective = Objective(
        kd_weight=0.7, hard_weight=0.3, temperature=2.0,
        matches=[Match(teacher="layer 4", student="layer 2", projection="linear")],
    )  # fmt: skip
    return Distiller(student, teacher, objective), student


def _config(out, resume: bool = False, group: bool = False) -> TrainConfig:
    # 22 examples, micro-batches of 3, accumulation 2: 4 optimizer steps per epoch (the last one short), 3 epochs
    return TrainConfig(output_dir=str(out), num_epochs=3, batch_size=3, gradient_accumulation_steps=2,
                       learning_rate=3e-3, save_every=2, keep_last=3, resume=resume, progress=False, log_with=(),
                       seed=5, group_by_length=group)  # fmt: skip


@pytest.mark.parametrize("group", [False, True], ids=["shuffled", "grouped-by-length"])
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights_with_dropout(tmp_path, monkeypatch, group):
    examples = toy_examples(22, seed=4, min_len=2, max_len=14)
    whole, whole_student = _distiller()
    train(whole, examples, _config(tmp_path / "whole", group=group))

    broken, _ = _distiller()
    original, calls = Distiller.after_step, []

    def crash_at_step_6(self: Distiller) -> None:  # epoch 1, between the checkpoints of steps 6 and 8
        original(self)
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Distiller, "after_step", crash_at_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken, examples, _config(tmp_path / "resumed", group=group))
    monkeypatch.setattr(Distiller, "after_step", original)
    resumed, resumed_student = _distiller()
    train(resumed, examples, _config(tmp_path / "resumed", resume=True, group=group))

    expected, got = flat_state(whole_student), flat_state(resumed_student)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    expected_proj, got_proj = whole.projections_state(), resumed.projections_state()
    assert expected_proj and expected_proj.keys() == got_proj.keys()
    for key in expected_proj:
        assert torch.equal(expected_proj[key], got_proj[key]), key
