"""One run from a :class:`~kdistill.config.RunConfig`: data, teacher, student, distiller, training, evaluation.

The run directory holds ``run.json`` (``status``: running → complete, or failed with the error), the resolved
``config.yaml``, the engine's outputs (``student/`` with its tokenizer, ``projections.safetensors``,
``metrics.jsonl``, checkpoints, TensorBoard logs) and ``eval.json``. Everything that can be checked before
training — the config, the data's columns and labels, the models' sizes — is checked before the directory exists.

``task: causal_lm`` runs go to :func:`kdistill.runs.causal_lm.run_causal_lm`; ``mode: train_teacher`` runs are the
teacher's fine-tuning (:func:`kdistill.runs.teacher.train_teacher`); every other run is built by
:func:`kdistill.runs.parts.build_parts` and trained on the engine (:mod:`kdistill.runs.engine`).
"""

from __future__ import annotations

import time

from torch import nn

from kdistill.config import RunConfig
from kdistill.distillers import CrossTokenizerDistiller, Distiller, SupervisedTrainer
from kdistill.errors import KdistillError
from kdistill.runs.cache_checks import cached_teacher_parts
from kdistill.runs.causal_lm import run_causal_lm
from kdistill.runs.data import EVAL_SPLITS, load_data
from kdistill.runs.engine import train_and_evaluate
from kdistill.runs.parts import RunParts, build_objective, build_parts, evaluate, make_task, teacher_distiller
from kdistill.runs.records import RunResult, check_output_dir
from kdistill.runs.teacher import train_teacher


def run(config: RunConfig) -> RunResult:
    """Carry out one run; see the module docstring for what it writes."""
    if config.task == "causal_lm":
        return run_causal_lm(config)  # the Trainer integration: one implementation of LLM distillation
    start = time.perf_counter()
    check_output_dir(config)
    if config.mode == "train_teacher":
        splits = load_data(config)
        return train_teacher(config, make_task(config, splits), splits, start=start)

    parts = build_parts(config)  # data, tokenizers, teacher (fine-tuned if asked), student, examples
    assert parts.student is not None  # built for every mode but train_teacher
    train_examples, collate = parts.train_examples, parts.collate
    if config.mode == "baseline":
        distiller = SupervisedTrainer(parts.student, view=parts.task.view)
    elif config.distill.teacher_cache:  # the teacher's outputs from `kdistill cache`: the teacher never runs
        distiller, train_examples, collate = cached_teacher_parts(config, parts, build_objective(config, parts))
        parts.teacher = None  # built only to shape the student; the cache stands in for it, so it is not kept
    else:
        distiller = _live_distiller(config, parts)

    def evaluate_split(model: nn.Module, split: str) -> dict[str, float]:
        return evaluate(parts, model, split=split)

    return train_and_evaluate(
        config,
        distiller,
        parts.student,
        train_examples,
        collate,
        tokenizer=parts.student_tokenizer,
        evaluate=evaluate_split,
        eval_splits=[split for split in EVAL_SPLITS if parts.has_split(split)],
        start=start,
    )


def _live_distiller(config: RunConfig, parts: RunParts) -> Distiller:
    """The distiller of a run whose teacher (or teachers, or the student itself) run alongside the student."""
    objective = build_objective(config, parts)
    view = parts.task.view
    if parts.teacher is None:  # teacher: ema | self — the student teaches itself
        return teacher_distiller(config, parts, None, objective, view)
    teacher = parts.task.adapt_teacher(
        parts.teacher, tokenizer=parts.student_tokenizer, teacher_tokenizer=parts.teacher_tokenizer
    )
    if config.distill.cross_tokenizer is not None:  # token level: the teacher keeps its own tokens (make_task)
        if parts.extra_teachers:
            raise KdistillError(
                "distill.cross_tokenizer pairs one teacher's tokens with the student's; remove extra_teachers"
            )
        method = config.distill.cross_tokenizer
        return CrossTokenizerDistiller(parts.student, teacher, objective, method=method, view=view)
    return teacher_distiller(config, parts, teacher, objective, view)
