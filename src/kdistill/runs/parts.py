"""The pieces of a run, built from its config: data, task, teacher, student, examples, objective, evaluation.

:func:`build_parts` loads the data (:mod:`kdistill.runs.data`), builds the task, loads the teacher (fine-tuned
once when asked: :mod:`kdistill.runs.teacher`) and any extra teachers, builds the student and tokenizes every split.
:func:`build_objective` turns ``distill`` into the :class:`~kdistill.distillers.Objective`. The CLI's ``eval`` and
``compare`` reuse :func:`evaluate` and :func:`compare_batches` on a finished run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from kdistill.config import RunConfig
from kdistill.core.views import SequenceView, TokenView
from kdistill.data.word_tokenizer import WordTokenizer
from kdistill.distillers import Distiller, Match, MultiTeacherDistiller, Objective, Stage, expand_layer_map
from kdistill.errors import InvalidArgumentError, KdistillError
from kdistill.features import num_layers
from kdistill.models.loading import check_vocab, load_model, load_tokenizer, resolve_model_path
from kdistill.models.students import build_student
from kdistill.models.vocab import (
    embedding_parameters,
    factorize_embedding,
    trim_embeddings,
    trim_tokenizer,
    used_token_ids,
)
from kdistill.runs.augment import augmented_rows
from kdistill.runs.data import Examples, load_data, preprocess_splits
from kdistill.runs.teacher import load_teacher
from kdistill.runs.transfer import drop_evaluation_texts, load_transfer, transfer_examples
from kdistill.tasks import TASKS, Task, evaluate_task, make_batches
from kdistill.tasks.base import tokenizers_differ

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from kdistill.models.loading import Tokenizer

TASK_NAMES = {
    "sequence_classification": "sequence",
    "token_classification": "token",
    "question_answering": "qa",
    "causal_lm": "causal_lm",
}


@dataclass
class RunParts:
    """Everything a run trains and evaluates with."""

    config: RunConfig
    task: Task
    splits: DatasetDict  # the rows of every split
    teacher: nn.Module | None
    teacher_tokenizer: Tokenizer | None
    student: nn.Module | None  # None when the run trains the teacher
    student_tokenizer: Tokenizer  # the trained model's (the teacher's when the run trains the teacher)
    train_examples: Examples
    eval_examples: dict[str, Examples] = field(default_factory=dict)  # per evaluation split
    extra_teachers: list[nn.Module] = field(default_factory=list)

    @property
    def collate(self) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]:
        """The task's collate: examples → batch."""
        return self.task.collate

    def has_split(self, name: str) -> bool:
        """Whether the run has examples of split ``name``."""
        return name in self.eval_examples and len(self.eval_examples[name]) > 0

    @property
    def has_validation(self) -> bool:
        """Whether the run has validation examples (evaluated during training)."""
        return self.has_split("validation")


def make_task(config: RunConfig, splits: DatasetDict) -> Task:
    """The task ``config.task`` names, on ``config.data``'s columns, with the label set read off ``splits``."""
    data = config.data
    name = TASK_NAMES[config.task]
    if config.distill.cross_tokenizer is not None and name in ("sequence", "qa"):
        why = (
            "it compares one prediction per example, whatever each side's tokenizer, so there are no tokens to pair"
            if name == "sequence"
            else "its start and end logits live on one tokenization"
        )
        raise InvalidArgumentError(
            f"distill.cross_tokenizer applies to token_classification, not {config.task}: {why}; remove it"
        )
    if name == "sequence":
        task = TASKS.get(name)(
            text_column=data.text_column, text_pair_column=data.text_pair_column, label_column=data.label_column
        )
    elif name == "token":
        task = TASKS.get(name)(
            tokens_column=data.tokens_column,
            tags_column=data.tags_column,
            cross_tokenizer=config.distill.cross_tokenizer,
        )
    elif name == "causal_lm":
        if "train" not in splits:
            raise KdistillError(f"data has no 'train' split (splits: {', '.join(splits)})")
        return TASKS.get(name)(format=data.format, text_column=data.text_column, system_prompt=data.system_prompt)
    else:
        return TASKS.get(name)(
            question_column=data.question_column,
            context_column=data.context_column,
            answers_column=data.answers_column,
            max_length=data.max_length,
        )
    if "train" not in splits:
        raise KdistillError(
            f"data has no 'train' split (splits: {', '.join(splits)}); give data.files.train or data.split_ratios"
        )
    if data.label_names is not None:
        return task.with_label_names(splits["train"], data.label_names)
    return _with_label_names_of_all_splits(task, splits)


