"""What :class:`~kdistill.integrations.DistillationTrainer` checks and builds before the ``Trainer`` exists.

The teacher (loaded, cast, frozen), a LoRA student, the default collator, a teacher cache's collator, and every
check that can fail before the first step: vocabulary sizes, a cache written for other arguments, examples without
their row in the cache. Each failure names the argument.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from torch import nn

from kdistill.cache import CachedTeacherCollate, CacheIncompleteError, CacheMismatchError, CacheReader
from kdistill.cache.batches import CACHE_INDEX
from kdistill.data.sft_collate import SFTCollator
from kdistill.distillers.lm_heads import unwrap_causal_lm
from kdistill.errors import InvalidArgumentError, VocabMismatchError
from kdistill.integrations.arguments import DistillationArguments
from kdistill.models.loading import load_model, resolve_model_path


def is_cached_collate(collator: Any) -> bool:
    return isinstance(collator, CachedTeacherCollate)


def _first_example(dataset: Any) -> Any:
    try:
        return dataset[0] if dataset is not None and len(dataset) else None
    except (TypeError, KeyError, IndexError):  # an iterable dataset: checked at its first batch instead
        return None


def check_cached_setup(
    model: nn.Module, teacher_model: Any, args: DistillationArguments, kwargs: Mapping[str, Any]
) -> None:
    """What a run from a teacher cache needs, checked before the Trainer exists (names the argument)."""
    if teacher_model is not None:
        raise InvalidArgumentError(
            "teacher_model and a teacher cache were both given; the cache stands in for the teacher, pass one"
        )
    if args.on_policy_fraction > 0:
        raise InvalidArgumentError(
            f"on_policy_fraction={args.on_policy_fraction!r} cannot be used with a teacher cache: the teacher never "
            "scored the student's own samples; set on_policy_fraction=0 or run the teacher live"
        )
    collator = kwargs.get("data_collator")
    if is_cached_collate(collator):
        if args.teacher_cache is not None:
            raise InvalidArgumentError(
                "data_collator is already a CachedTeacherCollate and teacher_cache is set too; give one of them"
            )
        if collator.leftover_policy != args.cache_leftover:
            raise InvalidArgumentError(
                f"the CachedTeacherCollate has leftover_policy={collator.leftover_policy!r} but "
                f"cache_leftover={args.cache_leftover!r}; they must agree"
            )
    for name in ("train_dataset", "eval_dataset"):
        example = _first_example(kwargs.get(name))
        if isinstance(example, Mapping) and CACHE_INDEX not in example:
            raise InvalidArgumentError(
                f"{name} example 0 has no {CACHE_INDEX!r}: with a teacher cache every example names its row in the "
                "cache (kdistill.cache.batches.with_cache_index on the cached examples, in the cached order)"
                + (
                    "; the cache holds the training examples only, so evaluate without it"
                    if name == "eval_dataset"
                    else ""
                )
            )
    reader = collator.reader if is_cached_collate(collator) else open_cache(args.teacher_cache)
    manifest = reader.manifest
    if not isinstance(args.temperature, (int, float)):
        raise InvalidArgumentError(
            f"temperature={args.temperature!r} cannot be a schedule with a teacher cache: the cached "
            "log-probabilities were computed at one temperature, the cache's; give that number"
        )
    if not math.isclose(float(manifest["temperature"]), float(args.temperature)):
        raise CacheMismatchError(
            f"cache manifest field 'temperature' is {float(manifest['temperature'])!r} but the arguments have "
            f"temperature={float(args.temperature)!r}"
        )
    head = unwrap_causal_lm(model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    vocab = int(manifest["vocab_size"])
    if isinstance(weight, torch.Tensor) and weight.shape[0] != vocab and args.vocab_policy == "error":
        raise VocabMismatchError(
            f"student vocabulary has {weight.shape[0]} entries but the cache's teacher vocabulary has {vocab} "
            "(manifest vocab_size); set vocab_policy='truncate' or 'pad' if token ids agree on the shared part"
        )


def open_cache(directory: str | None) -> CacheReader:
    """The complete cache at ``directory`` (``teacher_cache``)."""
    if directory is None:
        raise InvalidArgumentError("teacher_cache is not set and the data_collator is no CachedTeacherCollate")
    reader = CacheReader(directory)
    if not reader.is_complete():
        raise CacheIncompleteError(f"teacher_cache: the cache at {directory} is missing shards; rerun kdistill cache")
    return reader


def cached_collator(collator: Any, args: DistillationArguments) -> CachedTeacherCollate:
    """``collator`` plus each batch's cached teacher outputs (``batch["teacher_topk"]``)."""
    reader = open_cache(args.teacher_cache)
    return CachedTeacherCollate(collator, reader, per_token=True, leftover_policy=args.cache_leftover)


