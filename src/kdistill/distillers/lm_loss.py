"""The token-level causal-LM distillation loss, as sums over counted next-token positions (plain or chunked).

:func:`causal_lm_loss_sums` returns *sums* and a *count*, not means: the caller (the Hugging Face integration, the
engine) divides by the global count of counted positions over all micro-batches and processes, which is what makes
gradient accumulation and data parallelism exact. Positions are counted with
:func:`kdistill.core.shift.counted_next_tokens`: the logits at ``t`` predict ``labels[t + 1]``.

Two paths compute the same numbers:

* plain: the student's and teacher's full logits ``(B, T, V)`` and the divergence on them;
* chunked: the final hidden states of both models and their LM-head weights through
  :func:`~kdistill.losses.chunked_divergence`, so that no ``(N, V)`` logits tensor exists, for the KD term and for
  the cross-entropy term (``chunk_size`` rows at a time, its gradients computed in the forward pass).

Only torch is imported here; models are duck-typed Hugging Face causal LMs (``PreTrainedModel``, ``PeftModel``, or
either wrapped by DDP); :mod:`kdistill.distillers.lm_heads` finds their LM heads and final hidden states, and
:mod:`kdistill.distillers.lm_cached` reads the teacher from a cache instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill.core.shift import IGNORE_INDEX, counted_next_tokens, next_token_labels
from kdistill.distillers.kd_terms import ChunkedKD, DenseKD, HeadStates, KDStrategy, Logits
from kdistill.distillers.lm_heads import (
    causal_lm_logits,
    eval_teacher,
    final_hidden_states,
    lm_head_of,
    scaled_head,
)
from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.losses import token_cross_entropy
from kdistill.losses._common import VOCAB_POLICIES
from kdistill.losses.chunked import chunked_token_cross_entropy


@dataclass
class LMLossSums:
    """What :func:`causal_lm_loss_sums` computed for one batch.

    Attributes:
        kd_sum: 0-d tensor, the divergence summed over counted positions (no T², no weight); None when
            ``kd_weight == 0``.
        hard_sum: 0-d tensor, the student's next-token cross-entropy summed over counted positions; None when
            ``hard_weight == 0``.
        count: the number of counted next-token positions in the batch.
        student_logits: the student's logits ``(B, T, V_s)`` on the plain path (with grad); None on the chunked one.
    """

    kd_sum: torch.Tensor | None
    hard_sum: torch.Tensor | None
    count: int
    student_logits: torch.Tensor | None = None


# ---------------------------------------------------------------- the loss


def causal_lm_loss_sums(
    student: nn.Module,
    teacher: nn.Module | None,
    inputs: Mapping[str, Any],
    *,
    divergence: str | Callable[..., torch.Tensor] = "forward_kl",
    temperature: float | torch.Tensor = 1.0,
    kd_weight: float = 1.0,
    hard_weight: float = 0.0,
    vocab_policy: str = "error",
    chunked: bool = False,
    chunk_size: int = 1024,
    teacher_inputs: Mapping[str, Any] | None = None,
    kd_kwargs: Mapping[str, Any] | None = None,
    teacher_outputs: torch.Tensor | None = None,
    strategy: KDStrategy | None = None,
) -> LMLossSums:
    """The KD and CE terms of token-level causal-LM distillation, summed over counted next-token positions.

    Counted positions are ``counted_next_tokens(inputs["labels"])``: the logits at ``t`` count when
    ``labels[t + 1] != -100``. The teacher runs under ``torch.no_grad()`` in eval mode. The divergence divides both
    logits by ``temperature``; no T² factor is applied here (the caller does, if it wants to). The weights only
    decide which terms are computed (a zero weight skips its term, and ``kd_weight == 0`` skips the teacher).

    Args:
        student: the student causal LM (its parameters get gradients).
        teacher: the teacher causal LM; may be None when ``teacher_outputs`` is given on the plain path or
            ``kd_weight == 0``.
        inputs: ``input_ids``, ``attention_mask`` and ``labels`` ``(B, T)`` (``-100`` = not learned).
        divergence: a divergence registered in :data:`~kdistill.losses.LOSSES` (or a callable with that contract).
        temperature: softmax temperature of the divergence (> 0).
        kd_weight: a zero skips the KD term (``kd_sum`` is None).
        hard_weight: a zero skips the CE term (``hard_sum`` is None).
        vocab_policy: ``"error"``, ``"truncate"`` or ``"pad"`` when the vocabularies differ.
        chunked: compute from final hidden states and LM heads ``chunk_size`` positions at a time (no ``(N, V)``
            logits; ``student_logits`` is then None).
        chunk_size: positions per chunk on the chunked path.
        teacher_inputs: the teacher's own ``input_ids``/``attention_mask`` when they differ from the student's; they
            must have the same ``(B, T)`` positions.
        kd_kwargs: extra arguments of the divergence, e.g. ``{"beta": 0.5}`` or ``{"skew": 0.1}``.
        teacher_outputs: precomputed teacher results, used instead of running the teacher: its logits
            ``(B, T, V_t)`` on the plain path, its final hidden states ``(B, T, H_t)`` on the chunked path (the
            teacher's LM head is still taken from ``teacher``).
        strategy: the KD strategy (:mod:`kdistill.distillers.kd_terms`); by default :class:`DenseKD` on the plain
            path and :class:`ChunkedKD` on the chunked one, built from ``divergence``, ``kd_kwargs``,
            ``vocab_policy`` and ``chunk_size``.

    Returns:
        An :class:`LMLossSums`.

    Raises:
        InvalidArgumentError: missing labels, a bad option, or a model the chunked path cannot handle.
        ShapeMismatchError: labels or teacher inputs/outputs of the wrong shape.
        VocabMismatchError: differing vocabularies with ``vocab_policy="error"`` (the message names both sizes).
    """
    labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise InvalidArgumentError(
            "inputs must carry 'labels' of shape (batch, sequence) with -100 where nothing is learned"
        )
    input_ids = inputs.get("input_ids")
    if isinstance(input_ids, torch.Tensor) and input_ids.shape != labels.shape:
        raise ShapeMismatchError(
            f"labels have shape {tuple(labels.shape)} but input_ids {tuple(input_ids.shape)}; they must agree"
        )
    if vocab_policy not in VOCAB_POLICIES:
        raise InvalidArgumentError(
            f"vocab_policy={vocab_policy!r} is not one of {', '.join(map(repr, VOCAB_POLICIES))}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be a positive int, got {chunk_size!r}")
    want_kd, want_hard = kd_weight != 0, hard_weight != 0
    if want_kd and teacher is None and (chunked or teacher_outputs is None):
        raise InvalidArgumentError("teacher is None but the KD term (kd_weight != 0) needs a teacher")
    if teacher_inputs is not None:
        teacher_ids = teacher_inputs.get("input_ids")
        if isinstance(teacher_ids, torch.Tensor) and teacher_ids.shape != labels.shape:
            raise ShapeMismatchError(
                f"teacher_inputs['input_ids'] has shape {tuple(teacher_ids.shape)} but the student's labels "
                f"{tuple(labels.shape)}; teacher and student must see the same positions"
            )
    teacher_inputs = inputs if teacher_inputs is None else teacher_inputs
    mask = counted_next_tokens(labels)  # (B, T)
    targets = next_token_labels(labels)  # (B, T)
    count = int(mask.sum())
    kwargs = dict(kd_kwargs or {})
    if chunked:
        strategy = strategy or ChunkedKD(divergence, kwargs, chunk_size=chunk_size, vocab_policy=vocab_policy)
        return _chunked_sums(
            student, teacher, inputs, teacher_inputs, mask, targets, count, temperature, chunk_size, strategy,
            teacher_outputs, want_kd, want_hard,
        )  # fmt: skip
    strategy = strategy or DenseKD(divergence, {**kwargs, "vocab_policy": vocab_policy})

    student_logits = causal_lm_logits(student, inputs)  # (B, T, V_s)
    kd_sum = hard_sum = None
    if want_kd:
        if teacher_outputs is None:
            assert teacher is not None
            eval_teacher(teacher)
            with torch.no_grad():
                teacher_logits = causal_lm_logits(teacher, teacher_inputs)  # (B, T, V_t)
        else:
            teacher_logits = teacher_outputs.detach()
        kd_sum = strategy.values(Logits(student_logits), Logits(teacher_logits), mask, temperature, inputs).sum()
    if want_hard:
        hard_sum = token_cross_entropy(student_logits, targets, reduction="sum")
    return LMLossSums(kd_sum=kd_sum, hard_sum=hard_sum, count=count, student_logits=student_logits)


def _chunked_sums(
    student: nn.Module,
    teacher: nn.Module | None,
    inputs: Mapping[str, Any],
    teacher_inputs: Mapping[str, Any],
    mask: torch.Tensor,
    targets: torch.Tensor,
    count: int,
    temperature: float | torch.Tensor,
    chunk_size: int,
    strategy: KDStrategy,
    teacher_outputs: torch.Tensor | None,
    want_kd: bool,
    want_hard: bool,
) -> LMLossSums:
    student_head = lm_head_of(student)
    student_hidden, student_weight, student_bias = scaled_head(student_head, final_hidden_states(student, inputs))
    kd_sum = hard_sum = None
    if want_kd:
        assert teacher is not None
        teacher_head = lm_head_of(teacher)
        if teacher_outputs is None:
            eval_teacher(teacher)
            with torch.no_grad():
                teacher_hidden = final_hidden_states(teacher, teacher_inputs)  # (B, T, H_t)
        else:
            teacher_hidden = teacher_outputs.detach()
        teacher_side = HeadStates(*scaled_head(teacher_head, teacher_hidden))
        student_side = HeadStates(student_hidden, student_weight, student_bias)
        kd_sum = strategy.values(student_side, teacher_side, mask, temperature, inputs)
    if want_hard:
        hard_sum = chunked_cross_entropy(
            student_hidden, student_weight, targets, bias=student_bias, chunk_size=chunk_size
        )
    return LMLossSums(kd_sum=kd_sum, hard_sum=hard_sum, count=count, student_logits=None)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``token_cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")`` without the ``(N, V)`` logits.

    The counted rows (``targets != -100``) are taken ``chunk_size`` at a time by
    :func:`~kdistill.losses.chunked.chunked_token_cross_entropy`, which computes each chunk's logits once and
    its gradients in the same pass (the backward pass only scales them).

    Args:
        hidden: ``(..., H)`` final hidden states (logit scale already folded in).
        weight: ``(V, H)`` LM-head weight.
        targets: ``(...)`` next-token targets, ``-100`` where not counted (already shifted).
        bias: optional ``(V,)``.
        chunk_size: rows per chunk.
    """
    if targets.shape != hidden.shape[:-1]:
        raise ShapeMismatchError(
            f"targets have shape {tuple(targets.shape)} but hidden states {tuple(hidden.shape)} need "
            f"{tuple(hidden.shape[:-1])}"
        )
    flat_targets = targets.reshape(-1)
    counted = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)  # (n_counted,)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, counted)  # (n_counted, H)
    row_targets = flat_targets.index_select(0, counted)  # (n_counted,)
    return chunked_token_cross_entropy(rows, weight, row_targets, bias, chunk_size=chunk_size)
