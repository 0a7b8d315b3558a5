"""A causal-LM run from a :class:`~kdistill.config.RunConfig` (``task: causal_lm``), on either training backend.

``training.backend`` chooses what trains the student; both optimize one :class:`~kdistill.distillers.Objective`
(the same KD terms, T² and normalization by each term's global unit count), so on the same batches with the same
optimizer they end with the same weights:

* ``trainer`` (the default): :class:`~kdistill.integrations.DistillationTrainer`, a ``transformers.Trainer``: chunked
  loss, on-policy batches, LoRA students, a teacher with another tokenizer; weights and temperature on schedules and
  ``stages``. Refused by name, with the engine suggested: intermediate matches, several teachers, per-position
  temperatures, ``metric_for_best`` and early stopping.
* ``engine``: kdistill's loop (:func:`kdistill.training.train`) with a :class:`~kdistill.distillers.Distiller` over
  :class:`~kdistill.tasks.causal_lm.CausalLMView`: everything the encoder runs have (matches and ``layer_map``, several
  teachers, per-position temperatures, ``metric_for_best``, early stopping, best model). Refused by name, with the
  trainer suggested: ``cross_tokenizer``, on-policy steps, ``chunked_loss``, ``student.lora``.

Data, tokenizer, teacher and student come from the same builders as every other run
(:func:`kdistill.runs.parts.build_parts`); the run directory holds the same ``run.json``, ``config.yaml``,
``student/`` and ``eval.json`` (perplexity, next-token accuracy and, with a teacher, agreement and KL to it) on both
backends. A LoRA student is saved twice: its adapter in ``student_adapter/`` and, merged into the base weights, as a
plain model in ``student/`` (what every other run writes, loadable with ``AutoModelForCausalLM.from_pretrained``).

With ``distill.teacher_cache`` (a directory ``kdistill cache RUN.yaml`` wrote) the teacher never runs: its cached
top-k log-probabilities are the KD term's teacher. The cache's manifest must match the run (teacher, teacher
tokenizer, training examples in order, temperature) or the run is refused, naming the field, before anything is
written. The teacher is still loaded when the student is built from it (``student.kind: from_teacher`` or
``shrink``), and dropped before training. Evaluation then has no teacher: ``eval.json`` has perplexity and
next-token accuracy, and its ``not_measured`` entry says that agreement and KL to the teacher were not computed, and
why.

With ``distill.cross_tokenizer`` (``uld`` or ``align``) the teacher and the student each keep their own tokenizer (a
student with ``kind: pretrained`` brings its own): every example carries the teacher's rendering of the same record,
and the KD term is the ULD distance of :mod:`kdistill.distillers.lm_cross`. ``align`` needs each token's characters
within the completion, so the records are rendered once more with ``offsets=True`` (checked to give the same ids).
Without it, a teacher whose tokenizer differs is refused, naming both tokenizers and suggesting the option.
Agreement and KL to the teacher compare distributions over one vocabulary, so ``eval.json`` marks them
``not_measured`` here too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from kdistill._io import write_json_atomically
from kdistill.cache import with_cache_index
from kdistill.config import RunConfig
from kdistill.data.sft_collate import SFTCollator
from kdistill.distillers import Distiller, Objective, Stage, SupervisedTrainer
from kdistill.errors import InvalidArgumentError, KdistillError
from kdistill.integrations.arguments import DistillationArguments
from kdistill.integrations.run_log import use_run_log
from kdistill.integrations.trainer import DistillationTrainer
from kdistill.runs.cache_checks import cached_teacher_parts
from kdistill.runs.causal_lm_parts import (
    causal_lm_parts,
    check_teacher_cache,
    check_tokenizers,
    evaluate_causal_lm,
    pad_id,
    with_completion_offsets,
)
from kdistill.runs.engine import Collate, check_schedules, make_training_config
from kdistill.runs.parts import RunParts, build_objective, teacher_distiller
from kdistill.runs.records import RunResult, check_output_dir, is_main_process, recorded_run
from kdistill.schedules import TEMPERATURE_SCHEDULES
from kdistill.tasks.causal_lm import CausalLMView
from kdistill.training import train
from kdistill.training.checkpoint import latest_trainer_checkpoint

if TYPE_CHECKING:
    from peft import LoraConfig

# what eval.json says in place of the teacher metrics when a cache stood in for the teacher
CACHE_NOT_MEASURED = (
    "teacher_agreement and kl_to_teacher: distill.teacher_cache stood in for the teacher, which never ran, and the "
    "cache holds the training examples only"
)
CROSS_NOT_MEASURED = (
    "teacher_agreement and kl_to_teacher: teacher and student have different tokenizers (distill.cross_tokenizer), "
    "and both compare next-token distributions over one vocabulary, position by position"
)

SELF_NOT_MEASURED = (
    "teacher_agreement and kl_to_teacher: the teacher is the student itself (teacher: {kind}), so there is no "
    "other model to compare with"
)


def causal_lm_backend(config: RunConfig) -> str:
    """``training.backend`` of a causal-LM run: ``"trainer"`` (DistillationTrainer, the default) or ``"engine"``."""
    return config.training.backend or "trainer"


def check_causal_lm_config(config: RunConfig) -> None:
    """Refuse, before anything is loaded, what a causal-LM run does not do (naming the field and the reason)."""
    spec = config.distill
    if config.mode == "train_teacher":
        raise InvalidArgumentError(
            "mode 'train_teacher' is not available for task causal_lm; tune the teacher with LoRA and give "
            "teacher.adapter, or distil with mode 'distill'"
        )
    if config.teacher is not None and config.teacher.fine_tune:
        raise InvalidArgumentError("teacher.fine_tune is not available for task causal_lm; use teacher.adapter")
    if spec.cross_tokenizer is not None and config.mode == "distill":
        method = f"distill.cross_tokenizer={spec.cross_tokenizer!r}"
        if spec.teacher_cache is not None:
            raise InvalidArgumentError(
                f"distill.teacher_cache cannot be used with {method}: a cache holds the teacher's ids in its own "
                "vocabulary and no completion offsets; run the teacher live"
            )
        if spec.chunked_loss:
            raise InvalidArgumentError(
                f"distill.chunked_loss cannot be used with {method}: the ULD distance sorts whole probability rows, "
                "so it needs the logits; set distill.chunked_loss to false"
            )
        if spec.on_policy_fraction > 0:
            raise InvalidArgumentError(
                f"distill.on_policy_fraction={spec.on_policy_fraction} cannot be used with {method}: the student's "
                "samples have no teacher tokenization to compare with; set it to 0"
            )
        if spec.kd_kwargs:
            raise InvalidArgumentError(
                f"distill.kd_kwargs ({', '.join(sorted(spec.kd_kwargs))}) cannot be used with {method}: the KD term "
                "is the ULD distance, which takes no arguments and maps no vocabulary; remove them"
            )
    if spec.teacher_cache is not None and config.mode == "distill" and spec.on_policy_fraction > 0:
        raise InvalidArgumentError(
            f"distill.on_policy_fraction={spec.on_policy_fraction} cannot be used with distill.teacher_cache: "
            "the teacher never scored the student's own samples; set it to 0 or run the teacher live"
        )
    if causal_lm_backend(config) == "trainer":
        _check_trainer_backend(config)
    else:
        _check_engine_backend(config)
    if config.mode == "distill" and isinstance(spec.kd_weight, (int, float)) and float(spec.kd_weight) == 0.0:
        raise InvalidArgumentError("distill.kd_weight is 0: use mode 'baseline' for SFT without a teacher")


def _check_trainer_backend(config: RunConfig) -> None:
    """What DistillationTrainer (``training.backend: trainer``) does not do, refused naming the engine where it can."""
    spec, training = config.distill, config.training
    engine = "; set training.backend: engine, whose loop does"
    if config.extra_teachers:
        raise InvalidArgumentError(
            "extra_teachers (several teachers) are not available on training.backend 'trainer', which distils one "
            f"teacher{engine}"
        )
    if spec.layer_map is not None or spec.matches:
        raise InvalidArgumentError(
            "distill.layer_map and distill.matches (intermediate matches) are not available on training.backend "
            f"'trainer', which distils the output distributions (distill.kd_loss){engine}"
        )
    if isinstance(spec.temperature, dict) and spec.temperature.get("name") in TEMPERATURE_SCHEDULES:
        raise InvalidArgumentError(
            f"distill.temperature {spec.temperature['name']!r} sets a temperature per position from both models' "
            f"logits, which training.backend 'trainer' does not keep (its chunked path never builds them){engine}"
        )
    if training.metric_for_best is not None or training.early_stopping_patience is not None:
        name = "metric_for_best" if training.metric_for_best is not None else "early_stopping_patience"
        raise InvalidArgumentError(
            f"training.{name} picks the student by the task's metrics (perplexity, kl_to_teacher, ...), which "
            f"training.backend 'trainer' does not compute while it trains{engine}"
        )
    if config.teacher is not None and not config.teacher.is_model and config.mode == "distill":
        raise InvalidArgumentError(
            f"teacher: {config.teacher.kind} (self-distillation) is not available on training.backend 'trainer', "
            f"which distils a teacher model of its own{engine}"
        )
    if spec.teacher_cache is not None and config.mode == "distill" and training.eval_every:
        raise InvalidArgumentError(
            "training.eval_every cannot be used with distill.teacher_cache on training.backend 'trainer': the cache "
            "holds the teacher's outputs on the training examples only; the evaluation after training still runs"
        )
    try:  # the schedules and stages, checked as the Trainer will build them
        Objective(
            kd_loss=spec.kd_loss, kd_weight=spec.kd_weight, hard_weight=spec.hard_weight,
            temperature=spec.temperature, t2_scaling=spec.t2_scaling,
            stages=[Stage(steps=s.steps, weights=dict(s.weights)) for s in spec.stages] or None,
        )  # fmt: skip
    except KdistillError as error:
        raise InvalidArgumentError(f"distill: {error}") from None


def _check_engine_backend(config: RunConfig) -> None:
    """What kdistill's loop (``training.backend: engine``) does not do for causal LMs, refused naming the trainer."""
    spec = config.distill
    trainer = "; set training.backend: trainer (DistillationTrainer), which does"
    refused = {
        "distill.cross_tokenizer": (
            spec.cross_tokenizer is not None and config.mode == "distill",
            "the engine's cross-tokenizer distiller pairs the tokens of token-level tasks, not next-token positions",
        ),
        "distill.on_policy_fraction": (
            spec.on_policy_fraction > 0 and config.mode == "distill",
            "the engine's loop trains on the dataset's completions only, it samples none",
        ),
        "distill.chunked_loss": (spec.chunked_loss, "the engine computes the full (B, T, V) logits"),
        "student.lora": (config.student.lora is not None, "the engine trains every weight of the student"),
    }
    for name, (used, why) in refused.items():
        if used:
            raise InvalidArgumentError(f"{name} is not available on training.backend 'engine': {why}{trainer}")


