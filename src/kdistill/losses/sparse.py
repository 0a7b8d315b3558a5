"""Divergences against a teacher stored as top-k log-probabilities (a teacher-output cache).

A cache keeps, per position, the teacher's ``k`` most likely ids ``topk_ids`` ``(..., k)``, their log-probabilities
``topk_logprobs`` ``(..., k)`` (already at the distillation temperature T: the cache applied it) and optionally
``leftover`` ``(...)`` = log(1 − Σ top-k p), the log of the mass outside the top-k (``-inf`` when k = V).

Two policies say what the teacher is outside its top-k:

* ``"renormalize"`` (default): the leftover is ignored. The teacher is its top-k renormalized, and the student is
  compared on the same support: its logits are gathered at ``topk_ids``, divided by T and renormalized over those
  k ids. Cheap (no ``(…, V)`` teacher row), and exact whenever the teacher's top-k holds all its mass.
* ``"uniform"``: the leftover mass is spread uniformly over the V − k other ids, so the teacher's full log-prob row
  is ``topk_logprobs`` at ``topk_ids`` and ``leftover − log(V − k)`` elsewhere. The student keeps its full
  distribution over V ids. The dense teacher row is materialized ``chunk_rows`` counted rows at a time.

Both call the dense divergence of :mod:`kdistill.losses.divergences` (so each loss keeps one definition): the
student side gets ``student_logits / T`` and the teacher side its log-probabilities, with ``temperature=1`` (a
log-prob row is its own logits, and must not be divided by T a second time). With k = V both policies equal the
dense divergence against the live teacher's logits at the same temperature.

Same contract as the dense divergences otherwise: ``mask`` bool ``(...)``, float32 math at least, reductions
``mean``/``sum``/``batchmean``/``none``, no T² factor inside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.losses import divergences as _div
from kdistill.losses._common import (
    check_mask,
    check_reduction,
    check_temperature,
    compute_dtype,
    reduce_positions,
    scale_rows,
    select_counted,
)

LEFTOVER_POLICIES: tuple[str, ...] = ("renormalize", "uniform")

SPARSE_DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": _div.forward_kl,
    "kl": _div.forward_kl,
    "kd_kl": _div.forward_kl,
    "reverse_kl": _div.reverse_kl,
    "rkl": _div.reverse_kl,
    "generalized_jsd": _div.generalized_jsd,
    "jsd": _div.generalized_jsd,
    "total_variation": _div.total_variation,
    "tvd": _div.total_variation,
    "skewed_forward_kl": _div.skewed_forward_kl,
    "skl": _div.skewed_forward_kl,
    "skewed_reverse_kl": _div.skewed_reverse_kl,
    "srkl": _div.skewed_reverse_kl,
}


def _resolve_divergence(divergence: str | Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    if callable(divergence):
        return divergence
    fn = SPARSE_DIVERGENCES.get(divergence) if isinstance(divergence, str) else None
    if fn is None:
        raise InvalidArgumentError(
            f"divergence={divergence!r} is not one of {', '.join(map(repr, SPARSE_DIVERGENCES))} "
            "(or a callable following the divergence contract)"
        )
    return fn


def _check_sparse_inputs(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    leftover: torch.Tensor | None,
) -> None:
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        raise InvalidArgumentError("student_logits must be a floating-point tensor of shape (..., V)")
    if student_logits.dim() < 1:
        raise ShapeMismatchError("student_logits must have a vocabulary dimension, got a 0-d tensor")
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.is_floating_point() or topk_ids.dtype == torch.bool:
        raise InvalidArgumentError("topk_ids must be an integer tensor of shape (..., k)")
    if not isinstance(topk_logprobs, torch.Tensor) or not topk_logprobs.is_floating_point():
        raise InvalidArgumentError("topk_logprobs must be a floating-point tensor of shape (..., k)")
    if topk_ids.shape != topk_logprobs.shape:
        raise ShapeMismatchError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} must have the same shape"
        )
    if topk_ids.dim() < 1 or topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ShapeMismatchError(
            f"student_logits {tuple(student_logits.shape)} and topk_ids {tuple(topk_ids.shape)} "
            "differ before the last dimension"
        )
    vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    if k < 1 or k > vocab:
        raise ShapeMismatchError(
            f"topk_ids {tuple(topk_ids.shape)} hold k={k} ids per position, but k must be in 1..V={vocab} "
            f"(student_logits {tuple(student_logits.shape)})"
        )
    if leftover is not None:
        if not isinstance(leftover, torch.Tensor) or not leftover.is_floating_point():
            raise InvalidArgumentError("leftover must be a floating-point tensor of the positions' shape (...)")
        if leftover.shape != student_logits.shape[:-1]:
            raise ShapeMismatchError(
                f"leftover {tuple(leftover.shape)} must have the positions' shape "
                f"{tuple(student_logits.shape[:-1])} of student_logits {tuple(student_logits.shape)}"
            )


def _check_ids(ids: torch.Tensor, vocab: int) -> None:
    """Ids on counted rows must lie in 0..V−1 and be distinct within their row."""
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        value = int(ids[bad][0])
        raise InvalidArgumentError(f"topk_ids holds id {value}, outside the vocabulary 0..{vocab - 1} (V={vocab})")
    if ids.shape[-1] > 1:
        ordered = ids.sort(dim=-1).values
        repeated = ordered[:, 1:] == ordered[:, :-1]
        if bool(repeated.any()):
            value = int(ordered[:, 1:][repeated][0])
            raise InvalidArgumentError(f"topk_ids repeats id {value} within one position; top-k ids must be distinct")


def _dense_teacher_rows(ids: torch.Tensor, logprobs: torch.Tensor, leftover: torch.Tensor, vocab: int) -> torch.Tensor:
    """The teacher's full log-prob rows ``(n, V)``: top-k values at their ids, leftover − log(V−k) elsewhere."""
    k = ids.shape[-1]
    # with no other ids the fill is never seen; -inf − log(0) would be NaN
    fill = torch.full_like(leftover, float("-inf")) if k == vocab else leftover - math.log(vocab - k)
    rows = fill[:, None].expand(fill.shape[0], vocab).clone()
    return rows.scatter(-1, ids, logprobs)


