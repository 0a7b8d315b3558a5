"""Divergences between a student's and a teacher's output distributions.

Every function here has the signature
``fn(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", vocab_policy="error", ...)``
and the same semantics (see :mod:`kdistill.losses._common`):

* ``student_logits`` ``(..., V_s)`` and ``teacher_logits`` ``(..., V_t)``; both are divided by ``temperature``
  before the softmax (a number, or a tensor ``(...)`` of per-position temperatures, as the ``flsw``/``cwsm``
  schedules give); ``V_s != V_t`` is resolved by ``vocab_policy``;
* ``mask`` bool ``(...)``, True = counted; only counted positions are computed;
* math in float32 at least, whatever the input dtype; mixtures are formed in log space, so ``-inf`` logits
  (padded vocabulary rows) are allowed and give finite values wherever the divergence itself is finite;
* no T² factor: the objective multiplies by T² when it is configured to.

p_T is the teacher's distribution, p_S the student's; all sums run over the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.losses._common import (
    align_vocab,
    check_logit_pair,
    check_mask,
    check_reduction,
    check_temperature,
    check_unit_interval,
    compute_dtype,
    reduce_positions,
    scale_rows,
    select_counted,
)

_NEG_INF = float("-inf")

RowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _divergence(
    rows_fn: RowFn,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    reduction: str,
    vocab_policy: str,
) -> torch.Tensor:
    """Validate, select counted rows, scale by temperature, apply ``rows_fn`` per row, reduce."""
    check_logit_pair(student_logits, teacher_logits)
    check_reduction(reduction)
    leading_shape = student_logits.shape[:-1]
    check_temperature(temperature, leading_shape)
    mask = check_mask(mask, leading_shape)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_policy)
    dtype = compute_dtype(student_logits, teacher_logits)
    student_rows = scale_rows(select_counted(student_logits, mask).to(dtype), temperature, mask)  # (n_counted, V)
    teacher_rows = scale_rows(select_counted(teacher_logits, mask).to(dtype), temperature, mask)  # (n_counted, V)
    per_position = rows_fn(student_rows, teacher_rows)  # (n_counted,); empty rows keep the graph connected
    if torch.isnan(per_position).any():  # n_counted values: cheap, and what a NaN loss would hide
        _refuse_empty_rows(student_rows, teacher_rows, mask, leading_shape)
    return reduce_positions(per_position, mask, leading_shape, reduction)


def _refuse_empty_rows(
    student_rows: torch.Tensor, teacher_rows: torch.Tensor, mask: torch.Tensor | None, leading_shape: torch.Size
) -> None:
    """Name the first counted position whose logits are -inf (or NaN) everywhere on a side: no distribution."""
    if mask is not None:
        positions = mask.nonzero()  # (n_counted, dims), in the order select_counted keeps the rows
    elif not leading_shape:  # one distribution, no positions
        positions = torch.zeros(len(student_rows), 0, dtype=torch.long)
    else:
        positions = torch.stack(torch.unravel_index(torch.arange(len(student_rows)), leading_shape), -1)
    for side, rows in (("student_logits", student_rows), ("teacher_logits", teacher_rows)):
        empty = (torch.isneginf(rows) | torch.isnan(rows)).all(-1)
        if empty.any():
            where = tuple(int(i) for i in positions[int(empty.nonzero()[0])])
            raise InvalidArgumentError(
                f"{side} at position {where} (a counted position) are -inf everywhere, so they are no "
                "distribution; mask that position out (mask False) or give it a finite logit"
            )


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row from log-probabilities; terms with p = 0 are 0 (and get no NaN gradient)."""
    p = log_p.exp()
    support = p > 0
    diff = torch.where(support, log_p - log_q, 0.0)
    return (p * diff).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) from log a and log b, stable for -inf entries in either or both."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    both_zero = (log_a == _NEG_INF) & (log_b == _NEG_INF)
    safe_a = torch.where(both_zero, 0.0, log_a)
    safe_b = torch.where(both_zero, 0.0, log_b)
    mixed = torch.logaddexp(safe_a + math.log(weight_a), safe_b + math.log1p(-weight_a))
    return torch.where(both_zero, _NEG_INF, mixed)


