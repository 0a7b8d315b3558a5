"""Multi-task distillation: several tasks, each with its teacher and student head, one shared training loop.

Each task is an ordinary :class:`~kdistill.distillers.Distiller`; their students usually share a body (the same
``nn.Module`` object) with a head per task. Batches hold one task each, drawn with probability proportional to
``size ** tau`` (τ = 1: proportional to dataset size; τ = 0: uniform; MT-DNN and TextBrewer's
``MultiTaskDistiller`` use such sampling). Term names and units are prefixed with the task name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdistill.distillers.core import Distiller
from kdistill.distillers.objective import TermValue
from kdistill.errors import InvalidArgumentError


class TaskBatches(Sequence[dict[str, Any]]):
    """Item ``i`` is a whole collated batch of one task, chosen (and filled) by a generator seeded with ``(seed, i)``.

    Use it as ``train_data`` with ``batch_size=1`` and :meth:`collate` as the ``collate_fn``.
    """

    def __init__(
        self,
        datasets: Mapping[str, Sequence[Any]],
        collate_fns: Mapping[str, Callable[[list[Any]], Mapping[str, Any]]],
        batch_size: int,
        tau: float = 1.0,
        seed: int = 0,
        num_batches: int | None = None,
    ) -> None:
        if not datasets:
            raise InvalidArgumentError("multi-task distillation needs at least one task")
        missing = sorted(set(datasets) - set(collate_fns))
        if missing:
            raise InvalidArgumentError(f"task {missing[0]!r} has no collate function")
        empty = [name for name, data in datasets.items() if len(data) == 0]
        if empty:
            raise InvalidArgumentError(f"task {empty[0]!r} has an empty dataset")
        self.names = list(datasets)
        self.datasets, self.collate_fns, self.batch_size, self.seed = datasets, collate_fns, batch_size, seed
        sizes = torch.tensor([float(len(datasets[n])) for n in self.names], dtype=torch.float64)
        self.probabilities = sizes.pow(tau) / sizes.pow(tau).sum()
        self.num_batches = num_batches or max(int(sizes.sum().item()) // batch_size, 1)

    def __len__(self) -> int:
        return self.num_batches

    def task_of(self, index: int) -> str:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return self.names[int(torch.multinomial(self.probabilities, 1, generator=generator))]

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        task = self.names[int(torch.multinomial(self.probabilities, 1, generator=generator))]
        data = self.datasets[task]
        picks = torch.randperm(len(data), generator=generator)[: self.batch_size].tolist()
        batch = dict(self.collate_fns[task]([data[i] for i in picks]))
        batch["task"] = task
        return batch

    def sample_batches(self) -> dict[str, dict[str, Any]]:
        """One batch per task (its first examples), for the distillers' setup."""
        out = {}
        for task in self.names:
            data = self.datasets[task]
            batch = dict(self.collate_fns[task]([data[i] for i in range(min(self.batch_size, len(data)))]))
            batch["task"] = task
            out[task] = batch
        return out

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        if len(items) != 1:
            raise InvalidArgumentError("TaskBatches items are whole batches: use batch_size=1 in the training config")
        return items[0]


class _MultiTaskModule(nn.Module):
    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.tasks = nn.ModuleDict(dict(modules))

    @property
    def projections(self) -> nn.ModuleDict:
        return nn.ModuleDict({f"{t}__{k}": p for t, m in self.tasks.items() for k, p in m.projections.items()})

    @property
    def student(self) -> nn.Module:
        return self  # checkpoints save every task's student (shared bodies once)

    def forward(self, task: str, inputs: Mapping[str, Any], sources: Mapping[str, Any]) -> Any:
        return self.tasks[task](inputs, sources)


class _PrefixedObjective:
    def __init__(self, tasks: Mapping[str, Distiller]) -> None:
        self.tasks = tasks

    @property
    def term_names(self) -> list[str]:
        return [f"{t}/{n}" for t, d in self.tasks.items() for n in d.objective.term_names]

    def weights(self, step: int, total_steps: int) -> dict[str, float]:
        return {
            f"{t}/{n}": w for t, d in self.tasks.items() for n, w in d.objective.weights(step, total_steps).items()
        }

    def check_schedules(self, total_steps: int) -> None:
        for name, distiller in self.tasks.items():
            try:
                distiller.objective.check_schedules(total_steps)
            except InvalidArgumentError as error:
                raise InvalidArgumentError(f"task {name!r}: {error}") from None


class MultiTaskDistiller:
    """Several tasks, each with its own :class:`Distiller` (teacher, student head, objective).

    Args:
        tasks: task name → distiller. Students may share modules.
        sample_batches: task name → one batch, for setup (``TaskBatches.sample_batches()`` gives them).
    """

    def __init__(self, tasks: Mapping[str, Distiller], sample_batches: Mapping[str, Mapping[str, Any]]) -> None:
        if not tasks:
            raise InvalidArgumentError("MultiTaskDistiller needs at least one task")
        missing = sorted(set(tasks) - set(sample_batches))
        if missing:
            raise InvalidArgumentError(f"no sample batch for task {missing[0]!r}")
        self.tasks = dict(tasks)
        self.samples = sample_batches
        self.objective = _PrefixedObjective(self.tasks)
        self.teachers: list[nn.Module] = []
        self.teacher_mode = "multi-task"
        self.module: _MultiTaskModule | None = None

    def setup(
        self, sample_batch: Any, device: torch.device | str = "cpu", teacher_dtype: torch.dtype | None = None
    ) -> nn.Module:
        modules = {name: d.setup(self.samples[name], device, teacher_dtype) for name, d in self.tasks.items()}
        self.module = _MultiTaskModule(modules)
        return self.module

    def count_units(self, batch: Mapping[str, Any]) -> dict[str, float]:
        task = self._task(batch)
        return {f"{task}/{unit}": count for unit, count in self.tasks[task].count_units(batch).items()}

    def compute_terms(
        self, module: nn.Module, batch: Mapping[str, Any], weights: Mapping[str, float], step: int, total_steps: int
    ) -> dict[str, TermValue]:
        task = self._task(batch)
        prefix = f"{task}/"
        local = {k[len(prefix) :]: w for k, w in weights.items() if k.startswith(prefix)}
        terms = self.tasks[task].compute_terms(functools.partial(module, task), batch, local, step, total_steps)
        return {prefix + name: TermValue(term.total, prefix + term.unit) for name, term in terms.items()}

    def after_step(self) -> None:
        for distiller in self.tasks.values():
            distiller.after_step()

    def projections_state(self) -> dict[str, torch.Tensor]:
        return {f"{t}/{k}": v for t, d in self.tasks.items() for k, v in d.projections_state().items()}

    def _task(self, batch: Mapping[str, Any]) -> str:
        task = batch.get("task")
        if task not in self.tasks:
            raise InvalidArgumentError(f"batch task {task!r} is not one of {', '.join(self.tasks)}")
        return task
