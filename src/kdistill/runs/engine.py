"""A run on kdistill's own training loop (:func:`kdistill.training.train`): the one translation of the config's
``training`` section into a :class:`~kdistill.training.TrainConfig`, and the steps every engine run ends with.

Those steps: probe the distiller on one batch (so every active term is checked before anything is written), then,
inside the run directory's records (``run.json``, ``config.yaml``), train, save the tokenizer beside the trained
model in ``student/``, evaluate on each evaluation split and write ``eval.json``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from kdistill._io import write_json_atomically
from kdistill.config import RunConfig
from kdistill.distillers import Distiller
from kdistill.runs.records import RunResult, is_main_process, recorded_run
from kdistill.training import TrainConfig, train

if TYPE_CHECKING:
    from kdistill.models.loading import Tokenizer

Collate = Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]  # examples → batch
Evaluate = Callable[[nn.Module, str], dict[str, float]]  # (model, split) → the task's metrics


def make_training_config(config: RunConfig) -> TrainConfig:
    """The engine's :class:`~kdistill.training.TrainConfig` for ``config`` (its ``training`` section, output
    directory, seed and ``resume``)."""
    values = config.training.model_dump()
    values.pop("eval_batch_size")
    values["log_with"] = tuple(values["log_with"])
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(
        output_dir=config.output_dir,
        seed=config.seed,
        resume=config.resume,
        **{k: v for k, v in values.items() if k in names},
    )


def planned_steps(config: RunConfig, num_examples: int) -> int:
    """The optimizer steps a run of ``num_examples`` training examples takes on one process."""
    training = config.training
    batches = -(-num_examples // training.batch_size)
    per_epoch = max(-(-batches // training.gradient_accumulation_steps), 1)
    return training.max_steps or per_epoch * training.num_epochs


def check_schedules(config: RunConfig, objective: Any, num_examples: int) -> None:
    """The objective's weights and temperature over the planned steps, checked before anything is written."""
    if objective is not None:
        objective.check_schedules(planned_steps(config, num_examples))


def train_and_evaluate(
    config: RunConfig,
    distiller: Distiller,
    trained: nn.Module,
    train_examples: list[dict[str, Any]],
    collate: Collate,
    *,
    tokenizer: Tokenizer,
    evaluate: Evaluate,
    eval_splits: Sequence[str],
    start: float | None = None,
) -> RunResult:
    """Train ``distiller`` on ``train_examples`` into ``config.output_dir`` (already checked with
    :func:`~kdistill.runs.records.check_output_dir`) and evaluate ``trained``, its student.

    Args:
        config: the run's config (its output directory, ``training`` section, seed).
        distiller: what computes the loss; its student is ``trained``.
        trained: the model that is trained, saved in ``student/`` and evaluated.
        train_examples: the examples, ``collate`` makes batches of them.
        tokenizer: the trained model's tokenizer, saved beside it.
        evaluate: ``(model, split) -> metrics``; called on ``"validation"`` during training when it is one of
            ``eval_splits``, and on every one of ``eval_splits`` after training.
        eval_splits: the evaluation splits the run has (``"validation"``, ``"test"``).
        start: ``time.perf_counter()`` when the run began (now when None); ``run.json`` counts from it.
    """
    start = time.perf_counter() if start is None else start
    out = Path(config.output_dir)  # checked by check_output_dir before the run's parts were built
    # everything below the first write is validated here: the probe runs every active term once
    distiller.setup(collate(train_examples[: config.training.batch_size]))
    check_schedules(config, getattr(distiller, "objective", None), len(train_examples))
    with recorded_run(out, config, start) as record:
        eval_fn = (lambda model: evaluate(model, "validation")) if "validation" in eval_splits else None
        train(distiller, train_examples, make_training_config(config), collate_fn=collate, eval_fn=eval_fn)
        student_dir = out / "student"
        if is_main_process():
            tokenizer.save_pretrained(student_dir)
        metrics: dict[str, float] = {}
        for split in eval_splits:
            metrics.update({f"{split}/{k}": v for k, v in evaluate(trained, split).items()})
        if is_main_process():
            write_json_atomically(out / "eval.json", metrics)
    return RunResult(out, student_dir, metrics, record["seconds"])
