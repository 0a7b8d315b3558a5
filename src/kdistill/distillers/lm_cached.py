"""The causal-LM distillation loss with the teacher read from a cache: its top-k log-probabilities per position.

:func:`cached_lm_loss_sums` is :func:`kdistill.distillers.lm_loss.causal_lm_loss_sums` with the teacher's outputs
taken from what :class:`kdistill.cache.batches.CachedTeacherCollate` adds to a batch; the plain path calls
:func:`~kdistill.losses.sparse.sparse_divergence` on the student's logits, the chunked one
(:func:`~kdistill.distillers.kd_terms.chunked_sparse_divergence`) computes the student's logits at the cached ids
only, chunk by chunk; both are :class:`~kdistill.distillers.kd_terms.TopKKD`, the strategy the engine uses too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from kdistill.core.shift import counted_next_tokens, next_token_labels
from kdistill.distillers.kd_terms import HeadStates, KDStrategy, Logits, TopK, TopKKD
from kdistill.distillers.lm_heads import (
    causal_lm_logits,
    final_hidden_states,
    lm_head_of,
    scaled_head,
)
from kdistill.distillers.lm_loss import LMLossSums, chunked_cross_entropy
from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.losses import token_cross_entropy
from kdistill.losses.sparse import LEFTOVER_POLICIES


def cached_lm_loss_sums(
    student: nn.Module,
    inputs: Mapping[str, Any],
    teacher_topk: Mapping[str, Any],
    *,
    divergence: str | Callable[..., torch.Tensor] = "forward_kl",
    temperature: float = 1.0,
    leftover_policy: str = "renormalize",
    kd_weight: float = 1.0,
    hard_weight: float = 0.0,
    chunked: bool = False,
    chunk_size: int = 1024,
    kd_kwargs: Mapping[str, Any] | None = None,
    strategy: KDStrategy | None = None,
) -> LMLossSums:
    """:func:`causal_lm_loss_sums` with the teacher read from a cache: its top-k log-probabilities per position.

    ``teacher_topk`` is what :class:`kdistill.cache.batches.CachedTeacherCollate` adds to a batch: ``heads`` (one for a
    causal LM) of ``ids`` / ``logprobs`` ``(B, T, k)``, ``leftover`` and ``mask`` ``(B, T)``, and the cache's
    ``temperature``. The KD term is :func:`kdistill.losses.sparse.sparse_divergence` over the counted next-token
    positions, and those positions must be exactly the ones the cache holds: the cache was written through
    :class:`~kdistill.tasks.causal_lm.CausalLMView`, whose ``kd_mask`` is :func:`counted_next_tokens` of the same
    labels, so any difference means the cache belongs to other data or another ``max_length``, and is refused.
    The CE term and the count are those of the live path, so the caller normalizes both paths alike.

    On the chunked path the student's logits are never built: with ``leftover_policy="renormalize"`` only the
    student's logits at the chunk's cached ids are computed (``hidden @ weight[ids].T``; renormalizing over the k
    ids cancels the logsumexp over V), with ``"uniform"`` one chunk's ``(chunk, V)`` logits at a time (the
    leftover mass is spread over every other id, so the whole row takes part). Each chunk runs under activation
    checkpointing, like :func:`chunked_cross_entropy`.

    Args:
        student: the student causal LM.
        inputs: ``input_ids``, ``attention_mask`` and ``labels`` ``(B, T)``.
        teacher_topk: the batch's cached teacher outputs (see above).
        divergence: a registered divergence name or a callable with the divergence contract.
        temperature: the student's temperature; it must equal the cache's (its log-probabilities are at it).
        leftover_policy: ``"renormalize"`` or ``"uniform"`` (see :mod:`kdistill.losses.sparse`).
        kd_weight, hard_weight: a zero skips its term.
        chunked, chunk_size: as in :func:`causal_lm_loss_sums`.
        kd_kwargs: extra arguments of the divergence (``beta``, ``skew``).
        strategy: the KD strategy (default: :class:`~kdistill.distillers.kd_terms.TopKKD` of ``divergence``,
            ``kd_kwargs`` and ``chunk_size``).

    Raises:
        InvalidArgumentError: a temperature other than the cache's, a malformed ``teacher_topk``, cached ids outside
            the student's vocabulary, or a model the chunked path cannot handle.
        ShapeMismatchError: cached positions that are not the batch's counted next-token positions (the message
            names both counts and shapes).
    """
    labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise InvalidArgumentError(
            "inputs must carry 'labels' of shape (batch, sequence) with -100 where nothing is learned"
        )
    if leftover_policy not in LEFTOVER_POLICIES:
        raise InvalidArgumentError(
            f"leftover_policy={leftover_policy!r} is not one of {', '.join(map(repr, LEFTOVER_POLICIES))}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if "teacher" in inputs:
        raise InvalidArgumentError(
            "the batch has both cached teacher outputs and a separate teacher tokenization ('teacher'); a cache "
            "holds ids of the student's own vocabulary, so teacher and student must share one tokenizer"
        )
    mask = counted_next_tokens(labels)  # (B, T)
    targets = next_token_labels(labels)  # (B, T)
    count = int(mask.sum())
    want_kd, want_hard = kd_weight != 0, hard_weight != 0
    head = _cached_head(teacher_topk, mask, temperature) if want_kd else None
    strategy = strategy or TopKKD(divergence, kd_kwargs, chunk_size=chunk_size)
    topk = None
    if head is not None:
        topk = TopK(head["ids"], head["logprobs"], head.get("leftover"), temperature, leftover_policy)
    kd_sum = hard_sum = None
    if not chunked:
        student_logits = causal_lm_logits(student, inputs)  # (B, T, V)
        if topk is not None:
            _check_cached_ids(topk.ids, mask, student_logits.shape[-1])
            kd_sum = strategy.values(Logits(student_logits), topk, mask, temperature, inputs)
        if want_hard:
            hard_sum = token_cross_entropy(student_logits, targets, reduction="sum")
        return LMLossSums(kd_sum=kd_sum, hard_sum=hard_sum, count=count, student_logits=student_logits)

    student_side = HeadStates(*scaled_head(lm_head_of(student), final_hidden_states(student, inputs)))
    if topk is not None:
        _check_cached_ids(topk.ids, mask, student_side.weight.shape[0])
        kd_sum = strategy.values(student_side, topk, mask, temperature, inputs)
    if want_hard:
        hard_sum = chunked_cross_entropy(
            student_side.hidden, student_side.weight, targets, bias=student_side.bias, chunk_size=chunk_size
        )
    return LMLossSums(kd_sum=kd_sum, hard_sum=hard_sum, count=count, student_logits=None)


def _cached_head(teacher_topk: Mapping[str, Any], mask: torch.Tensor, temperature: float) -> dict[str, Any]:
    """The one head of a causal LM's cached outputs, checked against the batch's counted positions."""
    heads = teacher_topk.get("heads") if isinstance(teacher_topk, Mapping) else None
    if not isinstance(heads, (list, tuple)) or len(heads) != 1 or not isinstance(heads[0], Mapping):
        found = len(heads) if isinstance(heads, (list, tuple)) else type(heads).__name__
        raise InvalidArgumentError(
            f"teacher_topk must hold 'heads': a list of one dict (a causal LM has one head), got {found}"
        )
    head = heads[0]
    for key in ("ids", "logprobs", "mask"):
        if not isinstance(head.get(key), torch.Tensor):
            raise InvalidArgumentError(f"teacher_topk head 0 has no tensor {key!r}")
    cached_temperature = teacher_topk.get("temperature")
    if cached_temperature is not None and not math.isclose(float(cached_temperature), float(temperature)):
        raise InvalidArgumentError(
            f"the cache's temperature is {float(cached_temperature)!r} but the loss uses temperature="
            f"{float(temperature)!r}; the cached log-probabilities are at the cache's temperature only"
        )
    cached_mask = head["mask"].to(device=mask.device, dtype=torch.bool)
    if cached_mask.shape != mask.shape or head["ids"].shape[:-1] != mask.shape:
        raise ShapeMismatchError(
            f"the cached teacher outputs cover positions of shape {tuple(cached_mask.shape)} (ids "
            f"{tuple(head['ids'].shape)}) but the batch's labels have shape {tuple(mask.shape)}"
        )
    if not torch.equal(cached_mask, mask):
        where = (cached_mask != mask).nonzero()[0].tolist()
        raise ShapeMismatchError(
            f"the cache holds {int(cached_mask.sum())} positions of this batch but its labels count {int(mask.sum())} "
            f"next-token positions (first difference at row {where[0]}, position {where[1]}); was the cache written "
            "with other data, labels or max_length?"
        )
    return dict(head)


def _check_cached_ids(ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> None:
    """Cached ids on counted positions must be ids of the student's vocabulary (``0..V-1``)."""
    counted = ids[mask.to(ids.device)]
    if counted.numel() and int(counted.max()) >= vocab:
        raise InvalidArgumentError(
            f"the cache holds teacher id {int(counted.max())} but the student's vocabulary has {vocab} entries; "
            "the cache must come from a teacher with the student's tokenizer"
        )
