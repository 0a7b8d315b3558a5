"""The two training backends optimize one objective: on the same batches with the same optimizer they log the same
losses and end with the same weights.

The engine (:class:`~kdistill.distillers.Distiller` over :class:`~kdistill.tasks.causal_lm.CausalLMView`, trained by
:func:`kdistill.training.train`) and :class:`~kdistill.integrations.DistillationTrainer` draw their batches with
different samplers, so the data is 8 examples, micro-batches of 4 and accumulation 2: every optimizer step of both
backends holds the whole training set, whatever order each sampler draws (the order only changes float rounding, and
padding, which the attention mask hides). Rows have unequal lengths and prompts, so a per-micro-batch mean would
weigh them differently on the two sides; the weights and the temperature follow schedules over the steps, which both
backends must read at the same step; three epochs make three steps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from kdistill.data.sft_collate import SFTCollator
from kdistill.distillers import Distiller, Objective
from kdistill.integrations import DistillationArguments, DistillationTrainer
from kdistill.tasks.causal_lm import CausalLMView
from kdistill.training import TrainConfig, train

EPOCHS = 3
LEARNING_RATES = {"sgd": 0.05, "adamw": 3e-3}
KD_WEIGHT = {"name": "linear", "start": 1.0, "end": 0.4}
TEMPERATURE = {"name": "linear", "start": 3.0, "end": 1.0}
HARD_WEIGHT = 0.3


def _examples() -> list[dict[str, list[int]]]:
    """8 records of 3..12 tokens, the first 1..3 of them a masked prompt (unpadded: the collator pads)."""
    generator = torch.Generator().manual_seed(7)
    rows = []
    for i in range(8):
        length = 3 + (i * 5) % 10
        ids = torch.randint(5, 120, (length,), generator=generator).tolist()
        prompt = 1 + i % 3
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _models() -> tuple[nn.Module, nn.Module]:
    return make_tiny_llama(num_layers=1, hidden=16, seed=1), make_tiny_llama(num_layers=2, seed=0)


def _engine(tmp_path: Path, optimizer: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    student, teacher = _models()
    objective = Objective(kd_weight=KD_WEIGHT, hard_weight=HARD_WEIGHT, temperature=TEMPERATURE)
    config = TrainConfig(
        output_dir=str(tmp_path / "engine"), num_epochs=EPOCHS, batch_size=4, gradient_accumulation_steps=2,
        learning_rate=LEARNING_RATES[optimizer], optimizer=optimizer, sgd_momentum=0.9, weight_decay=0.01,
        lr_scheduler="linear", max_grad_norm=1.0, log_every=1, seed=0, log_with=(), progress=False,
    )  # fmt: skip
    result = train(Distiller(student, teacher, objective, view=CausalLMView()), _examples(), config,
                   collate_fn=SFTCollator(pad_token_id=0))  # fmt: skip
    losses = [record["train/loss"] for record in result.history if "train/loss" in record]
    return losses, {name: p.detach().clone() for name, p in student.named_parameters()}


def _trainer(tmp_path: Path, optimizer: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    student, teacher = _models()
    options: dict[str, Any] = {"optim": "sgd", "optim_args": "momentum=0.9"} if optimizer == "sgd" else {}
    args = DistillationArguments(
        output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no",
        num_train_epochs=EPOCHS, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=LEARNING_RATES[optimizer], weight_decay=0.01, lr_scheduler_type="linear", max_grad_norm=1.0,
        logging_steps=1, seed=0, dataloader_num_workers=0,
        kd_weight=KD_WEIGHT, hard_weight=HARD_WEIGHT, temperature=TEMPERATURE, **options,
    )  # fmt: skip
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_examples(),
                                  data_collator=SFTCollator(pad_token_id=0))  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {name: p.detach().clone() for name, p in student.named_parameters()}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_engine_and_trainer_give_the_same_losses_and_weights(tmp_path: Path, optimizer: str) -> None:
    counts = [sum(label != -100 for label in row["labels"][1:]) for row in _examples()]
    assert len(set(counts)) > 4  # rows of unequal weight: a per-micro-batch mean would tell the backends apart
    engine_losses, engine_weights = _engine(tmp_path, optimizer)
    trainer_losses, trainer_weights = _trainer(tmp_path, optimizer)
    assert len(engine_losses) == len(trainer_losses) == EPOCHS
    assert trainer_losses == pytest.approx(engine_losses, rel=1e-5)
    assert engine_losses[0] != pytest.approx(engine_losses[-1], rel=1e-2)  # the student (and the schedules) moved
    initial = dict(_models()[0].named_parameters())
    moved = max(float((engine_weights[n] - initial[n]).abs().max()) for n in engine_weights)
    assert moved > 1e-3
    difference = max(float((trainer_weights[n] - engine_weights[n]).abs().max()) for n in engine_weights)
    print(f"{optimizer}: largest update {moved:.3e}, largest difference between backends {difference:.3e}")
    assert math.isfinite(difference) and difference <= 1e-5