def sparse_divergence(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    leftover: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    divergence: str | Callable[..., torch.Tensor] = "forward_kl",
    temperature: float | torch.Tensor = 1.0,
    leftover_policy: str = "renormalize",
    reduction: str = "mean",
    chunk_rows: int = 1024,
    **kwargs: Any,
) -> torch.Tensor:
    """A divergence between the student and a teacher known only by its top-k log-probabilities.

    Args:
        student_logits: ``(..., V)``, divided by ``temperature`` before the softmax.
        topk_ids: integer ``(..., k)``, distinct ids in ``0..V−1`` per position.
        topk_logprobs: ``(..., k)``, the teacher's log p_T at those ids, already at temperature T.
        leftover: ``(...)``, log(1 − Σ top-k p_T); needed by ``"uniform"`` (``-inf`` or omitted when k = V),
            ignored by ``"renormalize"``.
        mask: bool ``(...)``, True = counted; None counts every position.
        divergence: ``forward_kl``, ``reverse_kl``, ``generalized_jsd`` (``beta=``), ``total_variation``,
            ``skewed_forward_kl``/``skewed_reverse_kl`` (``skew=``), their registry aliases, or a callable with the
            divergence contract.
        temperature: the student's temperature (a number or a per-position tensor ``(...)``); it must be the one
            the cache used for the teacher.
        leftover_policy: ``"renormalize"`` (compare on the top-k support, both sides renormalized) or
            ``"uniform"`` (leftover mass spread evenly over the other V − k ids); see the module docstring.
        reduction: ``"mean"`` over counted positions, ``"sum"``, ``"batchmean"`` (sum / dim 0), ``"none"`` ``(...)``.
        chunk_rows: how many counted rows ``"uniform"`` materializes at a time (bounds the ``(rows, V)`` memory).
        **kwargs: passed to the divergence (``beta``, ``skew``).

    Returns:
        A float32 (float64 for float64 input) scalar, or ``(...)`` for ``reduction="none"``.
    """
    fn = _resolve_divergence(divergence)
    if leftover_policy not in LEFTOVER_POLICIES:
        raise InvalidArgumentError(
            f"leftover_policy={leftover_policy!r} is not one of {', '.join(map(repr, LEFTOVER_POLICIES))}"
        )
    _check_sparse_inputs(student_logits, topk_ids, topk_logprobs, leftover)
    check_reduction(reduction)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise InvalidArgumentError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    leading_shape = student_logits.shape[:-1]
    check_temperature(temperature, leading_shape)
    mask = check_mask(mask, leading_shape, what="student_logits")
    vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    dtype = compute_dtype(student_logits, topk_logprobs)

    ids = select_counted(topk_ids, mask).long()  # (n, k)
    _check_ids(ids, vocab)
    teacher_topk = select_counted(topk_logprobs, mask).to(dtype)  # (n, k)
    student_rows = select_counted(student_logits, mask).to(dtype)  # (n, V)

    if leftover_policy == "renormalize":
        gathered = scale_rows(student_rows.gather(-1, ids), temperature, mask)  # (n, k)
        per_position = fn(gathered, teacher_topk, temperature=1.0, reduction="none", **kwargs)
        return reduce_positions(per_position, mask, leading_shape, reduction)

    if leftover is None:
        if k < vocab:
            raise InvalidArgumentError(
                f"leftover_policy='uniform' needs leftover (log of the mass outside the top-k) when k={k} < V={vocab}"
            )
        leftover_rows = teacher_topk.new_full(teacher_topk.shape[:1], float("-inf"))
    else:
        leftover_rows = select_counted(leftover, mask, trailing_dims=0).to(dtype)  # (n,)
    student_scaled = scale_rows(student_rows, temperature, mask)  # (n, V)
    pieces = []
    for start in range(0, max(student_scaled.shape[0], 1), chunk_rows):
        stop = start + chunk_rows
        teacher_rows = _dense_teacher_rows(ids[start:stop], teacher_topk[start:stop], leftover_rows[start:stop], vocab)
        pieces.append(fn(student_scaled[start:stop], teacher_rows, temperature=1.0, reduction="none", **kwargs))
    per_position = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return reduce_positions(per_position, mask, leading_shape, reduction)
