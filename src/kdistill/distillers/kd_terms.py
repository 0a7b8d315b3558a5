"""KD-term strategies: every way kdistill computes the knowledge-distillation term, behind one interface.

A strategy turns one micro-batch's student side and teacher side into the divergence *values* of the KD term,
declares the **unit** those values are summed over, and counts that unit in a batch before any forward pass:

================  =====================================================  ======================
strategy          student side → teacher side                            unit
================  =====================================================  ======================
``DenseKD``       :class:`Logits` → :class:`Logits`                      ``"logit_positions"``
``ChunkedKD``     :class:`HeadStates` → :class:`HeadStates` (no B×T×V)   ``"logit_positions"``
``TopKKD``        :class:`Logits` or :class:`HeadStates` → :class:`TopK`  ``"logit_positions"``
``MixtureKD``     :class:`Logits` → :class:`Ensemble` (several teachers)  ``"logit_positions"``
cross-tokenizer   :class:`Logits` → :class:`Logits` of another tokenizer  ``"aligned_pairs"``
================  =====================================================  ======================

(the cross-tokenizer strategies live beside their data formats: :class:`kdistill.distillers.cross.AlignedKD` for
token-level encoder tasks, :class:`kdistill.distillers.lm_cross.LMAlignedKD` for causal LMs.)

Both training backends use them the same way: :meth:`KDStrategy.count` for the step's global count of the unit
(before any forward), and :meth:`kdistill.distillers.objective.Objective.kd_from` for the term, which applies T²
(the one place) and sums; :func:`kdistill.distillers.objective.normalized_loss` divides by the count (the one
normalization). A strategy never applies T² and never divides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.checkpoint import checkpoint

from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.losses import chunked_divergence
from kdistill.losses.chunked import _resolve_divergence as resolve_divergence
from kdistill.losses.sparse import sparse_divergence

LOGIT_POSITIONS = "logit_positions"
Divergence = Callable[..., torch.Tensor]


# ---------------------------------------------------------------- the sides a strategy reads


@dataclass(frozen=True)
class Logits:
    """One head's logits ``(..., V)`` (the plain path)."""

    value: torch.Tensor


@dataclass(frozen=True)
class HeadStates:
    """Final hidden states ``(..., H)`` with the LM head that maps them to logits (logit scale folded in): the
    chunked path, where no ``(N, V)`` logits exist."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class TopK:
    """A teacher known by its cached top-k log-probabilities at ``temperature`` (``ids``/``logprobs`` ``(..., k)``,
    ``leftover`` ``(...)`` or None)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    leftover: torch.Tensor | None
    temperature: float
    leftover_policy: str = "renormalize"


@dataclass(frozen=True)
class Ensemble:
    """Several teachers' logits of one head, combined by fixed weights or per-example confidence in ``labels``."""

    logits: Sequence[torch.Tensor]
    weights: Sequence[float]
    combine: str = "fixed"
    labels: torch.Tensor | None = None


Side = Logits | HeadStates | TopK | Ensemble


class CountsPositions(Protocol):
    """What a strategy needs of a task's view: how many logit positions of a batch KD counts."""

    def count_logit_positions(self, batch: Mapping[str, Any]) -> int: ...


@runtime_checkable
class KDStrategy(Protocol):
    """One way of computing the KD term (see the module docstring)."""

    name: str
    unit: str

    def count(self, batch: Mapping[str, Any], view: CountsPositions) -> float:
        """The units of ``batch`` the term sums over, from its labels/masks alone (no forward)."""
        ...

    def values(
        self,
        student: Side,
        teacher: Side,
        mask: torch.Tensor | None,
        temperature: float | torch.Tensor,
        batch: Mapping[str, Any],
    ) -> torch.Tensor:
        """The divergence per unit (0 where nothing counts) or already summed (0-d); no T², no division."""
        ...


# ---------------------------------------------------------------- the strategies over one vocabulary


class _OneVocabulary:
    """Shared by the strategies whose unit is the view's counted logit positions."""

    unit = LOGIT_POSITIONS

    def __init__(self, divergence: str | Divergence = "forward_kl", kd_kwargs: Mapping[str, Any] | None = None):
        self.divergence = resolve_divergence(divergence)
        self.kd_kwargs = dict(kd_kwargs or {})

    def count(self, batch: Mapping[str, Any], view: CountsPositions) -> float:
        return float(view.count_logit_positions(batch))


class DenseKD(_OneVocabulary):
    """The divergence on both models' full logits, per counted position (per-position temperatures allowed)."""

    name = "dense"

    def values(
        self,
        student: Side,
        teacher: Side,
        mask: torch.Tensor | None,
        temperature: float | torch.Tensor,
        batch: Mapping[str, Any],
    ) -> torch.Tensor:
        student_logits, teacher_logits = _logits(student, "student"), _logits(teacher, "teacher")
        if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
            raise ShapeMismatchError(
                f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} "
                "differ before the vocabulary dimension"
            )
        return self.divergence(
            student_logits, teacher_logits.detach(), mask, temperature=temperature, reduction="none", **self.kd_kwargs
        )


