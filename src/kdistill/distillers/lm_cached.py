"""The causal-LM distillation loss with the teacher read from a cache: its top-k log-probabilities per position.

:func:`cached_lm_loss_sums` is :func:`kdistill.distillers.lm_loss.causal_lm_loss_sums` with the teacher's outputs
taken from what :class:`kdistill.cache.batches.CachedTeacherCollate` adds to a batch; the plain path calls
:func:`~kdistill.losses.sparse.sparse_divergence` on the student's logits, the chunked one
(:func:`chunked_sparse_divergence`) computes the student's logits at the cached ids only, chunk by chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kdistill.core.shift import counted_next_tokens, next_token_labels
from kdistill.distillers.lm_heads import (
    causal_lm_logits,
    final_hidden_states,
    lm_head_of,
    scaled_head,
)
from kdistill.distillers.lm_loss import LMLossSums, chunked_cross_entropy
from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.losses import token_cross_entropy
from kdistill.losses.chunked import _resolve_divergence as resolve_divergence
from kdistill.losses.sparse import LEFTOVER_POLICIES, sparse_divergence


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
    kwargs = dict(kd_kwargs or {})
    fn = resolve_divergence(divergence)
    if not chunked:
        student_logits = causal_lm_logits(student, inputs)  # (B, T, V)
        kd_sum = hard_sum = None
        if head is not None:
            _check_cached_ids(head["ids"], mask, student_logits.shape[-1])
            kd_sum = sparse_divergence(
                student_logits, head["ids"], head["logprobs"], head.get("leftover"), mask, divergence=fn,
                temperature=temperature, leftover_policy=leftover_policy, reduction="sum", **kwargs,
            )  # fmt: skip
        if want_hard:
            hard_sum = token_cross_entropy(student_logits, targets, reduction="sum")
        return LMLossSums(kd_sum=kd_sum, hard_sum=hard_sum, count=count, student_logits=student_logits)

    student_head = lm_head_of(student)
    hidden, weight, bias = scaled_head(student_head, final_hidden_states(student, inputs))
    kd_sum = hard_sum = None
    if head is not None:
        _check_cached_ids(head["ids"], mask, weight.shape[0])
        kd_sum = chunked_sparse_divergence(
            hidden, weight, head["ids"], head["logprobs"], head.get("leftover"), mask, bias=bias, divergence=fn,
            temperature=temperature, leftover_policy=leftover_policy, chunk_size=chunk_size, **kwargs,
        )  # fmt: skip
    if want_hard:
        hard_sum = chunked_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk_size)
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


def chunked_sparse_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    leftover: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    divergence: str | Callable[..., torch.Tensor] = "forward_kl",
    temperature: float = 1.0,
    leftover_policy: str = "renormalize",
    chunk_size: int = 1024,
    **kd_kwargs: Any,
) -> torch.Tensor:
    """``sparse_divergence(hidden @ weight.T + bias, ..., reduction="sum")`` without the ``(N, V)`` logits.

    The counted rows are taken ``chunk_size`` at a time. With ``"renormalize"`` a chunk computes the logits of the
    distinct ids its rows hold (at most ``chunk × k``, never more than V) and gathers each row's k of them, then
    calls :func:`~kdistill.losses.sparse.sparse_divergence` on those ``(chunk, k)`` logits with the identity ids
    ``0..k-1``, so the divergence keeps its one definition. With ``"uniform"`` a chunk's full ``(chunk, V)`` logits
    go to ``sparse_divergence`` with the cached ids. Each chunk runs under activation checkpointing: the backward
    pass recomputes one chunk's logits at a time.

    Args:
        hidden: ``(..., H)`` final hidden states (logit scale already folded in).
        weight: ``(V, H)`` LM-head weight; ``bias``: optional ``(V,)``.
        topk_ids, topk_logprobs: ``(..., k)`` cached ids and log-probabilities; ``leftover``: ``(...)`` or None.
        mask: bool ``(...)``, True = counted.
        temperature: a number (the cache's temperature).
    """
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        raise InvalidArgumentError("the chunked cached loss takes one temperature (a number), not one per position")
    lead = hidden.shape[:-1]
    if mask.shape != lead or topk_ids.shape[:-1] != lead or topk_logprobs.shape != topk_ids.shape:
        raise ShapeMismatchError(
            f"hidden states {tuple(hidden.shape)}, mask {tuple(mask.shape)}, cached ids {tuple(topk_ids.shape)} and "
            f"log-probabilities {tuple(topk_logprobs.shape)} must share their leading shape"
        )
    k = topk_ids.shape[-1]
    counted = mask.reshape(-1).nonzero().squeeze(1)  # (n,)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, counted)  # (n, H)
    ids = topk_ids.reshape(-1, k).index_select(0, counted.to(topk_ids.device)).to(rows.device).long()  # (n, k)
    logprobs = topk_logprobs.reshape(-1, k).index_select(0, counted.to(topk_logprobs.device)).to(rows.device)
    rest = None
    if leftover is not None:
        rest = leftover.reshape(-1).index_select(0, counted.to(leftover.device)).to(rows.device)  # (n,)
    options = dict(divergence=divergence, temperature=temperature, leftover_policy=leftover_policy, **kd_kwargs)

    def chunk_sum(
        chunk_rows: torch.Tensor,
        head_weight: torch.Tensor,
        head_bias: torch.Tensor | None,
        chunk_ids: torch.Tensor,
        chunk_logprobs: torch.Tensor,
        chunk_rest: torch.Tensor | None,
    ) -> torch.Tensor:
        if leftover_policy == "renormalize":
            distinct, inverse = torch.unique(chunk_ids, return_inverse=True)  # (u,), (chunk, k)
            sub_weight = head_weight.index_select(0, distinct)  # (u, H)
            logits = chunk_rows @ sub_weight.t()  # (chunk, u)
            if head_bias is not None:
                logits = logits + head_bias.index_select(0, distinct)
            gathered = logits.gather(-1, inverse)  # (chunk, k): the student's logits at the cached ids
            identity = torch.arange(k, device=gathered.device).expand_as(inverse)
            return sparse_divergence(gathered, identity, chunk_logprobs, None, reduction="sum", **options)
        logits = (
            chunk_rows @ head_weight.t() if head_bias is None else torch.addmm(head_bias, chunk_rows, head_weight.t())
        )
        return sparse_divergence(logits, chunk_ids, chunk_logprobs, chunk_rest, reduction="sum", **options)

    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    total: torch.Tensor | None = None
    for start in range(0, max(rows.shape[0], 1), chunk_size):
        stop = start + chunk_size
        pieces = (rows[start:stop], weight, bias, ids[start:stop], logprobs[start:stop],
                  None if rest is None else rest[start:stop])  # fmt: skip
        part = checkpoint(chunk_sum, *pieces, use_reentrant=False) if track else chunk_sum(*pieces)
        total = part if total is None else total + part
    assert total is not None
    return total