def distillation_arguments(config: RunConfig, output_dir: Path) -> DistillationArguments:
    """The run's :class:`DistillationArguments` (what ``training`` and ``distill`` say, in the Trainer's words)."""
    training, spec = config.training, config.distill
    kd_kwargs = dict(spec.kd_kwargs)
    vocab_policy = kd_kwargs.pop("vocab_policy", "error")
    baseline = config.mode == "baseline"
    return DistillationArguments(
        output_dir=str(output_dir / "trainer"),
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.eval_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        num_train_epochs=training.num_epochs,
        max_steps=training.max_steps or -1,
        weight_decay=training.weight_decay,
        optim="sgd" if training.optimizer == "sgd" else "adamw_torch",
        optim_args=f"momentum={training.sgd_momentum}" if training.optimizer == "sgd" else None,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_steps or training.warmup_ratio,  # a float < 1 is a share of the steps
        max_grad_norm=training.max_grad_norm or 0.0,
        bf16=training.mixed_precision == "bf16",
        fp16=training.mixed_precision == "fp16",
        use_cpu=not _has_cuda(),  # bf16 autocast then runs on the CPU, as the engine's accelerate loop runs it
        logging_steps=training.log_every,
        eval_strategy="steps" if training.eval_every else "no",
        eval_steps=training.eval_every,
        save_strategy="steps" if training.save_every else "no",
        save_steps=training.save_every or 500,
        save_total_limit=training.keep_last,
        report_to=[],  # metrics.jsonl and TensorBoard are written by RunLogCallback, as the engine writes them
        disable_tqdm=not training.progress,
        train_sampling_strategy="group_by_length" if training.group_by_length else "random",
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=_has_cuda(),
        kd_loss=spec.kd_loss,
        temperature=_number_or_schedule(spec.temperature),
        kd_weight=0.0 if baseline else _number_or_schedule(spec.kd_weight),
        hard_weight=1.0 if baseline else _number_or_schedule(spec.hard_weight),
        stages=None if baseline else [stage.model_dump() for stage in spec.stages] or None,
        t2_scaling=spec.t2_scaling,
        kd_kwargs=kd_kwargs or None,
        vocab_policy=vocab_policy,
        chunked_loss=spec.chunked_loss,
        chunk_size=spec.chunk_size,
        on_policy_fraction=0.0 if baseline else spec.on_policy_fraction,
        on_policy_max_new_tokens=spec.on_policy_max_new_tokens,
        on_policy_temperature=spec.on_policy_temperature,
        teacher_cache=spec.teacher_cache if config.mode == "distill" else None,
        cache_leftover=spec.cache_leftover,
        cross_tokenizer=spec.cross_tokenizer if config.mode == "distill" else None,
    )