def _log_probs(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.log_softmax(student_rows, dim=-1), torch.log_softmax(teacher_rows, dim=-1)


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    vocab_policy: str = "error",
) -> torch.Tensor:
    """Forward KL, KL(p_T‖p_S) = Σ p_T (log p_T − log p_S): mass-covering, the classic KD loss.

    Args:
        student_logits: ``(..., V)``.
        teacher_logits: ``(..., V)``.
        mask: bool ``(...)``, True = counted; None counts every position.
        temperature: both logits are divided by it before the softmax.
        reduction: ``"mean"`` over counted positions, ``"sum"``, ``"batchmean"`` (sum / dim 0), ``"none"`` ``(...)``.
        vocab_policy: ``"error"``, ``"truncate"`` or ``"pad"`` when the vocabulary sizes differ.

    Returns:
        A float32 (float64 for float64 input) scalar, or ``(...)`` for ``reduction="none"``, in nats.
    """

    def rows(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
        student_logp, teacher_logp = _log_probs(student_rows, teacher_rows)
        return _kl_rows(teacher_logp, student_logp)

    return _divergence(rows, student_logits, teacher_logits, mask, temperature, reduction, vocab_policy)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    vocab_policy: str = "error",
) -> torch.Tensor:
    """Reverse KL, KL(p_S‖p_T) = Σ p_S (log p_S − log p_T): mode-seeking (MiniLLM's objective).

    Arguments and return value as in :func:`forward_kl`.
    """

    def rows(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
        student_logp, teacher_logp = _log_probs(student_rows, teacher_rows)
        return _kl_rows(student_logp, teacher_logp)

    return _divergence(rows, student_logits, teacher_logits, mask, temperature, reduction, vocab_policy)


def skewed_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    vocab_policy: str = "error",
    skew: float = 0.1,
) -> torch.Tensor:
    """Skewed forward KL (DistiLLM), KL(p_T ‖ skew·p_T + (1−skew)·p_S).

    Mixing some teacher mass into the student's side bounds the loss where p_S is tiny, which steadies training.
    ``skew=0`` is :func:`forward_kl`; ``skew=1`` is identically 0. Other arguments as in :func:`forward_kl`.
    """
    check_unit_interval("skew", skew)

    def rows(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
        student_logp, teacher_logp = _log_probs(student_rows, teacher_rows)
        return _kl_rows(teacher_logp, _log_mix(teacher_logp, student_logp, float(skew)))

    return _divergence(rows, student_logits, teacher_logits, mask, temperature, reduction, vocab_policy)


def skewed_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    vocab_policy: str = "error",
    skew: float = 0.1,
) -> torch.Tensor:
    """Skewed reverse KL (DistiLLM), KL(p_S ‖ (1−skew)·p_T + skew·p_S).

    ``skew=0`` is :func:`reverse_kl`; ``skew=1`` is identically 0. Other arguments as in :func:`forward_kl`.
    """
    check_unit_interval("skew", skew)

    def rows(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
        student_logp, teacher_logp = _log_probs(student_rows, teacher_rows)
        return _kl_rows(student_logp, _log_mix(student_logp, teacher_logp, float(skew)))

    return _divergence(rows, student_logits, teacher_logits, mask, temperature, reduction, vocab_policy)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    vocab_policy: str = "error",
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalized Jensen–Shannon divergence as defined by GKD (Agarwal et al., 2024):

    ``β·KL(p_T‖m) + (1−β)·KL(p_S‖m)`` with ``m = β·p_T + (1−β)·p_S``.

    At exactly ``β=0`` it returns :func:`forward_kl` and at exactly ``β=1`` :func:`reverse_kl`, as TRL defines the
    end points. Beware that the mixed form is not continuous there: as β approaches 0 or 1 the mixture tends to one of
    the two distributions and the value shrinks toward 0, so β=0.01 is *not* close to forward KL. ``β=0.5`` gives
    the symmetric JSD, bounded by log 2. Other arguments as in :func:`forward_kl`.
    """
    check_unit_interval("beta", beta)
    beta = float(beta)

    def rows(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
        student_logp, teacher_logp = _log_probs(student_rows, teacher_rows)
        if beta == 0.0:
            return _kl_rows(teacher_logp, student_logp)
        if beta == 1.0:
            return _kl_rows(student_logp, teacher_logp)
        mixture_logp = _log_mix(teacher_logp, student_logp, beta)
        return beta * _kl_rows(teacher_logp, mixture_logp) + (1.0 - beta) * _kl_rows(student_logp, mixture_logp)

    return _divergence(rows, student_logits, teacher_logits, mask, temperature, reduction, vocab_policy)


def total_variation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    vocab_policy: str = "error",
) -> torch.Tensor:
    """Total variation distance, ½ Σ |p_T − p_S|, in [0, 1]. Arguments as in :func:`forward_kl`."""

    def rows(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
        student_p = torch.softmax(student_rows, dim=-1)
        teacher_p = torch.softmax(teacher_rows, dim=-1)
        return 0.5 * (teacher_p - student_p).abs().sum(-1)

    return _divergence(rows, student_logits, teacher_logits, mask, temperature, reduction, vocab_policy)


def soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    vocab_policy: str = "error",
) -> torch.Tensor:
    """Cross-entropy against the teacher's soft targets, −Σ p_T log p_S (TextBrewer's ``kd_ce``).

    It equals :func:`forward_kl` plus the teacher's entropy, so it has the same gradient but is not 0 when the
    distributions agree. Arguments as in :func:`forward_kl`.
    """

    def rows(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
        student_logp, teacher_logp = _log_probs(student_rows, teacher_rows)
        teacher_p = teacher_logp.exp()
        safe_student_logp = torch.where(teacher_p > 0, student_logp, 0.0)
        return -(teacher_p * safe_student_logp).sum(-1)

    return _divergence(rows, student_logits, teacher_logits, mask, temperature, reduction, vocab_policy)


def logit_mse(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    vocab_policy: str = "error",
) -> torch.Tensor:
    """Mean squared error between temperature-scaled logits, mean over the vocabulary per position.

    Columns where either logit is ``-inf`` (padded vocabulary rows) are left out of that position's mean.
    Arguments as in :func:`forward_kl`.
    """

    def rows(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
        both_finite = torch.isfinite(student_rows) & torch.isfinite(teacher_rows)
        diff = torch.where(both_finite, student_rows - teacher_rows, 0.0)
        return diff.pow(2).sum(-1) / both_finite.sum(-1).clamp_min(1)

    return _divergence(rows, student_logits, teacher_logits, mask, temperature, reduction, vocab_policy)


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Hard-label cross-entropy, −log p(label), for classification heads or tokens.

    Args:
        logits: ``(..., V)``.
        labels: integer ``(...)``; positions equal to ``ignore_index`` do not count.
        mask: optional bool ``(...)``, further restricting the counted positions.
        ignore_index: label value that marks a position as not counted.
        reduction: as for the divergences.

    The causal shift for language models is *not* done here; the causal-LM task does it once.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise InvalidArgumentError("logits must be a floating-point tensor of shape (..., V)")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise InvalidArgumentError("labels must be an integer tensor of class ids")
    if labels.shape != logits.shape[:-1]:
        raise ShapeMismatchError(
            f"labels have shape {tuple(labels.shape)} but logits {tuple(logits.shape)} need labels of shape "
            f"{tuple(logits.shape[:-1])}"
        )
    check_reduction(reduction)
    leading_shape = labels.shape
    counted = labels != ignore_index
    user_mask = check_mask(mask, leading_shape)
    if user_mask is not None:
        counted = counted & user_mask
    vocab = logits.shape[-1]
    bad = counted & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad].reshape(-1)[0])
        raise InvalidArgumentError(
            f"label {value} is outside the {vocab} classes of the logits (valid: 0..{vocab - 1} or "
            f"ignore_index={ignore_index})"
        )
    rows = select_counted(logits, counted).to(compute_dtype(logits))  # (n_counted, V)
    targets = labels.reshape(-1)[counted.reshape(-1)]  # (n_counted,)
    per_position = -torch.log_softmax(rows, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return reduce_positions(per_position, counted, leading_shape, reduction)
