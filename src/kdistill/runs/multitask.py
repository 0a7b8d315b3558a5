"""A multi-task run from a :class:`~kdistill.config.multitask.MultiTaskConfig`: one student body, a head per task.

Each task is built as an ordinary distillation run (:func:`kdistill.runs.parts.build_parts`: its data, its teacher,
a student of the shared ``student`` section), then every task's student takes the first task's body (the
``base_model_prefix`` module of a Hugging Face model: ``bert``, ...), so only the heads are the tasks' own. The
students must agree on the body's configuration and tokenizer; a mismatch is refused naming both tasks. Training
is one engine run of :class:`~kdistill.distillers.MultiTaskDistiller` over
:class:`~kdistill.distillers.multitask.TaskBatches` (each batch one task's, drawn with probability
∝ ``size ** sampling_tau``); each task's terms are logged as ``train/<task>/<term>``.

The run directory holds ``run.json``, ``config.yaml`` (the multi-task config), the engine's ``metrics.jsonl`` and
checkpoints, ``student/<task>/`` for every task (a ``save_pretrained`` folder with its tokenizer, loadable with
``AutoModelForSequenceClassification`` / ``AutoModelForTokenClassification`` on its own; ``student/`` itself also
holds the engine's save of all tasks at once, which ``resume`` does not need) and ``eval.json`` with
``<task>/<split>/<metric>``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from torch import nn

from kdistill._io import write_json_atomically
from kdistill.config.multitask import MultiTaskConfig
from kdistill.distillers import Distiller, MultiTaskDistiller
from kdistill.distillers.multitask import TaskBatches
from kdistill.errors import KdistillError
from kdistill.runs.data import EVAL_SPLITS
from kdistill.runs.engine import make_training_config
from kdistill.runs.parts import RunParts, build_objective, build_parts, evaluate, teacher_distiller
from kdistill.runs.records import RunResult, check_run_dir, is_main_process, run_records
from kdistill.tasks.base import tokenizers_differ
from kdistill.training import train

_LABEL_KEYS = ("id2label", "label2id", "num_labels", "finetuning_task", "architectures", "problem_type")


def run_multitask(config: MultiTaskConfig) -> RunResult:
    """Carry out a multi-task run; see the module docstring for what it writes."""
    start = time.perf_counter()
    out = Path(config.output_dir)
    data = config.model_dump(mode="json")
    check_run_dir(out, resume=config.resume, config=data)
    parts = {spec.name: build_parts(config.task_config(index)) for index, spec in enumerate(config.tasks)}
    _share_body(parts)
    distillers: dict[str, Distiller] = {}
    for name, part in parts.items():
        assert part.student is not None and part.teacher is not None  # mode distill builds both
        teacher = part.task.adapt_teacher(
            part.teacher, tokenizer=part.student_tokenizer, teacher_tokenizer=part.teacher_tokenizer
        )
        distillers[name] = teacher_distiller(
            part.config, part, teacher, build_objective(part.config, part), part.task.view
        )
    batches = TaskBatches(
        {name: part.train_examples for name, part in parts.items()},
        {name: part.collate for name, part in parts.items()},
        batch_size=config.training.batch_size,
        tau=config.sampling_tau,
        seed=config.seed,
    )
    distiller = MultiTaskDistiller(distillers, batches.sample_batches())
    distiller.setup(None)  # every task's probe batch runs its terms once: mismatches fail before any write
    first = next(iter(parts.values())).config
    train_config = dataclasses.replace(
        make_training_config(first.model_copy(update={"output_dir": str(out), "resume": config.resume})),
        batch_size=1,  # an item of TaskBatches is a whole batch of one task
    )
    with run_records(out, mode="multitask", config=data, resume=config.resume, start=start) as record:
        train(distiller, batches, train_config, collate_fn=TaskBatches.collate, eval_fn=_eval_fn(parts))
        metrics: dict[str, float] = {}
        for name, part in parts.items():
            assert part.student is not None
            if is_main_process():
                part.student.save_pretrained(out / "student" / name, safe_serialization=True)
                part.student_tokenizer.save_pretrained(out / "student" / name)
            for split in EVAL_SPLITS:
                if part.has_split(split):
                    scores = evaluate(part, part.student, split=split)
                    metrics.update({f"{name}/{split}/{key}": value for key, value in scores.items()})
        if is_main_process():
            write_json_atomically(out / "eval.json", metrics)
    return RunResult(out, out / "student", metrics, record["seconds"])


def _share_body(parts: dict[str, RunParts]) -> None:
    """Give every task's student the first task's body, after checking that the bodies and tokenizers agree."""
    names = list(parts)
    first = parts[names[0]]
    body_name = getattr(first.student, "base_model_prefix", "")
    body = getattr(first.student, body_name, None) if body_name else None
    if not isinstance(body, nn.Module):
        raise KdistillError(
            f"task {names[0]!r}: the student ({type(first.student).__name__}) has no body module to share "
            "(a Hugging Face model's base_model_prefix); a multi-task run needs a transformer student"
        )
    for name in names[1:]:
        part = parts[name]
        other = getattr(part.student, body_name, None)
        if not isinstance(other, nn.Module) or _body_config(part.student) != _body_config(first.student):
            raise KdistillError(
                f"tasks {names[0]!r} and {name!r} build students with different bodies; a shared body needs one "
                "architecture (the same student section and teachers of one architecture)"
            )
        if tokenizers_differ(part.student_tokenizer, first.student_tokenizer):
            raise KdistillError(
                f"tasks {names[0]!r} and {name!r} tokenize differently; a shared body needs one tokenizer"
            )
        setattr(part.student, body_name, body)


def _body_config(model: nn.Module | None) -> dict[str, object]:
    config = getattr(model, "config", None)
    values = config.to_dict() if config is not None else {}
    return {key: value for key, value in values.items() if key not in _LABEL_KEYS and not key.startswith("_")}


def _eval_fn(parts: dict[str, RunParts]):
    """Every task's validation metrics, ``<task>/<metric>``, for the engine's eval lines and ``metric_for_best``."""
    if not all(part.has_validation for part in parts.values()):
        return None

    def evaluate_all(_module: nn.Module) -> dict[str, float]:
        scores: dict[str, float] = {}
        for name, part in parts.items():
            assert part.student is not None
            scores.update({f"{name}/{k}": v for k, v in evaluate(part, part.student, split="validation").items()})
        return scores

    return evaluate_all
