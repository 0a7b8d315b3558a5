"""The pieces of a causal-LM run (``task: causal_lm``) beyond :func:`kdistill.runs.parts.build_parts`.

A pad token for the collator, the checks on the teacher's tokenizer (one shared tokenizer, or
``distill.cross_tokenizer`` with a teacher that has its own; a cache needs one), the examples rendered again with
completion offsets for ``align``, and the evaluation written to ``eval.json``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from kdistill.cache import CacheReader
from kdistill.config import RunConfig
from kdistill.data.sft import render_sft
from kdistill.errors import InvalidArgumentError, KdistillError, VocabMismatchError
from kdistill.runs.cache_checks import open_run_cache
from kdistill.runs.parts import RunParts, build_parts
from kdistill.tasks import make_batches
from kdistill.tasks.base import ShowingProgress, tokenizers_differ
from kdistill.tasks.causal_lm import evaluate_lm, tokenizer_name

if TYPE_CHECKING:
    from kdistill.models.loading import Tokenizer


def evaluate_causal_lm(
    parts: RunParts, model: nn.Module, split: str, batch_size: int, *, with_teacher: bool = True
) -> dict[str, float]:
    """Perplexity, next-token accuracy and, when the run has a teacher (and ``with_teacher``), agreement and KL to it,
    on ``split``; the two vocabularies compared by the run's ``distill.kd_kwargs.vocab_policy``, as in training."""
    batches: Sequence[Any] = make_batches(parts.eval_examples[split], parts.collate, batch_size)
    if parts.config.training.progress:
        batches = ShowingProgress(batches, f"eval {split}")
    policy = parts.config.distill.kd_kwargs.get("vocab_policy", "error")
    return evaluate_lm(model, batches, teacher=parts.teacher if with_teacher else None, vocab_policy=policy)


def causal_lm_parts(config: RunConfig) -> RunParts:
    """The run's parts (:func:`kdistill.runs.parts.build_parts`) with a pad token the collator pads with (the EOS
    token when the tokenizer has none, as most causal-LM tokenizers do)."""
    parts = build_parts(config)
    tokenizer = parts.student_tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    parts.task.pad_token_id = tokenizer.pad_token_id
    return parts


def check_teacher_cache(config: RunConfig, parts: RunParts) -> CacheReader:
    """The run's :class:`~kdistill.cache.CacheReader`, after checking that the cache was written for this run.

    The manifest is compared with the run field by field, as for the engine's cached runs
    (:func:`kdistill.runs.cache_checks.open_run_cache`: teacher, teacher tokenizer, training examples in order,
    temperature, versions); a difference raises :class:`~kdistill.cache.CacheMismatchError` naming the field.
    Student and teacher must also share a tokenizer: the cached ids are the teacher's, and the student reads them as
    its own.
    """
    if tokenizers_differ(parts.student_tokenizer, parts.teacher_tokenizer):
        teacher_name, student_name = tokenizer_name(parts.teacher_tokenizer), tokenizer_name(parts.student_tokenizer)
        raise VocabMismatchError(
            f"distill.teacher_cache holds token ids of the teacher's tokenizer ({teacher_name}) but the student's "
            f"({student_name}) differs; a cache needs one tokenizer"
        )
    return open_run_cache(config, parts)


def check_tokenizers(config: RunConfig, parts: RunParts) -> bool:
    """Whether the run distils across tokenizers; refuses what cannot work, naming both tokenizers.

    A teacher with another tokenizer needs ``distill.cross_tokenizer``; the option with one shared tokenizer is
    refused too (it would compare sorted probabilities where the ids themselves can be compared), as is data without
    the teacher's rendering (packed plain text is tokenized by the student's tokenizer alone).
    """
    if config.mode != "distill" or parts.teacher is None or config.distill.teacher_cache is not None:
        return False  # a cache is checked by check_teacher_cache (one tokenizer; cross_tokenizer refused before)
    method = config.distill.cross_tokenizer
    differ = tokenizers_differ(parts.student_tokenizer, parts.teacher_tokenizer)
    names = (
        f"the student's ({tokenizer_name(parts.student_tokenizer)}) and the teacher's "
        f"({tokenizer_name(parts.teacher_tokenizer)})"
    )
    if differ and method is None:
        raise VocabMismatchError(
            f"token-level distillation of a causal LM needs one tokenizer, but {names} differ; set "
            "distill.cross_tokenizer to 'uld' or 'align' to distil across tokenizers, use a student with the "
            "teacher's tokenizer, or black-box distillation (kdistill generate)"
        )
    if method is None:
        return False
    if not differ:
        raise InvalidArgumentError(
            f"distill.cross_tokenizer={method!r} is set but student and teacher share one tokenizer "
            f"({tokenizer_name(parts.teacher_tokenizer)}); remove it: the usual divergences compare the ids directly"
        )
    if any("teacher" not in example for example in parts.train_examples[:1]):
        raise InvalidArgumentError(
            f"distill.cross_tokenizer={method!r} needs the teacher's own rendering of every example, which SFT "
            "records get (messages, instruction/output, prompt/completion) but packed plain text (data.format: "
            "text) does not"
        )
    return True


def with_completion_offsets(parts: RunParts) -> None:
    """Replace the run's examples by the same rendering with ``completion_offsets`` on both sides (for ``align``).

    The task renders without offsets; the records are rendered again with ``offsets=True`` and the ids must be the
    same, example by example (they come from the same function with the same options).
    """
    task, config = parts.task, parts.config
    for split in ("train", *parts.eval_examples):
        examples = parts.train_examples if split == "train" else parts.eval_examples[split]
        with warnings.catch_warnings():  # dropped records were reported by the first rendering
            warnings.simplefilter("ignore", UserWarning)
            rendered = render_sft(
                [dict(row) for row in parts.splits[split]],
                parts.student_tokenizer,
                max_length=config.data.max_length,
                teacher_tokenizer=parts.teacher_tokenizer,
                system_prompt=task.system_prompt,
                mask_prompt=task.mask_prompt,
                offsets=True,
            )
        same = len(rendered) == len(examples) and all(
            new["input_ids"] == old["input_ids"] and new["teacher"]["input_ids"] == old["teacher"]["input_ids"]
            for new, old in zip(rendered, examples, strict=True)
        )
        if not same:
            raise KdistillError(
                f"the {split} examples rendered with completion offsets differ from the task's rendering; this is "
                "a bug in kdistill"
            )
        if split == "train":
            parts.train_examples = rendered
        else:
            parts.eval_examples[split] = rendered


def pad_id(tokenizer: Tokenizer) -> int:
    """The id a collator pads ``tokenizer``'s sequences with: its pad token, else its EOS token, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0
