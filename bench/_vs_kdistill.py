"""kdistill's side of ``vs_peers.py``: the encoder ``Distiller`` + ``train()``, and the LLM step on both backends.

Runs in kdistill's venv (no peer installed). Each function runs one measurement in this process.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from typing import Any

import torch

from _vs_setup import (
    DEVICE,
    ENCODER_BATCH,
    LEARNING_RATE,
    TEMPERATURE,
    PeakMemory,
    StepClock,
    adamw,
    encoder_batches,
    encoder_models,
    llm_batch,
    llm_models,
    synchronize,
)
from kdistill.distillers import Distiller, Match, Objective, normalized_loss
from kdistill.integrations import DistillationArguments, DistillationTrainer
from kdistill.tasks.causal_lm import CausalLMView
from kdistill.training import TrainConfig, train

LOSS_NAMES = {0.0: "forward_kl", 1.0: "reverse_kl"}  # TRL's beta: 0 forward KL, 1 reverse KL, else the JSD


def _encoder_objective() -> Objective:
    """TextBrewer's configuration in kdistill's words: its ``kd_ce`` has no T² factor."""
    return Objective(
        kd_loss="kd_ce",
        kd_weight=1.0,
        hard_weight=0.0,
        temperature=TEMPERATURE,
        t2_scaling=False,
        matches=[Match(teacher="layer 3", student="layer 1"), Match(teacher="layer 6", student="layer 2")],
    )


def encoder_step0() -> float:
    teacher, student = encoder_models()
    batch = {key: value.to(DEVICE) for key, value in encoder_batches(1)[0].items()}
    distiller = Distiller(copy.deepcopy(student), teacher, _encoder_objective())
    module = distiller.setup(batch)
    module.eval()
    weights = distiller.objective.weights(0, 1)
    with torch.no_grad():
        terms = distiller.compute_terms(module, batch, weights, 0, 1)
        return float(normalized_loss(terms, weights, distiller.count_units(batch)))


def encoder(steps: int, warmup: int) -> dict[str, Any]:
    teacher, student = encoder_models()
    batches = encoder_batches(steps)
    examples = [
        {key: value[row] for key, value in batch.items()} for batch in batches for row in range(len(batch["labels"]))
    ]
    config = TrainConfig(
        output_dir="",
        max_steps=steps,
        batch_size=ENCODER_BATCH,
        learning_rate=LEARNING_RATE,
        lr_scheduler="constant",
        weight_decay=0.0,
        max_grad_norm=None,
        log_with=(),
        progress=False,
        log_every=10,
    )
    with tempfile.TemporaryDirectory() as tmp:
        config.output_dir = tmp
        clock = StepClock()
        train(Distiller(student, teacher, _encoder_objective()), examples, config)
    gaps = clock.intervals(warmup)
    return {"samples_per_second": ENCODER_BATCH / statistics.median(gaps), "step_seconds": gaps}


# ---------------------------------------------------------------- LLM


def _kd(beta: float) -> tuple[str, dict[str, float]]:
    return (LOSS_NAMES[beta], {}) if beta in LOSS_NAMES else ("generalized_jsd", {"beta": beta})


def _trainer_loss(beta: float, hard_weight: float, student: torch.nn.Module, teacher: torch.nn.Module, tmp: str):
    name, kwargs = _kd(beta)
    args = DistillationArguments(
        output_dir=tmp,
        kd_loss=name,
        kd_kwargs=kwargs,
        kd_weight=1.0,
        hard_weight=hard_weight,
        temperature=1.0,
        chunked_loss=True,
        chunk_size=1024,
        report_to=[],
        use_cpu=True,
        learning_rate=LEARNING_RATE,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=[llm_batch()])

    def loss_fn(batch: dict[str, Any]) -> torch.Tensor:
        count = int((batch["labels"][:, 1:] != -100).sum())
        return trainer.compute_loss(student, batch, num_items_in_batch=count)

    return loss_fn


def _engine_loss(beta: float, hard_weight: float, student: torch.nn.Module, teacher: torch.nn.Module, tmp: str):
    name, kwargs = _kd(beta)
    objective = Objective(kd_loss=name, kd_kwargs=kwargs, kd_weight=1.0, hard_weight=hard_weight, temperature=1.0)
    distiller = Distiller(student, teacher, objective, view=CausalLMView(), chunked=True, chunk_size=1024)
    module = distiller.setup(llm_batch())
    weights = objective.weights(0, 1)

    def loss_fn(batch: dict[str, Any]) -> torch.Tensor:
        terms = distiller.compute_terms(module, batch, weights, 0, 1)
        return normalized_loss(terms, weights, distiller.count_units(batch))

    return loss_fn


LLM_PATHS = {"kdistill-trainer": _trainer_loss, "kdistill-engine": _engine_loss}


def llm_step0(path: str, beta: float, hard_weight: float) -> float:
    teacher, student = llm_models()
    with tempfile.TemporaryDirectory() as tmp:
        loss_fn = LLM_PATHS[path](beta, hard_weight, student, teacher, tmp)
        student.eval()
        with torch.no_grad():
            return float(loss_fn(llm_batch()))


def llm(path: str, beta: float, hard_weight: float, steps: int, warmup: int) -> dict[str, Any]:
    teacher, student = llm_models()
    batch = llm_batch()
    with tempfile.TemporaryDirectory() as tmp:
        loss_fn = LLM_PATHS[path](beta, hard_weight, student, teacher, tmp)
        student.train()
        optimizer = adamw(student)
        memory, times = PeakMemory(), []
        for _ in range(steps):
            start = time.perf_counter()
            loss = loss_fn(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
            synchronize()
            times.append(time.perf_counter() - start)
    return {"step_seconds": times[warmup:], "peak_bytes": memory.growth()}
