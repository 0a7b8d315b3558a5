"""Resuming reads nothing that can run code: a payload planted in a checkpoint is refused and never executed, and
the states kdistill writes (optimizer, scheduler, every generator) load with ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from support import teacher_and_student, toy_examples

from kdistill.distillers import Distiller, Objective
from kdistill.errors import KdistillError
from kdistill.training import TrainConfig, train
from kdistill.training.checkpoint import latest_checkpoint, rng_state, set_rng_state


class Payload:
    """Unpickling this runs a shell command (what an attacker would plant)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _config(out: Path, max_steps: int, resume: bool = False) -> TrainConfig:
    return TrainConfig(output_dir=str(out), max_steps=max_steps, batch_size=4, save_every=2, learning_rate=1e-3,
                       resume=resume, progress=False, log_with=(), seed=3)  # fmt: skip


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
@pytest.mark.parametrize("planted", ["scheduler.pt", "optimizer.pt", "rng-0.pt"])
def test_a_planted_checkpoint_file_is_refused_and_never_run(tmp_path, planted, writer):
    teacher, student = teacher_and_student()
    out = tmp_path / "run"
    train(Distiller(student, teacher, Objective(kd_weight=0.5, hard_weight=0.5)), toy_examples(24), _config(out, 4))
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None
    marker = tmp_path / "pwned"
    if writer == "torch.save":
        torch.save({"state": Payload(marker)}, checkpoint / planted)
    else:
        with open(checkpoint / planted, "wb") as handle:
            pickle.dump(Payload(marker), handle)
    with pytest.raises(KdistillError, match=rf"{planted} holds more than tensors"):
        train(Distiller(student, teacher, Objective(kd_weight=0.5, hard_weight=0.5)), toy_examples(24),
              _config(out, 6, resume=True))  # fmt: skip
    assert not marker.exists()


def test_every_generator_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