class MixtureKD(DenseKD):
    """Several teachers as one distribution, ``T·log Σ_k w_k softmax(t_k / T)``, then :class:`DenseKD`.

    Weights are fixed, or with ``combine="confidence"`` scaled per example by the probability each teacher gives
    the gold label and renormalized.
    """

    name = "mixture"

    def values(
        self,
        student: Side,
        teacher: Side,
        mask: torch.Tensor | None,
        temperature: float | torch.Tensor,
        batch: Mapping[str, Any],
    ) -> torch.Tensor:
        if not isinstance(teacher, Ensemble):
            raise InvalidArgumentError(f"{self.name} KD needs the teachers' Ensemble, got {type(teacher).__name__}")
        mixture = mixture_logits(teacher.logits, teacher.weights, temperature, teacher.combine, teacher.labels)
        return super().values(student, Logits(mixture), mask, temperature, batch)


class ChunkedKD(_OneVocabulary):
    """The divergence from both models' final hidden states and LM heads, ``chunk_size`` positions at a time."""

    name = "chunked"

    def __init__(
        self,
        divergence: str | Divergence = "forward_kl",
        kd_kwargs: Mapping[str, Any] | None = None,
        *,
        chunk_size: int = 1024,
        vocab_policy: str = "error",
    ) -> None:
        super().__init__(divergence, kd_kwargs)
        self.chunk_size = chunk_size
        self.vocab_policy = vocab_policy

    def values(
        self,
        student: Side,
        teacher: Side,
        mask: torch.Tensor | None,
        temperature: float | torch.Tensor,
        batch: Mapping[str, Any],
    ) -> torch.Tensor:
        if not isinstance(student, HeadStates) or not isinstance(teacher, HeadStates):
            raise InvalidArgumentError("chunked KD needs both models' HeadStates (final hidden states and LM heads)")
        return chunked_divergence(
            student.hidden,
            student.weight,
            teacher.hidden.detach(),
            teacher.weight.detach(),
            mask,
            divergence=self.divergence,
            chunk_size=self.chunk_size,
            temperature=temperature,
            reduction="sum",
            vocab_policy=self.vocab_policy,
            student_head_bias=student.bias,
            teacher_head_bias=None if teacher.bias is None else teacher.bias.detach(),
            **self.kd_kwargs,
        )


class TopKKD(_OneVocabulary):
    """The divergence against a teacher's cached top-k, at the cache's temperature; on :class:`HeadStates` the
    student's logits are computed chunk by chunk (at the cached ids only with ``"renormalize"``)."""

    name = "cached_topk"

    def __init__(
        self,
        divergence: str | Divergence = "forward_kl",
        kd_kwargs: Mapping[str, Any] | None = None,
        *,
        chunk_size: int = 1024,
    ) -> None:
        super().__init__(divergence, {k: v for k, v in (kd_kwargs or {}).items() if k != "vocab_policy"})
        self.chunk_size = chunk_size

    def values(
        self,
        student: Side,
        teacher: Side,
        mask: torch.Tensor | None,
        temperature: float | torch.Tensor,
        batch: Mapping[str, Any],
    ) -> torch.Tensor:
        if not isinstance(teacher, TopK):
            raise InvalidArgumentError(f"cached top-k KD needs the cache's TopK, got {type(teacher).__name__}")
        options = dict(
            divergence=self.divergence,
            temperature=teacher.temperature,
            leftover_policy=teacher.leftover_policy,
            **self.kd_kwargs,
        )
        if isinstance(student, HeadStates):
            if mask is None:
                raise InvalidArgumentError("chunked cached top-k KD needs the mask of counted positions")
            return chunked_sparse_divergence(
                student.hidden, student.weight, teacher.ids, teacher.logprobs, teacher.leftover, mask,
                bias=student.bias, chunk_size=self.chunk_size, **options,
            )  # fmt: skip
        return sparse_divergence(
            _logits(student, "student"), teacher.ids, teacher.logprobs, teacher.leftover, mask, reduction="sum",
            **options,
        )  # fmt: skip


def _logits(side: Side, name: str) -> torch.Tensor:
    if not isinstance(side, Logits):
        raise InvalidArgumentError(f"this KD strategy needs the {name}'s logits, got {type(side).__name__}")
    return side.value


# ---------------------------------------------------------------- several teachers


def mixture_logits(
    teacher_logits: Sequence[torch.Tensor],
    weights: Sequence[float],
    temperature: float | torch.Tensor,
    combine: str = "fixed",
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Several teachers as one: ``T·log Σ_k w_k softmax(t_k / T)``, so the divergence's own ``/T`` recovers the
    mixture; with ``combine="confidence"`` each weight is scaled per example by the probability the teacher gives
    the gold label (``labels``), then renormalized."""
    scale = temperature[..., None] if isinstance(temperature, torch.Tensor) else temperature
    logps = torch.stack([(logits.float() / scale).log_softmax(-1) for logits in teacher_logits])  # (K, ..., V)
    weight = torch.tensor(list(weights), device=logps.device, dtype=logps.dtype)
    weight = weight.view(-1, *[1] * (logps.dim() - 1)).expand(*logps.shape[:-1], 1)  # (K, ..., 1)
    if combine == "confidence":
        if labels is None:
            raise InvalidArgumentError("teacher_combine='confidence' needs gold labels in the batch")
        index = labels.clamp_min(0).expand(logps.shape[0], *labels.shape).unsqueeze(-1)  # (K, ..., 1)
        weight = weight * logps.gather(-1, index).exp()
        weight = weight / weight.sum(0, keepdim=True).clamp_min(1e-12)
    mixture = torch.logsumexp(logps + weight.clamp_min(1e-30).log(), dim=0)  # (..., V) log-probs at T
    return mixture * scale


# ---------------------------------------------------------------- the chunked cached divergence


def chunked_sparse_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    leftover: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    divergence: str | Divergence = "forward_kl",
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
