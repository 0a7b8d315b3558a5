"""The peers' side of ``vs_peers.py``: TextBrewer's GeneralDistiller and TRL's two distillation loss paths.

Runs in the peer venv (TextBrewer 0.2.1, TRL 1.16.0, no kdistill). Each function runs one measurement in this process
and returns a dict that ``vs_peers.py`` prints as JSON. The peers' own code computes the loss: TextBrewer's distiller
loop as its ``train`` runs it; TRL's ``GKDTrainer.compute_loss`` (full logits, ``generalized_jsd_loss``) and its
``DistillationTrainer``'s chunked path (``_get_last_hidden_state`` + ``_chunked_divergence_loss``), each called on a
stand-in ``self`` that carries only the attributes those methods read.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

from _vs_setup import (
    DEVICE,
    ENCODER_BATCH,
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

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore")
from trl.experimental.gkd import GKDTrainer  # noqa: E402
from trl.trainer.distillation_trainer import DistillationTrainer, _chunked_divergence_loss  # noqa: E402

INPUT_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def _adaptor(batch: dict[str, Any], outputs: Any) -> dict[str, Any]:
    return {"logits": outputs.logits, "hidden": outputs.hidden_states, "inputs_mask": batch["attention_mask"]}


def _textbrewer(teacher: torch.nn.Module, student: torch.nn.Module, output_dir: str, steps: int) -> GeneralDistiller:
    matches = [
        {"layer_T": 3, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1},
        {"layer_T": 6, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1},
    ]
    distill = DistillationConfig(
        temperature=TEMPERATURE,
        kd_loss_type="ce",
        kd_loss_weight=1.0,
        hard_label_weight=0.0,
        intermediate_matches=matches,
    )
    train = TrainingConfig(device=str(DEVICE), output_dir=output_dir, ckpt_steps=steps, log_dir=None)
    return GeneralDistiller(train, distill, teacher, student, _adaptor, _adaptor)


def encoder_step0() -> float:
    """The loss on the first batch with dropout off, as TextBrewer computes it."""
    teacher, student = encoder_models()
    teacher.eval().requires_grad_(False)
    student.eval()
    batch = {key: encoder_batches(1)[0][key].to(DEVICE) for key in INPUT_KEYS}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        distiller = _textbrewer(teacher, student, tmp, 1)
        loss, _ = distiller.train_on_batch(batch, {"output_hidden_states": True})
    return float(loss)


def encoder(steps: int, warmup: int) -> dict[str, Any]:
    teacher, student = encoder_models()
    teacher.eval().requires_grad_(False)  # TextBrewer's own loop puts the teacher in eval mode likewise
    batches = [{key: b[key] for key in INPUT_KEYS} for b in encoder_batches(steps)]
    optimizer = adamw(student)
    with tempfile.TemporaryDirectory() as tmp:
        distiller = _textbrewer(teacher, student, tmp, steps)
        clock = StepClock()
        distiller.train(optimizer, batches, num_steps=steps, max_grad_norm=-1, output_hidden_states=True)
    gaps = clock.intervals(warmup)
    return {"samples_per_second": ENCODER_BATCH / statistics.median(gaps), "step_seconds": gaps}


# ---------------------------------------------------------------- TRL


def _gkd_loss(
    student: torch.nn.Module, teacher: torch.nn.Module, batch: dict[str, Any], beta: float, hard_weight: float
) -> torch.Tensor:
    """TRL's GKD loss (``GKDTrainer.compute_loss``), plus ``hard_weight`` × the student's next-token CE when > 0
    (GKD has no CE term; a TRL user adds one from the student's logits, as here)."""
    fake = SimpleNamespace(teacher_model=teacher, beta=beta, generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)
    loss, outputs = GKDTrainer.compute_loss(fake, student, batch, return_outputs=True)
    if hard_weight:
        logits = outputs.logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
        loss = loss + hard_weight * ce
    return loss


def _trl_chunked_loss(
    student: torch.nn.Module, teacher: torch.nn.Module, batch: dict[str, Any], beta: float, hard_weight: float
) -> torch.Tensor:
    """TRL's ``DistillationTrainer`` chunked path: last hidden states of the completion positions, then
    ``_chunked_divergence_loss`` over both LM heads (it has no CE term: ``hard_weight`` must be 0)."""
    if hard_weight:
        raise SystemExit("TRL's DistillationTrainer has no CE term")
    keys = {"logits_to_keep", "input_ids", "attention_mask"}
    fake = SimpleNamespace(model_kwarg_keys=keys, _is_vlm=False)
    completion = int((batch["labels"][0] != -100).sum())
    ids, mask = batch["input_ids"], batch["attention_mask"]
    student_hidden = DistillationTrainer._get_last_hidden_state(fake, student, ids, mask, completion)
    with torch.no_grad():
        teacher_hidden = DistillationTrainer._get_last_hidden_state(fake, teacher, ids, mask, completion)
    completion_mask = mask[:, -completion:]
    loss, _, _ = _chunked_divergence_loss(
        student_hidden, teacher_hidden, student.lm_head.weight, teacher.lm_head.weight, completion_mask, beta
    )
    return loss


LLM_PATHS = {"trl-gkd": _gkd_loss, "trl-chunked": _trl_chunked_loss}


def llm_step0(path: str, beta: float, hard_weight: float) -> float:
    teacher, student = llm_models()
    teacher.eval().requires_grad_(False)
    student.eval()
    with torch.no_grad():
        return float(LLM_PATHS[path](student, teacher, llm_batch(), beta, hard_weight))


def llm(path: str, beta: float, hard_weight: float, steps: int, warmup: int) -> dict[str, Any]:
    """One process, ``steps`` optimizer steps of loss + backward + AdamW; peak RSS growth over the models'."""
    teacher, student = llm_models()
    teacher.eval().requires_grad_(False)
    batch, optimizer = llm_batch(), adamw(student)
    loss_fn = LLM_PATHS[path]
    memory, times = PeakMemory(), []
    for _ in range(steps):
        start = time.perf_counter()
        loss = loss_fn(student, teacher, batch, beta, hard_weight)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
        synchronize()
        times.append(time.perf_counter() - start)
    return {"step_seconds": times[warmup:], "peak_bytes": memory.growth()}
