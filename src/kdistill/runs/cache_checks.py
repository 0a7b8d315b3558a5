"""A run that reads its teacher's outputs from a cache (``distill.teacher_cache``) instead of running the teacher.

The cache must have been written by ``kdistill cache`` for this run: the same teacher, teacher tokenizer, training
examples (in order), temperature, and the teacher features its intermediate matches need (``layer_map`` /
``matches`` on hidden states or embeddings: the manifest's ``features``). Anything else is refused, naming the
manifest field that differs, before any training starts. Attention-map and logits matches cannot be cached: an
attention map is heads × T × T floats per example, far more than the outputs the cache exists to keep small.
"""

from __future__ import annotations

from typing import Any

from kdistill.cache import (
    CachedTeacherCollate,
    CacheIncompleteError,
    CacheReader,
    build_manifest,
    dataset_fingerprint,
    tokenizer_hash,
    with_cache_index,
)
from kdistill.config import RunConfig
from kdistill.core.views import SequenceView, TokenView
from kdistill.distillers import Distiller, Objective
from kdistill.errors import InvalidArgumentError
from kdistill.runs.parts import RunParts
from kdistill.tasks.causal_lm import CausalLMView


def cached_feature_specs(objective: Objective) -> list[str]:
    """The teacher feature specs a cache must hold for ``objective``'s matches, in order of first use.

    Matches on ``hidden`` or ``embeddings`` features of the (one) teacher are cacheable: one ``(T, H)`` tensor per
    example. Attention maps and logits matches are refused, naming the match.
    """
    specs: list[str] = []
    for match in objective.matches:
        if match.feature == "attention":
            raise InvalidArgumentError(
                f"match {match.name!r}: attention maps cannot be cached (heads × T × T floats per example); "
                "drop the match or train with the live teacher"
            )
        if match.feature == "logits":
            raise InvalidArgumentError(
                f"match {match.name!r}: logits matches cannot be cached (the cache keeps the top-k outputs for the "
                "KD term); use the KD term or train with the live teacher"
            )
        if match.teacher_index != 0:
            raise InvalidArgumentError(
                f"match {match.name!r} names teacher {match.teacher_index}; a cache holds one teacher's features"
            )
        if match.teacher not in specs:
            specs.append(match.teacher)
    return specs


def open_run_cache(config: RunConfig, parts: RunParts, *, features: list[str] | tuple[str, ...] = ()) -> CacheReader:
    """The :class:`~kdistill.cache.CacheReader` of ``config.distill.teacher_cache``, checked against the run.

    The manifest the run would write (its teacher, teacher tokenizer, training examples in order, temperature and
    the teacher ``features`` its matches need, with the format and kdistill versions) must equal the cache's, field
    for field; ``k``, the dtype, the vocabulary size, the shard size and the heads are the cache's own choices. A
    difference raises :class:`~kdistill.cache.CacheMismatchError` naming the field, and a cache with missing shards
    :class:`~kdistill.cache.CacheIncompleteError`, before anything of the run is written. The engine's cached runs
    and the causal-LM runs (the Trainer path) both check their cache here.
    """
    spec = config.distill
    reader = CacheReader(spec.teacher_cache)
    if not reader.is_complete():
        raise CacheIncompleteError(
            f"distill.teacher_cache: the cache at {spec.teacher_cache} is missing shards; rerun kdistill cache"
        )
    found = reader.manifest
    expected = build_manifest(
        teacher=config.teacher.path if config.teacher is not None else found["teacher"],
        teacher_revision=found["teacher_revision"],
        tokenizer_hash=tokenizer_hash(parts.teacher_tokenizer) if parts.teacher_tokenizer else found["tokenizer_hash"],
        dataset_fingerprint=dataset_fingerprint(parts.train_examples),
        k=int(found["k"]),
        dtype=found["dtype"],
        temperature=float(spec.temperature),
        num_examples=len(parts.train_examples),
        vocab_size=int(found["vocab_size"]),
        shard_size=int(found["shard_size"]),
        num_heads=int(found["num_heads"]),
        features=list(features),
    )
    reader.check_against(expected)
    return reader


def cached_teacher_parts(
    config: RunConfig, parts: RunParts, objective: Objective
) -> tuple[Distiller, list[dict[str, Any]], CachedTeacherCollate]:
    """``(distiller, training examples, collate)`` for a run reading ``config.distill.teacher_cache``."""
    spec = config.distill
    specs = cached_feature_specs(objective)
    if parts.extra_teachers:
        raise InvalidArgumentError("distill.teacher_cache replaces one teacher; extra_teachers cannot be cached")
    if getattr(spec, "cross_tokenizer", None) is not None:
        raise InvalidArgumentError(
            f"distill.cross_tokenizer={spec.cross_tokenizer!r} cannot be used with distill.teacher_cache: the cache "
            "lays the teacher's outputs on the student's positions, which a teacher with its own tokenization does "
            "not have; train with the live teacher"
        )
    if not isinstance(spec.temperature, (int, float)):
        raise InvalidArgumentError("distill.temperature must be a number with distill.teacher_cache (no schedule)")
    view = parts.task.view
    if not isinstance(view, (SequenceView, TokenView, CausalLMView)):
        raise InvalidArgumentError(f"distill.teacher_cache is not available for the {parts.task.name!r} task")
    reader = open_run_cache(config, parts, features=specs)
    collate = CachedTeacherCollate(
        parts.collate,
        reader,
        per_token=not isinstance(view, SequenceView),
        leftover_policy=spec.cache_leftover,
        features={match.name: specs.index(match.teacher) for match in objective.matches},
    )
    distiller = Distiller(parts.student, None, objective, view=view)
    return distiller, with_cache_index(parts.train_examples), collate