def _with_label_names_of_all_splits(task: Task, splits: DatasetDict) -> Task:
    """The label set read off every split, not the training split alone: a rare tag that a seeded split left out
    of ``train`` is still a class (the model gets an output for it), not an error in ``validation``."""
    tasks = [task.with_label_names(split) for split in splits.values()]
    names = [t.label_names for t in tasks]
    if all(n == names[0] for n in names):
        return tasks[0]
    if all(name.isdigit() for n in names for name in n):  # integer labels: "0" .. the largest id seen
        return max(tasks, key=lambda t: len(t.label_names))
    return task.with_label_names(splits["train"], sorted({name for n in names for name in n}))


def build_student_for(
    config: RunConfig,
    task: Task,
    teacher: nn.Module | None,
    teacher_tokenizer: Tokenizer | None,
    train_split: Dataset,
    transfer_rows: list[dict[str, Any]] | None = None,
) -> tuple[nn.Module, Tokenizer]:
    """The student and its tokenizer (the teacher's, or a word vocabulary built from the training and transfer
    texts)."""
    spec = config.student
    name = TASK_NAMES[config.task]
    label_names = getattr(task, "label_names", None)
    if spec.kind == "pretrained":
        if spec.path is None:
            raise KdistillError("student.path is required when student.kind is 'pretrained'")
        path = resolve_model_path(spec.path, "student.path")
        model = load_model(
            path, task.auto_model_class, "student.path", label_names=label_names, gguf_file=spec.gguf_file
        )
        tokenizer = load_tokenizer(path, "student.path", gguf_file=spec.gguf_file)
        check_vocab(model, tokenizer, "student.path")
        return _smaller(config, model, tokenizer, train_split, transfer_rows)
    tokenizer = teacher_tokenizer
    vocab: str | WordTokenizer = "teacher"
    if spec.kind in ("bilstm", "bigru") and spec.vocab == "own":
        texts = _training_texts(config, train_split, transfer_rows)
        tokenizer = WordTokenizer.build(texts, max_vocab=spec.max_vocab)
        vocab = tokenizer
    student = build_student(
        spec.kind,
        teacher,
        layers=spec.layers,
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        rnn={"bilstm": "lstm", "bigru": "gru"}.get(spec.kind),
        embedding_dim=spec.embed_dim,
        vocab=vocab,
        task=name,
        num_labels=len(label_names) if label_names is not None else None,
        seed=config.seed,
        label_names=list(label_names) if label_names else None,
    )
    return _smaller(config, student, tokenizer, train_split, transfer_rows)


def _smaller(
    config: RunConfig,
    student: nn.Module,
    tokenizer: Tokenizer,
    train_split: Dataset,
    transfer_rows: list[dict[str, Any]] | None,
) -> tuple[nn.Module, Tokenizer]:
    """The student with its vocabulary trimmed to its text's and its BiRNN embedding factorized, as asked."""
    spec = config.student
    if spec.trim_vocab:
        before, size = embedding_parameters(student), len(tokenizer)
        texts = _training_texts(config, train_split, transfer_rows)
        words = config.task == "token_classification"
        keep = used_token_ids(tokenizer, texts, split_into_words=words, min_count=spec.trim_min_count)
        trim_embeddings(student, keep)
        tokenizer = trim_tokenizer(tokenizer, keep)
        print(
            f"student vocabulary trimmed to the {len(keep):,} of {size:,} word pieces its training"
            f"{' and transfer' if transfer_rows else ''} text uses"
            + (f" {spec.trim_min_count}+ times" if spec.trim_min_count > 1 else "")
            + f" (with the specials; the rest read [UNK]): embedding {before:,} → "
            f"{embedding_parameters(student):,} parameters"
        )
    if spec.embed_rank is not None:
        before = embedding_parameters(student)
        student = factorize_embedding(student, spec.embed_rank, seed=config.seed)
        print(
            f"student embedding factorized at rank {spec.embed_rank}: {before:,} → {embedding_parameters(student):,}"
        )
    return student, tokenizer


