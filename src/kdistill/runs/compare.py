"""``kdistill compare``: a teacher and its students on the same batches of a run's data, as one result.

Two ways in:

* :func:`compare_run` — a run directory alone: its ``config.yaml`` gives the task, the data and the teacher (the
  fine-tuned teacher from its cache, a GGUF teacher de-quantized, a LoRA-tuned teacher with its adapter); its
  ``student/`` is the student; more run or model directories may join as further students (a baseline run, say).
* :func:`compare_targets` — a teacher, students and the data named one by one (run or model directories, a run YAML).

Every task compares alike, causal LMs included: the task's metrics (a causal LM's perplexity, loss and next-token
accuracy), agreement and KL with the teacher over the counted positions, parameters, size, compression, latency and
throughput, and with ``cka`` the layer CKA of each student's layers against the teacher's. The measuring is
:func:`kdistill.eval.compare.compare_models`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdistill.config import RunConfig
from kdistill.config.schema import TeacherConfig
from kdistill.errors import KdistillError
from kdistill.eval.compare import ModelEntry, compare_models
from kdistill.features.layers import num_layers
from kdistill.models.loading import load_model, load_tokenizer, packaged_gguf_file, resolve_model_path
from kdistill.runs.parts import RunParts, compare_batches
from kdistill.runs.records import run_status
from kdistill.runs.targets import model_dir, parts_with_model, run_config_for
from kdistill.runs.teacher import load_teacher, teacher_cache_dir
from kdistill.tasks import make_batches
from kdistill.tasks.base import tokenizers_differ
from kdistill.tasks.causal_lm import next_token_stats

if TYPE_CHECKING:
    from kdistill.models.loading import Tokenizer


def compare_run(
    run_dir: str,
    others: Sequence[str] = (),
    *,
    teacher: str | None = None,
    split: str = "validation",
    limit: int | None = None,
    cka: bool = False,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Compare a finished run's student with the run's own teacher on ``split`` of the run's data.

    Args:
        run_dir: a complete run directory (``config.yaml``, ``student/``).
        others: more run or model directories compared as students beside the run's.
        teacher: a run or model directory in place of the run's teacher (needed when the run had none: a baseline,
            ``teacher: ema | self``).
        split: the split compared on.
        limit: at most this many examples.
        cka: add each student's layer CKA against the teacher (its layers spread over the teacher's).
        overrides: dotted ``key=value`` overrides of the run's config (its data, say).

    Raises:
        KdistillError: an unfinished run, a run whose teacher cannot be found (named, with ``--teacher`` suggested),
            a model that cannot be loaded, or a split the data does not have.
    """
    config = run_config_for(run_dir, None, overrides)
    student_path = model_dir(run_dir)
    parts = _parts(config, student_path)
    spec = _teacher_spec(config, run_dir, teacher)
    teacher_model, teacher_tokenizer = load_teacher(
        config.model_copy(update={"mode": "distill", "teacher": spec}), parts.task, parts.splits
    )
    assert parts.student is not None
    students = [(Path(run_dir).name or run_dir, parts.student, student_path, parts.student_tokenizer)]
    students += _load_students(parts, others)
    return _compare(parts, (_saved_path(spec), teacher_model, teacher_tokenizer), students, split, limit, cka)