def _number_or_schedule(value: float | dict[str, Any]) -> float | dict[str, Any]:
    return dict(value) if isinstance(value, dict) else float(value)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def lora_config(config: RunConfig) -> LoraConfig | None:
    """peft's ``LoraConfig`` for ``student.lora`` (None without it)."""
    spec = config.student.lora
    if spec is None:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise KdistillError("student.lora needs the package peft; install it with: pip install peft") from None
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )


def run_causal_lm(config: RunConfig) -> RunResult:
    """Carry out one causal-LM run on its ``training.backend`` (see the module docstring for what it writes)."""
    check_causal_lm_config(config)
    start = time.perf_counter()
    check_output_dir(config)
    parts = causal_lm_parts(config)
    cached = config.mode == "distill" and config.distill.teacher_cache is not None
    cross = check_tokenizers(config, parts)
    if cross and config.distill.cross_tokenizer == "align":
        with_completion_offsets(parts)
    if cached:  # the cache stands in for the teacher: checked against the run before anything is written
        check_teacher_cache(config, parts)
    not_measured = CACHE_NOT_MEASURED if cached else CROSS_NOT_MEASURED if cross else None
    if config.teacher is not None and not config.teacher.is_model:
        not_measured = SELF_NOT_MEASURED.format(kind=config.teacher.kind)
    if causal_lm_backend(config) == "engine":
        return _run_on_engine(config, parts, start, cached=cached, not_measured=not_measured)
    return _run_on_trainer(config, parts, start, cached=cached, cross=cross, not_measured=not_measured)