def _training_texts(config: RunConfig, split: Dataset, transfer_rows: list[dict[str, Any]] | None) -> list[Any]:
    """The texts the student trains on: the training split's and the transfer set's."""
    data = config.data
    rows = transfer_rows or []
    if config.task == "token_classification":  # word lists: the words are the tokens
        return list(split[data.tokens_column]) + [row[data.tokens_column] for row in rows]
    texts = list(split[data.text_column]) + [row[data.text_column] for row in rows]
    if data.text_pair_column:
        texts += list(split[data.text_pair_column]) + [row[data.text_pair_column] for row in rows]
    return texts


def build_parts(config: RunConfig) -> RunParts:
    """The run's data, task, teachers, student and tokenized examples (see the module docstring)."""
    from accelerate.utils import set_seed

    splits = load_data(config)
    task = make_task(config, splits)
    teacher = teacher_tokenizer = None
    if config.teacher is not None and config.teacher.is_model:  # not the student itself (teacher: ema | self)
        set_seed(config.seed)  # a new task head is drawn from the global RNG
        teacher, teacher_tokenizer = load_teacher(config, task, splits)
    extra_teachers = []
    for index, extra in enumerate(config.extra_teachers):
        model, tokenizer = load_teacher(config.model_copy(update={"teacher": extra}), task, splits)
        if tokenizers_differ(tokenizer, teacher_tokenizer):
            raise KdistillError(
                f"extra_teachers[{index}] uses another tokenizer than teacher; multi-teacher "
                "distillation needs one tokenizer for all teachers"
            )
        extra_teachers.append(model)
    transfer_rows = None
    if config.data.transfer is not None and config.mode != "train_teacher":
        if config.mode == "distill" or config.student.trim_vocab:
            transfer_rows = load_transfer(config, splits)  # a baseline's trimmed vocabulary is the same student's
        if config.mode != "distill":
            print(f"data.transfer is left out of training: a {config.mode} run has no teacher to label it")
    student = None
    if config.mode != "train_teacher":
        set_seed(config.seed)  # the student's fresh weights do not depend on whether the teacher was cached
        student, student_tokenizer = build_student_for(
            config, task, teacher, teacher_tokenizer, splits["train"], transfer_rows
        )
    else:
        student_tokenizer = teacher_tokenizer
    other = teacher_tokenizer if config.mode == "distill" else None
    train_examples, eval_examples = preprocess_splits(config, task, splits, student_tokenizer, other)
    unlabelled = list(transfer_rows or []) if config.mode == "distill" else []
    if config.data.augment is not None and config.mode == "distill":
        assert teacher is not None and teacher_tokenizer is not None
        made = augmented_rows(config, splits["train"], teacher, teacher_tokenizer)
        unlabelled += drop_evaluation_texts(config, splits, made)
    elif config.data.augment is not None:
        print(f"data.augment is left out: a {config.mode} run has no teacher to label the augmented texts")
    if unlabelled:
        first_id = 1 + max(int(example["example_id"]) for example in train_examples)
        train_examples += transfer_examples(config, task, unlabelled, student_tokenizer, other, first_id)
    return RunParts(
        config,
        task,
        splits,
        teacher,
        teacher_tokenizer,
        student,
        student_tokenizer,
        train_examples,
        eval_examples,
        extra_teachers,
    )