def compare_targets(
    teacher: str,
    students: Sequence[str],
    data: str,
    *,
    split: str = "validation",
    limit: int | None = None,
    cka: bool = False,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Compare a teacher with its students on ``split`` of the data that ``data`` names.

    Args:
        teacher: a run directory (its student is the model compared) or a model directory / hub id.
        students: run or model directories; each is named after its last path component.
        data: a run YAML, or a run directory whose ``config.yaml`` gives the task and data.
        split: the split compared on.
        limit: at most this many examples.
        cka: add each student's layer CKA against the teacher.
        overrides: dotted ``key=value`` overrides of the data's config.

    Returns:
        The result of :func:`~kdistill.eval.compare.compare_models` (JSON-able; the teacher's row first).

    Raises:
        KdistillError: an unfinished run, a model that cannot be loaded, or a split the data does not have.
    """
    data_path = Path(data)
    config = run_config_for(data, None if data_path.is_dir() else data, overrides)
    teacher_path = model_dir(teacher, "--teacher")
    parts = _parts(config, teacher_path)
    assert parts.student is not None
    return _compare(
        parts,
        (teacher_path, parts.student, parts.student_tokenizer),
        _load_students(parts, students),
        split,
        limit,
        cka,
    )


Loaded = tuple[str, nn.Module, str, "Tokenizer"]  # name, model, path, tokenizer


def _parts(config: RunConfig, model_path: str) -> RunParts:
    """The config's task and data with the model at ``model_path`` as ``parts.student`` (a causal LM's tokenizer
    given a pad token, as in its run)."""
    parts = parts_with_model(config, model_path)
    tokenizer = parts.student_tokenizer
    if config.task == "causal_lm" and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        parts.task.pad_token_id = tokenizer.pad_token_id
    return parts


def _teacher_spec(config: RunConfig, run_dir: str, teacher: str | None) -> TeacherConfig:
    """The run's teacher as a loadable :class:`TeacherConfig` (``teacher`` in its place when given)."""
    if teacher is not None:
        return TeacherConfig(path=model_dir(teacher, "--teacher"))
    spec = config.teacher
    if spec is None or not spec.is_model:
        why = (
            "it has no teacher (a baseline run)"
            if spec is None
            else f"its teacher is the student itself ({spec.kind})"
        )
        raise KdistillError(f"{run_dir}: {why}; name the model to compare with: --teacher RUN_OR_MODEL_DIR")
    if spec.fine_tune:  # the fine-tuned teacher is read from its cache, never trained again here
        cache = teacher_cache_dir(config)
        if run_status(cache) != "complete":
            raise KdistillError(
                f"{run_dir}: the run's fine-tuned teacher is no longer in its cache ({cache}); pass --teacher"
            )
        return spec.model_copy(update={"path": str(cache / "student"), "fine_tune": False, "gguf_file": None})
    return spec


def _saved_path(spec: TeacherConfig) -> str | None:
    """Where the teacher's weights lie as it runs (None, its size then taken from its state, when it runs otherwise
    than saved: de-quantized from GGUF, or with a LoRA adapter on top)."""
    assert spec.path is not None
    if spec.gguf_file or spec.adapter or packaged_gguf_file(spec.path):
        return None
    return resolve_model_path(spec.path, "teacher.path")


def _load_students(parts: RunParts, targets: Sequence[str]) -> list[Loaded]:
    label_names = getattr(parts.task, "label_names", None) or None
    loaded = []
    for target in targets:
        field = f"student {target}"
        path = model_dir(target, field)
        model = load_model(path, parts.task.auto_model_class, field, label_names=label_names)
        loaded.append((Path(target).name or target, model, path, load_tokenizer(path, field)))
    return loaded


def _compare(
    parts: RunParts,
    teacher: tuple[str | None, nn.Module, Tokenizer],
    students: list[Loaded],
    split: str,
    limit: int | None,
    cka: bool,
) -> dict[str, Any]:
    teacher_path, teacher_model, teacher_tokenizer = teacher
    task, config = parts.task, parts.config
    causal = config.task == "causal_lm"
    if causal:
        differ = [name for name, _, _, tokenizer in students if tokenizers_differ(tokenizer, teacher_tokenizer)]
        if differ:
            raise KdistillError(
                f"students {', '.join(differ)} tokenize differently from the teacher; a causal-LM comparison measures "
                "agreement and KL position by position over one vocabulary (their eval.json has each one's perplexity)"
            )
        # one tokenizer: every model reads the same flat batches, which the causal-LM collator pads
        batches, inputs = _causal_batches(parts, split, limit), dict.fromkeys([name for name, *_ in students], None)
    else:
        batches, inputs = compare_batches(
            parts, teacher_tokenizer, {name: tok for name, _, _, tok in students}, split=split, limit=limit
        )
    return compare_models(
        ModelEntry("teacher", teacher_model, teacher_path, role="teacher", inputs="teacher"),
        [ModelEntry(name, model, path, inputs=inputs[name]) for name, model, path, _ in students],
        batches,
        view=task.view,
        task_metric=lambda logits, b: task.compute_metrics(logits, b, parts.splits[split]),
        cka_layers=_cka_pairs(teacher_model, students) if cka else None,
        vocab_policy=str(config.distill.kd_kwargs.get("vocab_policy", "error")),
        reduce_batch=_next_token_stats if causal else None,
        outcomes=getattr(task, "outcomes", None),
        num_labels=len(task.label_names) if getattr(task, "label_names", None) else None,
        sentence_counts=(lambda logits, b: task.sentence_counts(logits, b, parts.splits[split]))
        if hasattr(task, "sentence_counts")
        else None,
        seed=config.seed,
    )


def _next_token_stats(heads: list[torch.Tensor], batch: Mapping[str, Any]) -> list[torch.Tensor]:
    """A causal LM's batch kept as three numbers (NLL, correct, count) in place of its ``(B, T, V)`` logits."""
    return [next_token_stats(heads[0], batch["labels"])]


def _causal_batches(parts: RunParts, split: str, limit: int | None) -> list[dict[str, Any]]:
    if split not in parts.eval_examples:
        raise KdistillError(f"the data has no {split!r} split (have: {', '.join(parts.eval_examples) or 'none'})")
    examples = parts.eval_examples[split][:limit] if limit is not None else parts.eval_examples[split]
    return make_batches(examples, parts.collate, parts.config.training.eval_batch_size)


def _cka_pairs(teacher: nn.Module, students: list[Loaded]) -> dict[str, list[tuple[str, str]]]:
    """Each student's layers ``1..L_s`` against the teacher's layers spread evenly over ``1..L_t`` (``"last"``
    against ``"last"`` for a student without transformer blocks, a BiRNN)."""
    try:
        teacher_layers = num_layers(teacher)
    except KdistillError as error:
        raise KdistillError(f"--cka: the teacher's layers cannot be found ({error})") from None
    pairs: dict[str, list[tuple[str, str]]] = {}
    for name, model, _, _ in students:
        try:
            layers = num_layers(model)
        except KdistillError:
            pairs[name] = [("last", "last")]
            continue
        pairs[name] = [(f"layer {round(j * teacher_layers / layers)}", f"layer {j}") for j in range(1, layers + 1)]
    return pairs
