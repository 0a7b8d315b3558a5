"""``kdistill compare``: a teacher and its students on the same batches of a run's data, as one result.

The models come from run directories or model directories (:mod:`kdistill.runs.targets`); the data and the task
from a run YAML or a run directory's ``config.yaml``. The measuring is :func:`kdistill.eval.compare.compare_models`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdistill.errors import KdistillError
from kdistill.eval.compare import ModelEntry, compare_models
from kdistill.models.loading import load_model, load_tokenizer
from kdistill.runs.parts import compare_batches
from kdistill.runs.targets import model_dir, parts_with_model, run_config_for


def compare_targets(
    teacher: str,
    students: Sequence[str],
    data: str,
    *,
    split: str = "validation",
    limit: int | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Compare a teacher with its students on ``split`` of the data that ``data`` names.

    Args:
        teacher: a run directory (its student is the model compared) or a model directory / hub id.
        students: run or model directories; each is named after its last path component.
        data: a run YAML, or a run directory whose ``config.yaml`` gives the task and data.
        split: the split compared on.
        limit: at most this many examples.
        overrides: dotted ``key=value`` overrides of the data's config.

    Returns:
        The result of :func:`~kdistill.eval.compare.compare_models` (JSON-able; the teacher's row first).

    Raises:
        KdistillError: a causal-LM run (its eval.json already holds the comparison), an unfinished run, a model
            that cannot be loaded, or a split the data does not have.
    """
    data_path = Path(data)
    config = run_config_for(data, None if data_path.is_dir() else data, overrides)
    if config.task == "causal_lm":
        raise KdistillError(
            "kdistill compare covers classification, NER and QA runs; a causal-LM run's eval.json already holds "
            "perplexity, agreement and KL to its teacher, and `kdistill experiment` puts several runs in one table"
        )
    teacher_path = model_dir(teacher)
    parts = parts_with_model(config, teacher_path)
    task = parts.task
    label_names = getattr(task, "label_names", None) or None
    loaded = []
    for target in students:
        path = model_dir(target)
        name = Path(target).name or target
        field = f"student {target}"
        model = load_model(path, task.auto_model_class, field, label_names=label_names)
        loaded.append((name, model, path, load_tokenizer(path, field)))
    batches, inputs = compare_batches(
        parts, parts.student_tokenizer, {n: t for n, _, _, t in loaded}, split=split, limit=limit
    )
    return compare_models(
        ModelEntry("teacher", parts.student, teacher_path, role="teacher", inputs="teacher"),
        [ModelEntry(name, model, path, inputs=inputs[name]) for name, model, path, _ in loaded],
        batches,
        view=task.view,
        task_metric=lambda logits, b: task.compute_metrics(logits, b, parts.splits[split]),
    )
