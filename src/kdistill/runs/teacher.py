"""The run's teacher: loaded from ``teacher.path``, or fine-tuned on the task first, once, and cached.

With ``teacher.fine_tune`` the teacher is first trained on the run's labels by a ``mode: train_teacher`` run
(:func:`train_teacher`) into kdistill's cache, keyed by everything that shapes it (:func:`teacher_cache_dir`: the
teacher, the task, the data, the fine-tuning settings and seed). Every later run with the same key loads that copy;
a fine-tuning that did not finish is started again. A GGUF teacher (``teacher.gguf_file``, or a ``packaged:`` model
that ships one) is de-quantized once into the cache too; ``teacher.adapter`` puts a LoRA adapter on top.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from kdistill.config import RunConfig, TrainingConfig
from kdistill.distillers import SupervisedTrainer
from kdistill.models.loading import (
    PACKAGED_MODELS,
    check_vocab,
    dequantized_copy,
    load_model,
    load_tokenizer,
    packaged_gguf_file,
    resolve_model_path,
    with_adapter,
)
from kdistill.runs.data import EVAL_SPLITS, preprocess_splits
from kdistill.runs.engine import train_and_evaluate
from kdistill.runs.records import RunResult, check_output_dir, config_hash, default_cache_dir, run_status
from kdistill.tasks import Task, evaluate_task

if TYPE_CHECKING:
    from datasets import DatasetDict

    from kdistill.models.loading import Tokenizer


def teacher_cache_dir(config: RunConfig) -> Path:
    """Where the teacher fine-tuned for this config's task and data is kept (keyed by everything that shapes it)."""
    assert config.teacher is not None and config.teacher.path is not None  # a model teacher
    training = _teacher_training(config).model_dump()
    identity = model_identity(config.teacher.path)
    data = config.data.model_dump(exclude={"transfer", "augment"})  # what the student alone trains on
    key = config_hash(identity, config.task, data, training, _teacher_seed(config))
    return Path(config.teacher.cache_dir or default_cache_dir() / "teachers") / key


def model_identity(path: str) -> str:
    """What names the teacher's weights in a cache key: a ``packaged:`` model by its name and its package's version
    (not its directory, which moves with the virtual environment), anything else by its path or hub id."""
    if not path.startswith("packaged:"):
        return path
    import importlib.metadata

    resolve_model_path(path)  # checks that the package is there
    module = PACKAGED_MODELS[path.split(":", 1)[1].lower()][0]
    dists = importlib.metadata.packages_distributions().get(module, [])
    versions = ",".join(sorted({f"{dist}=={importlib.metadata.version(dist)}" for dist in dists}))
    return f"{path.lower()}@{versions or 'unknown'}"


def _teacher_training(config: RunConfig) -> TrainingConfig:
    """The teacher's fine-tuning settings: the training defaults with ``teacher.fine_tune_training`` on top."""
    assert config.teacher is not None
    return config.teacher.fine_tune_training


def _teacher_seed(config: RunConfig) -> int:
    assert config.teacher is not None
    return config.seed if config.teacher.seed is None else config.teacher.seed


def load_teacher(config: RunConfig, task: Task, splits: DatasetDict) -> tuple[nn.Module, Tokenizer]:
    """The teacher and its tokenizer; fine-tuned on ``task`` and ``splits`` first (once, cached) when
    ``teacher.fine_tune`` (and the run is not itself the fine-tuning)."""
    assert config.teacher is not None and config.teacher.path is not None  # a model teacher
    spec = config.teacher
    path = resolve_model_path(spec.path)
    if spec.fine_tune and config.mode != "train_teacher":
        path = str(_fine_tuned_teacher(config, task, splits, path) / "student")
    gguf = None if spec.fine_tune else (spec.gguf_file or packaged_gguf_file(spec.path))
    if gguf is not None:
        path = str(dequantized_copy(path, gguf, task.auto_model_class, default_cache_dir() / "gguf"))
    tokenizer = load_tokenizer(path, "teacher.path")
    model = load_model(path, task.auto_model_class, "teacher.path", label_names=getattr(task, "label_names", None))
    check_vocab(model, tokenizer, "teacher.path")
    if spec.adapter is not None:
        model = with_adapter(model, spec.adapter)
    return model, tokenizer


def _fine_tuned_teacher(config: RunConfig, task: Task, splits: DatasetDict, path: str) -> Path:
    """The run directory of the teacher fine-tuned for ``config`` (its model in ``student/``), trained if need be."""
    assert config.teacher is not None
    cache = teacher_cache_dir(config)
    if run_status(cache) == "complete":
        print(f"using the fine-tuned teacher cached in {cache}{_scores(cache / 'eval.json')}")
        return cache
    if cache.exists():
        shutil.rmtree(cache)  # an earlier fine-tuning that did not finish
    teacher_config = config.model_copy(
        deep=True,
        update={
            "mode": "train_teacher",
            "output_dir": str(cache),
            "resume": False,
            "seed": _teacher_seed(config),
            "teacher": config.teacher.model_copy(update={"path": path, "fine_tune": False}),
            "training": _teacher_training(config),
        },
    )
    print(f"fine-tuning the teacher {config.teacher.path} (cached in {cache})")
    result = train_teacher(teacher_config, task, splits)
    print(f"fine-tuned teacher: {_format_scores(result.metrics) or 'no evaluation split'}")
    return cache


def _format_scores(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())


def _scores(eval_file: Path) -> str:
    """``" (validation/accuracy 0.8125, ...)"`` from a run's ``eval.json``, or nothing when it has none."""
    try:
        metrics = json.loads(eval_file.read_text())
    except (OSError, ValueError):
        return ""
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return f" ({_format_scores(numbers)})" if numbers else ""


def train_teacher(config: RunConfig, task: Task, splits: DatasetDict, *, start: float | None = None) -> RunResult:
    """A ``mode: train_teacher`` run: the teacher trained on the labels of ``splits``, saved in ``student/``.

    This is the run ``teacher.fine_tune`` makes into the cache, and what ``kdistill train`` runs for that mode.
    """
    from accelerate.utils import set_seed

    start = time.perf_counter() if start is None else start
    check_output_dir(config)
    set_seed(config.seed)  # a new task head is drawn from the global RNG
    teacher, tokenizer = load_teacher(config, task, splits)
    train_examples, eval_examples = preprocess_splits(config, task, splits, tokenizer)
    batch_size = config.training.eval_batch_size

    def evaluate(model: nn.Module, split: str) -> dict[str, float]:
        return evaluate_task(task, model, eval_examples[split], splits[split], batch_size=batch_size)

    return train_and_evaluate(
        config,
        SupervisedTrainer(teacher, view=task.view),
        teacher,
        train_examples,
        task.collate,
        tokenizer=tokenizer,
        evaluate=evaluate,
        eval_splits=[split for split in EVAL_SPLITS if eval_examples.get(split)],
        start=start,
    )