def wrap_with_peft(model: nn.Module, peft_config: Any) -> nn.Module:
    """``peft.get_peft_model(model, peft_config)``; refused when ``model`` is already a ``PeftModel``."""
    try:
        import peft  # an optional dependency: imported only when a peft_config is given
    except ImportError as error:  # pragma: no cover - peft is installed with the test extras
        raise InvalidArgumentError(f"peft_config needs the peft package: {error}") from None
    if isinstance(model, peft.PeftModel):
        raise InvalidArgumentError(
            "model is already a PeftModel and peft_config was given too; pass one of them, not both"
        )
    return peft.get_peft_model(model, peft_config)


def load_teacher(teacher: nn.Module | str | os.PathLike[str], teacher_dtype: str | None) -> nn.Module:
    """Load (or take) the teacher, cast it to ``teacher_dtype``, freeze it and put it in eval mode.

    A path goes through :mod:`kdistill.models.loading` (``packaged:`` names resolved, load errors naming
    ``teacher_model``); with ``teacher_dtype`` None or ``"auto"`` the checkpoint's own dtype is kept.
    """
    dtype = None if teacher_dtype in (None, "auto") else getattr(torch, teacher_dtype)
    if isinstance(teacher, (str, os.PathLike)):
        path = resolve_model_path(os.fspath(teacher), "teacher_model")
        if dtype is not None:
            teacher = load_model(path, transformers.AutoModelForCausalLM, "teacher_model", dtype=dtype)
        else:
            load_kwargs: dict[str, Any] = {} if teacher_dtype is None else {"dtype": "auto"}
            teacher = transformers.AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
    elif not isinstance(teacher, nn.Module):
        raise InvalidArgumentError(
            f"teacher_model must be a causal LM or a path / hub id, got {type(teacher).__name__}"
        )
    elif dtype is not None:
        teacher = teacher.to(dtype)
    teacher.requires_grad_(False)
    return teacher.eval()


def check_vocabularies(student: nn.Module, teacher: nn.Module, vocab_policy: str) -> None:
    """With ``vocab_policy="error"``, differing LM-head sizes fail here, before the first step."""
    if vocab_policy != "error":
        return
    sizes = []
    for model in (student, teacher):
        head = unwrap_causal_lm(model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return  # no LM head to compare: the loss reports a mismatch at the first batch
        sizes.append(weight.shape[0])
    if sizes[0] != sizes[1]:
        raise VocabMismatchError(
            f"student vocabulary has {sizes[0]} entries but teacher vocabulary has {sizes[1]}; if the two "
            "tokenizers differ, set cross_tokenizer='uld' or 'align' (batches with the teacher's own tokenization), "
            "or vocab_policy='truncate' or 'pad' if token ids agree on the shared part"
        )


def check_one_tokenization(inputs: Mapping[str, Any]) -> None:
    """A batch whose teacher tokenization has other positions than the student's needs ``cross_tokenizer``."""
    teacher_inputs = inputs.get("teacher")
    if not isinstance(teacher_inputs, Mapping):
        return
    teacher_ids, student_ids = teacher_inputs.get("input_ids"), inputs.get("input_ids")
    if (
        isinstance(teacher_ids, torch.Tensor)
        and isinstance(student_ids, torch.Tensor)
        and teacher_ids.shape != student_ids.shape
    ):
        raise VocabMismatchError(
            f"the batch holds the teacher's own tokenization ({tuple(teacher_ids.shape)} ids against the student's "
            f"{tuple(student_ids.shape)}): teacher and student tokenize differently; set cross_tokenizer='uld' or "
            "'align'"
        )


def default_collator(model: nn.Module, processing_class: Any, *, with_prompts: bool) -> SFTCollator:
    """:class:`kdistill.data.sft_collate.SFTCollator` with the tokenizer's (or the model's) pad id."""
    pad_id: int | None = getattr(processing_class, "pad_token_id", None)
    if not isinstance(pad_id, int):
        config = getattr(unwrap_causal_lm(model), "config", None)
        pad_id = getattr(config, "pad_token_id", None)
        if not isinstance(pad_id, int):
            eos = getattr(config, "eos_token_id", None)
            pad_id = eos if isinstance(eos, int) else 0
    return SFTCollator(pad_token_id=pad_id, with_prompts=with_prompts)