def teacher_distiller(
    config: RunConfig,
    parts: RunParts,
    teacher: nn.Module | None,
    objective: Objective,
    view: SequenceView | TokenView,
) -> Distiller:
    """The distiller of a live teacher: ``teacher`` alone, or with ``extra_teachers`` (weighted as configured), or
    the student itself (``teacher: ema | self``; ``teacher`` is then None)."""
    assert parts.student is not None
    if config.teacher is not None and not config.teacher.is_model:
        return Distiller(parts.student, config.teacher.kind, objective, view=view, ema_decay=config.distill.ema_decay)
    assert teacher is not None
    if not parts.extra_teachers:
        return Distiller(parts.student, teacher, objective, view=view)
    return MultiTeacherDistiller(
        parts.student,
        [teacher, *parts.extra_teachers],
        objective,
        weights=config.distill.teacher_weights,
        combine=config.distill.teacher_combine,
        view=view,
    )


def build_objective(config: RunConfig, parts: RunParts) -> Objective:
    """The :class:`~kdistill.distillers.Objective` that ``distill`` describes (``layer_map`` expanded into matches
    between ``parts``' teacher and student)."""
    spec = config.distill
    matches = [Match(**m.model_dump()) for m in spec.matches]
    if spec.layer_map is not None:
        teacher = parts.teacher if parts.teacher is not None else parts.student  # teacher: ema copies the student
        matches += expand_layer_map(
            spec.layer_map,
            num_layers(teacher),
            num_layers(parts.student),
            loss=spec.layer_map_loss,
            weight=spec.layer_map_weight,
            projection=spec.layer_map_projection,
        )
    stages = [Stage(steps=s.steps, weights=dict(s.weights)) for s in spec.stages] or None
    return Objective(
        kd_loss=spec.kd_loss,
        kd_weight=spec.kd_weight,
        hard_weight=spec.hard_weight,
        temperature=spec.temperature,
        t2_scaling=spec.t2_scaling,
        kd_kwargs=spec.kd_kwargs,
        matches=matches,
        stages=stages,
    )


def evaluate(
    parts: RunParts, model: nn.Module, split: str = "validation", inputs: str = "student"
) -> dict[str, float]:
    """The task's metrics for ``model`` on one split (``inputs``: which side's inputs of the examples it reads)."""
    return evaluate_task(
        parts.task,
        model,
        parts.eval_examples[split],
        parts.splits[split],
        batch_size=parts.config.training.eval_batch_size,
        inputs=inputs,
        progress=f"eval {split}" if parts.config.training.progress else None,
    )


def compare_batches(
    parts: RunParts,
    teacher_tokenizer: Tokenizer,
    student_tokenizers: dict[str, Tokenizer],
    *,
    split: str = "validation",
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Batches of ``split`` with the teacher's inputs under ``"teacher"`` and the students' under ``"student"``.

    Students that share the teacher's tokenizer read the teacher's inputs; the others must share one tokenizer
    among themselves (compare students with different vocabularies in separate calls). Returns the batches and,
    per student, which inputs it reads.
    """
    if split not in parts.splits:
        raise KdistillError(f"the data has no {split!r} split (have: {', '.join(parts.splits)})")
    own = {name: tok for name, tok in student_tokenizers.items() if tokenizers_differ(tok, teacher_tokenizer)}
    distinct = []
    for tokenizer in own.values():
        if all(tokenizers_differ(tokenizer, seen) for seen in distinct):
            distinct.append(tokenizer)
    if len(distinct) > 1:
        raise KdistillError(f"students {', '.join(own)} use different tokenizers; compare them in separate calls")
    rows = parts.splits[split]
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    student_tokenizer = distinct[0] if distinct else teacher_tokenizer
    examples = parts.task.preprocess(
        rows, tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer, max_length=parts.config.data.max_length
    )
    batches = make_batches(examples, parts.task.collate, parts.config.training.eval_batch_size)
    if examples and "student" not in examples[0]:  # one tokenizer for all: both views read the same batch inputs
        batches = [{"student": _inputs_only(b), "teacher": _inputs_only(b), **_rest(b)} for b in batches]
    inputs = {name: ("student" if name in own else "teacher") for name in student_tokenizers}
    return batches, inputs


_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "offset_mapping", "word_ids")


def _inputs_only(example: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in example.items() if k in _INPUT_KEYS}


def _rest(example: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in example.items() if k not in _INPUT_KEYS}