def _run_on_trainer(
    config: RunConfig, parts: RunParts, start: float, *, cached: bool, cross: bool, not_measured: str | None
) -> RunResult:
    """``training.backend: trainer``: :class:`~kdistill.integrations.DistillationTrainer` trains the student."""
    out = Path(config.output_dir)
    tokenizer = parts.student_tokenizer
    teacher = None
    train_examples = parts.train_examples
    if cross:  # the teacher keeps its own tokenizer: no adaptation to the student's
        teacher = parts.teacher
    elif cached:
        train_examples = with_cache_index(parts.train_examples)
        parts.teacher = None  # loaded only to build the student from; never run, not kept
    elif config.mode == "distill":
        teacher = parts.task.adapt_teacher(
            parts.teacher, tokenizer=tokenizer, teacher_tokenizer=parts.teacher_tokenizer
        )
    collator = SFTCollator(
        pad_token_id=tokenizer.pad_token_id,
        with_prompts=config.distill.on_policy_fraction > 0,
        teacher_pad_token_id=pad_id(parts.teacher_tokenizer) if cross else None,
    )
    args = distillation_arguments(config, out)
    trainer = DistillationTrainer(
        model=parts.student,
        teacher_model=teacher,
        args=args,
        peft_config=lora_config(config),
        train_dataset=train_examples,
        eval_dataset=parts.eval_examples.get("validation") if config.training.eval_every else None,
        data_collator=collator,
        processing_class=tokenizer,
    )
    use_run_log(trainer, out, tensorboard="tensorboard" in config.training.log_with, progress=config.training.progress)
    check_schedules(config, trainer.objective if config.mode == "distill" else None, len(train_examples))
    with recorded_run(out, config, start) as record:
        checkpoint = latest_trainer_checkpoint(out / "trainer") if config.resume else None
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        student_dir = out / "student"
        model = trainer.model
        if config.student.lora is not None:  # the adapter beside a plain, merged student that from_pretrained loads
            trainer.save_model(str(out / "student_adapter"))
            model = model.merge_and_unload()
            if is_main_process():
                model.save_pretrained(student_dir)
        else:
            trainer.save_model(str(student_dir))
        if is_main_process():
            tokenizer.save_pretrained(student_dir)
        metrics = _write_eval(config, parts, model, not_measured, with_teacher=not cross)
    return RunResult(out, student_dir, metrics, record["seconds"])


