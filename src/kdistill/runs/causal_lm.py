"""A causal-LM run from a :class:`~kdistill.config.RunConfig` (``task: causal_lm``), through the Trainer integration.

``kdistill train`` hands causal-LM runs here, so the CLI and :class:`~kdistill.integrations.hf.DistillationTrainer`
share one implementation of the loss (global token normalization, vocabulary policy, chunked loss, on-policy
batches, LoRA). Data, tokenizer, teacher and student come from the same builders as every other run
(:func:`kdistill.runs.parts.build_parts`); the run directory holds the same ``run.json``, ``config.yaml``,
``student/`` and ``eval.json`` (perplexity, next-token accuracy and, with a teacher, agreement and KL to it).
A LoRA student is saved twice: its adapter in ``student_adapter/`` and, merged into the base weights, as a plain
model in ``student/`` (what every other run writes, loadable with ``AutoModelForCausalLM.from_pretrained``).

With ``distill.teacher_cache`` (a directory ``kdistill cache RUN.yaml`` wrote) the teacher never runs: its cached
top-k log-probabilities are the KD term's teacher (see :class:`~kdistill.integrations.hf.DistillationTrainer`). The
cache's manifest must match the run (teacher, teacher tokenizer, training examples in order, temperature) or the
run is refused, naming the field, before anything is written. The teacher is still loaded when the student is built
from it (``student.kind: from_teacher`` or ``shrink``), as in the engine's runs, and dropped before training.
Evaluation then has no teacher: ``eval.json`` has perplexity and next-token accuracy, and its ``not_measured``
entry says that agreement and KL to the teacher were not computed, and why.

With ``distill.cross_tokenizer`` (``uld`` or ``align``) the teacher and the student each keep their own tokenizer (a
student with ``kind: pretrained`` brings its own): every example carries the teacher's rendering of the same record,
and the KD term is the ULD distance of :mod:`kdistill.distillers.lm_cross`. ``align`` needs each token's characters within the
completion, so the records are rendered once more with ``offsets=True`` (checked to give the same ids). Without it,
a teacher whose tokenizer differs is refused, naming both tokenizers and suggesting the option. Agreement and KL to
the teacher compare distributions over one vocabulary, so ``eval.json`` marks them ``not_measured`` here too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kdistill._io import write_json_atomically
from kdistill.cache import with_cache_index
from kdistill.config import RunConfig
from kdistill.data.sft_collate import SFTCollator
from kdistill.errors import InvalidArgumentError, KdistillError
from kdistill.runs.causal_lm_parts import (
    causal_lm_parts,
    check_teacher_cache,
    check_tokenizers,
    evaluate_causal_lm,
    pad_id,
    with_completion_offsets,
)
from kdistill.runs.records import RunResult, check_output_dir, recorded_run

# what eval.json says in place of the teacher metrics when a cache stood in for the teacher
CACHE_NOT_MEASURED = (
    "teacher_agreement and kl_to_teacher: distill.teacher_cache stood in for the teacher, which never ran, and the "
    "cache holds the training examples only"
)
CROSS_NOT_MEASURED = (
    "teacher_agreement and kl_to_teacher: teacher and student have different tokenizers (distill.cross_tokenizer), "
    "and both compare next-token distributions over one vocabulary, position by position"
)


def check_causal_lm_config(config: RunConfig) -> None:
    """Refuse, before anything is loaded, what a causal-LM run does not do (naming the field)."""
    spec = config.distill
    if config.mode == "train_teacher":
        raise InvalidArgumentError(
            "mode 'train_teacher' is not available for task causal_lm; tune the teacher with LoRA and give "
            "teacher.adapter, or distil with mode 'distill'"
        )
    if config.teacher is not None and config.teacher.fine_tune:
        raise InvalidArgumentError("teacher.fine_tune is not available for task causal_lm; use teacher.adapter")
    if config.extra_teachers:
        raise InvalidArgumentError("extra_teachers is not available for task causal_lm (one teacher)")
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
    if spec.teacher_cache is not None and config.mode == "distill":
        if spec.on_policy_fraction > 0:
            raise InvalidArgumentError(
                f"distill.on_policy_fraction={spec.on_policy_fraction} cannot be used with distill.teacher_cache: "
                "the teacher never scored the student's own samples; set it to 0 or run the teacher live"
            )
        if config.training.eval_every:
            raise InvalidArgumentError(
                "training.eval_every cannot be used with distill.teacher_cache for task causal_lm: the cache holds "
                "the teacher's outputs on the training examples only; the evaluation after training still runs"
            )
    if spec.layer_map is not None or spec.matches or spec.stages:
        raise InvalidArgumentError(
            "distill.layer_map, distill.matches and distill.stages are not available for task causal_lm; "
            "it distils the output distributions (distill.kd_loss)"
        )
    for name in ("kd_weight", "hard_weight", "temperature"):
        if not isinstance(getattr(spec, name), (int, float)):
            raise InvalidArgumentError(f"distill.{name} must be a number for task causal_lm (no schedule)")
    if config.mode == "distill" and float(spec.kd_weight) == 0.0:
        raise InvalidArgumentError("distill.kd_weight is 0: use mode 'baseline' for SFT without a teacher")


def distillation_arguments(config: RunConfig, output_dir: Path) -> Any:
    """The run's :class:`DistillationArguments` (what ``training`` and ``distill`` say, in the Trainer's words)."""
    from kdistill.integrations import DistillationArguments

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
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_steps or training.warmup_ratio,  # a float < 1 is a share of the steps
        max_grad_norm=training.max_grad_norm or 0.0,
        bf16=training.mixed_precision == "bf16",
        fp16=training.mixed_precision == "fp16",
        logging_steps=training.log_every,
        eval_strategy="steps" if training.eval_every else "no",
        eval_steps=training.eval_every,
        save_strategy="steps" if training.save_every else "no",
        save_steps=training.save_every or 500,
        save_total_limit=training.keep_last,
        report_to=list(training.log_with),
        disable_tqdm=not training.progress,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=_has_cuda(),
        kd_loss=spec.kd_loss,
        temperature=float(spec.temperature),
        kd_weight=0.0 if baseline else float(spec.kd_weight),
        hard_weight=1.0 if baseline else float(spec.hard_weight),
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


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def lora_config(config: RunConfig) -> Any:
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


def run_causal_lm(config: RunConfig) -> Any:
    """Carry out one causal-LM run (see the module docstring for what it writes)."""
    from kdistill.integrations import DistillationTrainer

    check_causal_lm_config(config)
    start = time.perf_counter()
    out = check_output_dir(config)
    parts = causal_lm_parts(config)
    tokenizer = parts.student_tokenizer
    teacher = None
    train_examples = parts.train_examples
    cached = config.mode == "distill" and config.distill.teacher_cache is not None
    cross = check_tokenizers(config, parts)
    if cross:  # the teacher keeps its own tokenizer: no adaptation to the student's
        if config.distill.cross_tokenizer == "align":
            with_completion_offsets(parts)
        teacher = parts.teacher
        train_examples = parts.train_examples
    elif cached:  # the cache stands in for the teacher: checked against the run before anything is written
        check_teacher_cache(config, parts)
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
    with recorded_run(out, config, start) as record:
        resume = config.resume and any((out / "trainer").glob("checkpoint-*"))
        trainer.train(resume_from_checkpoint=True if resume else None)
        student_dir = out / "student"
        model = trainer.model
        if config.student.lora is not None:  # the adapter beside a plain, merged student that from_pretrained loads
            trainer.save_model(str(out / "student_adapter"))
            model = model.merge_and_unload()
            model.save_pretrained(student_dir)
        else:
            trainer.save_model(str(student_dir))
        tokenizer.save_pretrained(student_dir)
        metrics: dict[str, float] = {}
        for split in ("validation", "test"):
            if parts.has_split(split):
                scores = evaluate_causal_lm(
                    parts, model, split, config.training.eval_batch_size, with_teacher=not cross
                )
                metrics.update({f"{split}/{key}": value for key, value in scores.items()})
        written: dict[str, Any] = dict(metrics)
        if cached:
            written["not_measured"] = CACHE_NOT_MEASURED
        elif cross:
            written["not_measured"] = CROSS_NOT_MEASURED
        write_json_atomically(out / "eval.json", written)
    return RunResult(out, student_dir, metrics, record["seconds"])
