"""``kdistill cache RUN.yaml``: run the run's teacher once over its training data and keep its top-k outputs on disk.

When the run has intermediate matches (``distill.layer_map`` / ``distill.matches``) on the teacher's hidden states
or embeddings, the cache also keeps those features at every attended position, so the run needs no teacher at all;
attention-map and logits matches are refused (see :func:`kdistill.runs.cache_checks.cached_feature_specs`).

The cache is keyed by what shapes the teacher's outputs (teacher, tokenizer, data, k, dtype, temperature, features): a
second call with the same run resumes from the last complete shard, and a call with another setting is refused,
naming the field. Under ``accelerate launch`` (or any launcher that sets ``RANK`` and ``WORLD_SIZE``) each process
writes its own shards of the same cache.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from kdistill._io import check_dir_target
from kdistill.cache import build_manifest, dataset_fingerprint, tokenizer_hash, write_cache
from kdistill.config import load_config
from kdistill.errors import InvalidArgumentError
from kdistill.runs.cache_checks import cached_feature_specs
from kdistill.runs.parts import build_objective, build_parts
from kdistill.tasks.base import predict_logits


def _worker() -> tuple[int, int]:
    """This process's rank and the number of processes (1 process when no launcher set them)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InvalidArgumentError("RANK and WORLD_SIZE must be integers when set") from None


def cmd_cache(args: argparse.Namespace) -> int:
    """``kdistill cache``: ``args`` has the run's ``config`` and ``overrides``, ``out``, ``k``, ``dtype``,
    ``batch_size`` and ``shard_size``; returns the exit code (0). Refuses, before any work, what cannot be cached."""
    config = load_config(args.config, args.overrides)
    check_dir_target(args.out, "--out")
    if config.teacher is None:
        raise InvalidArgumentError("the run has no teacher section: there is nothing to cache")
    if not config.teacher.is_model:  # teacher: ema | self
        raise InvalidArgumentError(
            f"teacher: {config.teacher.kind} is the student itself, which changes as it trains: there is nothing to "
            "cache"
        )
    if config.distill.cross_tokenizer is not None:
        raise InvalidArgumentError(
            f"distill.cross_tokenizer={config.distill.cross_tokenizer!r}: a teacher with its own tokenization cannot "
            "be cached (the cache lays its outputs on the student's positions); train with the live teacher"
        )
    if not isinstance(config.distill.temperature, (int, float)):
        raise InvalidArgumentError("distill.temperature must be a number to cache the teacher's outputs at it")
    if args.batch_size < 1 or args.shard_size < 1:
        raise InvalidArgumentError(
            f"--batch-size and --shard-size must be >= 1, got {args.batch_size} and {args.shard_size}"
        )
    started = time.perf_counter()
    parts = build_parts(config.model_copy(update={"mode": "distill"}))
    features = cached_feature_specs(build_objective(config, parts))  # refuses uncacheable matches before any work
    teacher = parts.task.adapt_teacher(
        parts.teacher, tokenizer=parts.student_tokenizer, teacher_tokenizer=parts.teacher_tokenizer
    )
    view = parts.task.view
    probe = parts.collate(parts.train_examples[:1])
    vocab = int(predict_logits(teacher, [probe], view, inputs="teacher")[0][0].shape[-1])
    k = vocab if args.k == "all" else _positive_int(args.k, "--k")
    if k > vocab:
        raise InvalidArgumentError(f"--k {k} is larger than the teacher's {vocab} outputs; use --k all")
    manifest = build_manifest(
        teacher=config.teacher.path,
        teacher_revision=None,
        tokenizer_hash=tokenizer_hash(parts.teacher_tokenizer),
        dataset_fingerprint=dataset_fingerprint(parts.train_examples),
        k=k,
        dtype=args.dtype,
        temperature=float(config.distill.temperature),
        num_examples=len(parts.train_examples),
        vocab_size=vocab,
        shard_size=args.shard_size,
        features=features,
    )
    worker, workers = _worker()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else None
    write_cache(
        Path(args.out),
        teacher,
        parts.train_examples,
        parts.collate,
        view,
        manifest,
        batch_size=args.batch_size,
        worker=worker,
        num_workers=workers,
        device=device,
    )
    print(
        f"cache {args.out}: {len(parts.train_examples)} examples, k={k} of {vocab}, {args.dtype}, "
        f"{'features ' + ', '.join(features) + ', ' if features else ''}"
        f"worker {worker + 1} of {workers}, {time.perf_counter() - started:.0f} s"
    )
    return 0


def _positive_int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgumentError(f"{name} must be a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer or 'all', got {value}")
    return value