def engine_distiller(config: RunConfig, parts: RunParts) -> tuple[Distiller, list[dict[str, Any]], Collate]:
    """``(distiller, training examples, collate)`` of a causal-LM run on the engine: a
    :class:`~kdistill.distillers.Distiller` with :class:`~kdistill.tasks.causal_lm.CausalLMView` (its objective from
    ``distill``: schedules, stages, intermediate matches), several teachers, a teacher cache, or the labels alone."""
    view = CausalLMView()
    if config.mode == "baseline":
        return SupervisedTrainer(parts.student, view=view), parts.train_examples, parts.collate
    objective = build_objective(config, parts)
    if config.distill.teacher_cache is not None:
        distiller, examples, collate = cached_teacher_parts(config, parts, objective)
        parts.teacher = None  # built only to shape the student; the cache stands in for it, so it is not kept
        return distiller, examples, collate
    teacher = None  # teacher: ema | self — the student teaches itself
    if parts.teacher is not None:
        teacher = parts.task.adapt_teacher(
            parts.teacher, tokenizer=parts.student_tokenizer, teacher_tokenizer=parts.teacher_tokenizer
        )
    distiller = teacher_distiller(config, parts, teacher, objective, view)
    return distiller, parts.train_examples, parts.collate


def _run_on_engine(
    config: RunConfig, parts: RunParts, start: float, *, cached: bool, not_measured: str | None
) -> RunResult:
    """``training.backend: engine``: kdistill's loop (:func:`kdistill.training.train`) trains the student.

    The run directory is the trainer backend's (``run.json``, ``config.yaml``, ``student/`` from
    ``save_pretrained`` with its tokenizer, ``eval.json``) plus the loop's own logs (``metrics.jsonl``,
    ``summary.json``, checkpoints); ``training.metric_for_best`` and early stopping read the task's metrics on the
    validation split.
    """
    out = Path(config.output_dir)
    distiller, examples, collate = engine_distiller(config, parts)
    # everything below the first write is validated here: the probe runs every active term once
    distiller.setup(collate(examples[: config.training.batch_size]))
    check_schedules(config, getattr(distiller, "objective", None), len(examples))
    batch_size = config.training.eval_batch_size
    eval_fn = None
    if parts.has_split("validation"):

        def eval_fn(model: nn.Module) -> dict[str, float]:
            return evaluate_causal_lm(parts, model, "validation", batch_size, with_teacher=not cached)

    with recorded_run(out, config, start) as record:
        result = train(distiller, examples, make_training_config(config), collate_fn=collate, eval_fn=eval_fn)
        parts.student_tokenizer.save_pretrained(result.student_dir)
        metrics = _write_eval(config, parts, parts.student, not_measured, with_teacher=not cached)
    return RunResult(out, result.student_dir, metrics, record["seconds"])


def _write_eval(
    config: RunConfig, parts: RunParts, model: nn.Module, not_measured: str | None, *, with_teacher: bool
) -> dict[str, float]:
    """Score ``model`` on each evaluation split and write ``eval.json`` (with ``not_measured`` when given)."""
    metrics: dict[str, float] = {}
    for split in ("validation", "test"):
        if parts.has_split(split):
            scores = evaluate_causal_lm(
                parts, model, split, config.training.eval_batch_size, with_teacher=with_teacher
            )
            metrics.update({f"{split}/{key}": value for key, value in scores.items()})
    written: dict[str, Any] = dict(metrics)
    if not_measured is not None:
        written["not_measured"] = not_measured
    if is_main_process():
        write_json_atomically(Path(config.output_dir) / "eval.json", written)
    return metrics
