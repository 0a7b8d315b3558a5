"""Feature losses: a student's intermediate hidden states or attention maps against the teacher's.

Every function takes the student's tensor(s), the teacher's, an optional ``attention_mask`` and a keyword
``reduction``:

* ``attention_mask`` is ``(B, T)`` (``(...)`` for :func:`hidden_mse` and :func:`cosine`), bool or 0/1 integers,
  True/1 = real token; padded positions are left out of every sum and every count; None counts every position;
* math runs in float32 at least (bf16/fp16 inputs are upcast, float64 stays float64);
* ``reduction`` is ``"mean"`` (default), ``"sum"`` or ``"none"``; each docstring says whether ``"none"`` gives one
  value per position or one per example. Uncounted positions or examples are 0 in ``"none"`` and left out of
  ``"mean"``, which is 0 (with zero gradients) when nothing counts;
* sizes that no projection can fix raise :class:`~kdistill.errors.ShapeMismatchError` naming both shapes; a
  hidden-size mismatch says that a projection (``projection: linear`` in the match) resolves it where it does.

Nothing here detaches the teacher: the caller passes teacher features computed under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch

from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.losses._common import check_reduction, compute_dtype, reduce_positions, select_counted

_REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
_EPS = 1e-8  # floor on vector norms: a zero vector normalizes to zero instead of NaN
_MIN_PROB = 1e-12  # floor on student probabilities inside the log of attention_kl
_PROJECTION_HINT = "add a projection (e.g. `projection: linear` in the match) to map student to teacher size"

# ---------------------------------------------------------------- validation helpers


def _check_tensor(name: str, tensor: object, min_dim: int = 1, max_dim: int | None = None) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise InvalidArgumentError(f"{name} must be floating point, got dtype {tensor.dtype}")
    if tensor.dim() < min_dim or (max_dim is not None and tensor.dim() > max_dim):
        wanted = f"at least {min_dim}" if max_dim is None else " or ".join(map(str, range(min_dim, max_dim + 1)))
        raise ShapeMismatchError(f"{name} must have {wanted} dimensions, got shape {tuple(tensor.shape)}")
    return tensor


def _check_mask(attention_mask: object, like: torch.Tensor, leading_shape: tuple[int, ...]) -> torch.Tensor | None:
    """Validate ``attention_mask`` against the positions' shape; returns it as bool on ``like``'s device, or None."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise InvalidArgumentError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise InvalidArgumentError(f"attention_mask must be bool or 0/1 integers, got dtype {attention_mask.dtype}")
    if tuple(attention_mask.shape) != tuple(leading_shape):
        raise ShapeMismatchError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but inputs of shape {tuple(like.shape)} need "
            f"a mask of shape {tuple(leading_shape)}"
        )
    return (attention_mask != 0).to(like.device)


def _check_hidden_pair(
    student: object, teacher: object, reduction: str, min_dim: int = 1, max_dim: int | None = None
) -> None:
    """Both floating tensors with the same positions; a hidden-size difference gets the projection hint."""
    _check_tensor("student_hidden", student, min_dim, max_dim)
    _check_tensor("teacher_hidden", teacher, min_dim, max_dim)
    check_reduction(reduction, _REDUCTIONS)
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ShapeMismatchError(
            f"student_hidden {tuple(student.shape)} and teacher_hidden {tuple(teacher.shape)} differ before the "
            "hidden dimension (batch and sequence length must agree)"
        )
    if student.shape[-1] != teacher.shape[-1]:
        raise ShapeMismatchError(
            f"student_hidden has hidden size {student.shape[-1]} but teacher_hidden has hidden size "
            f"{teacher.shape[-1]} ({tuple(student.shape)} vs {tuple(teacher.shape)}); {_PROJECTION_HINT}"
        )


def _upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = compute_dtype(*tensors)
    return [tensor.to(dtype) for tensor in tensors]


def _l2_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x / max(‖x‖, eps) along ``dim``; zero vectors stay zero with finite gradients."""
    return x * torch.rsqrt(x.pow(2).sum(dim, keepdim=True).clamp_min(_EPS**2))


def _reduce_examples(per_example: torch.Tensor, counted: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce ``(B,)`` values; examples not ``counted`` are 0 in ``"none"`` and left out of sum and mean."""
    if counted is not None:
        per_example = torch.where(counted, per_example, torch.zeros_like(per_example))
    if reduction == "none":
        return per_example
    total = per_example.sum()
    if reduction == "sum":
        return total
    if counted is None:
        return total / max(per_example.numel(), 1)
    return total / counted.sum().clamp_min(1)


# ---------------------------------------------------------------- hidden states, position-wise


def _counted_rows(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: object, reduction: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate a position-wise pair; returns the counted rows ``(n_counted, H)`` of both and the bool mask."""
    _check_hidden_pair(student_hidden, teacher_hidden, reduction)
    mask = _check_mask(attention_mask, student_hidden, tuple(student_hidden.shape[:-1]))
    student_rows, teacher_rows = _upcast(select_counted(student_hidden, mask), select_counted(teacher_hidden, mask))
    return student_rows, teacher_rows, mask


def hidden_mse(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean squared error between hidden states (TextBrewer's ``hid_mse_loss``).

    Args:
        student_hidden: ``(B, T, H)``, or any ``(..., H)``.
        teacher_hidden: same shape as ``student_hidden``.
        attention_mask: ``(B, T)`` (the leading shape ``(...)``), True/1 = counted position.
        reduction: ``"mean"``: sum of squared errors over counted positions and hidden dims divided by
            (counted positions × H); ``"sum"``: sum over counted positions of each position's mean over H;
            ``"none"``: per position ``(...)``, mean over H, 0 where masked.

    Returns:
        A float32 (float64 for float64 input) scalar, or ``(...)`` for ``reduction="none"``.
    """
    student_rows, teacher_rows, mask = _counted_rows(student_hidden, teacher_hidden, attention_mask, reduction)
    per_position = (student_rows - teacher_rows).pow(2).mean(-1)  # (n_counted,)
    return reduce_positions(per_position, mask, student_hidden.shape[:-1], reduction)


def cosine(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cosine distance, 1 − cos(s, t), per position (TextBrewer's ``cos_loss``); in [0, 2].

    The norms' product is floored at 1e-8, so a zero vector gives cos = 0 (loss 1), never NaN.

    Args:
        student_hidden: ``(B, T, H)``, or any ``(..., H)``.
        teacher_hidden: same shape as ``student_hidden`` (same hidden size: project the student first if not).
        attention_mask: ``(B, T)`` (the leading shape ``(...)``), True/1 = counted position.
        reduction: ``"mean"`` over counted positions, ``"sum"``, or ``"none"``: per position ``(...)``, 0 where
            masked.

    Returns:
        A float32 (float64 for float64 input) scalar, or ``(...)`` for ``reduction="none"``.
    """
    student_rows, teacher_rows, mask = _counted_rows(student_hidden, teacher_hidden, attention_mask, reduction)
    dot = (student_rows * teacher_rows).sum(-1)  # (n_counted,)
    norms_squared = student_rows.pow(2).sum(-1) * teacher_rows.pow(2).sum(-1)
    per_position = 1.0 - dot * torch.rsqrt(norms_squared.clamp_min(_EPS**2))
    return reduce_positions(per_position, mask, student_hidden.shape[:-1], reduction)


# ---------------------------------------------------------------- hidden states, example-wise


def pkd(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Patient-KD loss (Sun et al., 2019; TextBrewer's ``pkd_loss``) on the first-token ([CLS]) vectors.

    Per example: ‖s/‖s‖ − t/‖t‖‖², the squared distance of the L2-normalized position-0 vectors, summed over the
    hidden dims as in the paper and TextBrewer (so it lies in [0, 4] whatever H is). Norms are floored at 1e-8.

    Args:
        student_hidden: ``(B, T, H)`` (position 0 is used) or ``(B, H)`` (used as is).
        teacher_hidden: same shape as ``student_hidden``.
        attention_mask: ``(B, T)`` for 3-d inputs, ``(B,)`` for 2-d ones. Only position 0 is read: an example
            whose position 0 is masked (a fully padded row) is left out; other positions never matter.
        reduction: ``"mean"`` over counted examples, ``"sum"``, or ``"none"``: per example ``(B,)``, 0 where left out.

    Returns:
        A float32 (float64 for float64 input) scalar, or ``(B,)`` for ``reduction="none"``.
    """
    _check_hidden_pair(student_hidden, teacher_hidden, reduction, 2, 3)
    mask = _check_mask(attention_mask, student_hidden, tuple(student_hidden.shape[:-1]))
    counted = None if mask is None else mask[:, 0] if mask.dim() == 2 else mask  # (B,)
    if student_hidden.dim() == 3:
        student_hidden, teacher_hidden = student_hidden[:, 0], teacher_hidden[:, 0]  # (B, H)
    student_cls, teacher_cls = _upcast(student_hidden, teacher_hidden)
    per_example = (_l2_normalize(student_cls, -1) - _l2_normalize(teacher_cls, -1)).pow(2).sum(-1)  # (B,)
    return _reduce_examples(per_example, counted, reduction)


def nst(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Neuron Selectivity Transfer (Huang & Wang, 2017): MMD² between the sets of hidden channels.

    Each hidden channel is a vector over the counted positions of one example, L2-normalized (zero channels stay
    zero). With the polynomial kernel k(x, y) = (x·y)², per example

        MMD² = mean_ij k(s_i, s_j) + mean_ij k(t_i, t_j) − 2 mean_ij k(s_i, t_j),

    computed as ‖G_s/H_s − G_t/H_t‖²_F with the position Gram matrices G = F Fᵀ ``(T, T)`` (F ``(T, H)`` with
    normalized columns). Student and teacher may have different hidden sizes.

    Args:
        student_hidden: ``(B, T, H_s)``.
        teacher_hidden: ``(B, T, H_t)``.
        attention_mask: ``(B, T)``, True/1 = counted position.
        reduction: ``"mean"`` over examples with at least one counted position, ``"sum"``, or ``"none"``: per
            example ``(B,)``, 0 for fully masked examples.

    Returns:
        A float32 (float64 for float64 input) scalar, or ``(B,)`` for ``reduction="none"``.
    """
    for name, tensor in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        _check_tensor(name, tensor, 3, 3)
    check_reduction(reduction, _REDUCTIONS)
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ShapeMismatchError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} must "
            "agree in batch size and sequence length (nst allows different hidden sizes, not different positions)"
        )
    mask = _check_mask(attention_mask, student_hidden, tuple(student_hidden.shape[:2]))
    student_hidden, teacher_hidden = _upcast(student_hidden, teacher_hidden)
    counted = None
    if mask is not None:
        counted = mask.any(dim=1)  # (B,)
        student_hidden = student_hidden * mask[..., None]  # padded rows are zero: they add nothing to a Gram
        teacher_hidden = teacher_hidden * mask[..., None]
    grams = []
    for hidden in (student_hidden, teacher_hidden):
        channels = _l2_normalize(hidden, dim=1)  # (B, T, H), each channel a unit vector over positions
        grams.append(channels @ channels.transpose(1, 2) / hidden.shape[-1])  # (B, T, T)
    per_example = (grams[0] - grams[1]).pow(2).sum(dim=(1, 2))  # (B,)
    return _reduce_examples(per_example, counted, reduction)


def fsp(
    student_first: torch.Tensor,
    student_second: torch.Tensor,
    teacher_first: torch.Tensor,
    teacher_second: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Flow of Solution Procedure (Yim et al., 2017; TextBrewer's ``fsp_loss``) between two layers.

    Per example and model, the FSP matrix G = F₁ᵀ F₂ / n ``(H₁, H₂)``, summed over the n counted positions; the
    loss is the mean over the H₁·H₂ entries of (G_student − G_teacher)².

    Args:
        student_first: ``(B, T, H₁)``, the student's first layer.
        student_second: ``(B, T, H₂)``, the student's second layer.
        teacher_first: ``(B, T, H₁)``; the teacher's (H₁, H₂) must equal the student's (project first if not).
        teacher_second: ``(B, T, H₂)``.
        attention_mask: ``(B, T)``, True/1 = counted position.
        reduction: ``"mean"`` over examples with at least one counted position, ``"sum"``, or ``"none"``: per
            example ``(B,)``, 0 for fully masked examples.

    Returns:
        A float32 (float64 for float64 input) scalar, or ``(B,)`` for ``reduction="none"``.
    """
    names = ("student_first", "student_second", "teacher_first", "teacher_second")
    tensors = (student_first, student_second, teacher_first, teacher_second)
    for name, tensor in zip(names, tensors, strict=True):
        _check_tensor(name, tensor, 3, 3)
    check_reduction(reduction, _REDUCTIONS)
    positions = tuple(student_first.shape[:2])
    for name, tensor in zip(names[1:], tensors[1:], strict=True):
        if tuple(tensor.shape[:2]) != positions:
            raise ShapeMismatchError(
                f"{name} {tuple(tensor.shape)} and student_first {tuple(student_first.shape)} must agree in "
                "batch size and sequence length"
            )
    student_pair = (student_first.shape[-1], student_second.shape[-1])
    teacher_pair = (teacher_first.shape[-1], teacher_second.shape[-1])
    if student_pair != teacher_pair:
        raise ShapeMismatchError(
            f"student FSP matrix is {student_pair[0]}x{student_pair[1]} but teacher FSP matrix is "
            f"{teacher_pair[0]}x{teacher_pair[1]} (hidden sizes (H1, H2) must agree); {_PROJECTION_HINT}"
        )
    mask = _check_mask(attention_mask, student_first, positions)
    tensors = tuple(_upcast(*tensors))
    counted, n_positions = None, float(positions[1])
    if mask is not None:
        counted = mask.any(dim=1)  # (B,)
        n_positions = mask.sum(dim=1).clamp_min(1).to(tensors[0].dtype)[:, None, None]  # (B, 1, 1)
        tensors = tuple(tensor * mask[..., None] for tensor in tensors)  # padded rows add nothing to F1ᵀ F2
    student_fsp = tensors[0].transpose(1, 2) @ tensors[1] / n_positions  # (B, H1, H2)
    teacher_fsp = tensors[2].transpose(1, 2) @ tensors[3] / n_positions  # (B, H1, H2)
    per_example = (student_fsp - teacher_fsp).pow(2).mean(dim=(1, 2))  # (B,)
    return _reduce_examples(per_example, counted, reduction)


# ---------------------------------------------------------------- attention maps


def _attention_pair(
    student_attention: torch.Tensor,
    teacher_attention: torch.Tensor,
    attention_mask: object,
    reduction: str,
    average_heads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate two ``(B, heads, T, T)`` maps; returns them upcast (head-averaged if asked) and the bool mask."""
    _check_tensor("student_attention", student_attention, 4, 4)
    _check_tensor("teacher_attention", teacher_attention, 4, 4)
    check_reduction(reduction, _REDUCTIONS)
    if not isinstance(average_heads, bool):
        raise InvalidArgumentError(f"average_heads must be True or False, got {average_heads!r}")
    for name, tensor in (("student_attention", student_attention), ("teacher_attention", teacher_attention)):
        if tensor.shape[-1] != tensor.shape[-2]:
            raise ShapeMismatchError(f"{name} must be (B, heads, T, T), got {tuple(tensor.shape)}")
    s_shape, t_shape = tuple(student_attention.shape), tuple(teacher_attention.shape)
    if s_shape[0] != t_shape[0] or s_shape[2:] != t_shape[2:]:
        raise ShapeMismatchError(
            f"student_attention {s_shape} and teacher_attention {t_shape} must agree in batch size and sequence length"
        )
    if s_shape[1] != t_shape[1] and not average_heads:
        raise ShapeMismatchError(
            f"student_attention has {s_shape[1]} heads but teacher_attention has {t_shape[1]} ({s_shape} vs "
            f"{t_shape}); pass average_heads=True to compare head-averaged maps"
        )
    mask = _check_mask(attention_mask, student_attention, (s_shape[0], s_shape[2]))
    student_attention, teacher_attention = _upcast(student_attention, teacher_attention)
    if average_heads:
        student_attention = student_attention.mean(dim=1, keepdim=True)  # (B, 1, T, T)
        teacher_attention = teacher_attention.mean(dim=1, keepdim=True)
    return student_attention, teacher_attention, mask


def attention_mse(
    student_attention: torch.Tensor,
    teacher_attention: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    average_heads: bool = False,
) -> torch.Tensor:
    """Mean squared error between attention maps (TextBrewer's ``att_mse_loss`` with a mask).

    A (query, key) pair counts when both positions are real tokens; with no mask every pair counts. Entries are
    compared as given (probabilities from ``output_attentions``, or scores); masked pairs are simply left out, so
    additive ``-inf``/``-1e4`` mask values in scores never enter the sum.

    Args:
        student_attention: ``(B, heads, T, T)``.
        teacher_attention: ``(B, heads, T, T)``; a different head count needs ``average_heads=True``.
        attention_mask: ``(B, T)``, True/1 = real token.
        reduction: ``"mean"`` over heads × counted pairs; ``"sum"``: sum over counted pairs of the mean over heads;
            ``"none"``: per (query, key) pair ``(B, T, T)``, mean over heads, 0 where the pair does not count.
        average_heads: compare the head-averaged maps ``(B, 1, T, T)`` instead of head by head.

    Returns:
        A float32 (float64 for float64 input) scalar, or ``(B, T, T)`` for ``reduction="none"``.
    """
    student_attention, teacher_attention, mask = _attention_pair(
        student_attention, teacher_attention, attention_mask, reduction, average_heads
    )
    per_pair = (student_attention - teacher_attention).pow(2).mean(dim=1)  # (B, T, T)
    pair_mask = None if mask is None else mask[:, :, None] & mask[:, None, :]  # (B, T, T): query and key real
    counted = select_counted(per_pair, pair_mask, trailing_dims=0)  # (n_counted_pairs,)
    return reduce_positions(counted, pair_mask, per_pair.shape, reduction)


def attention_kl(
    student_attention: torch.Tensor,
    teacher_attention: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    from_scores: bool = False,
    average_heads: bool = False,
) -> torch.Tensor:
    """KL(A_T‖A_S) between attention rows, each row a distribution over the keys.

    Masked keys are excluded: probabilities are renormalized over the counted keys (scores, with
    ``from_scores=True``, are softmaxed over them, as TextBrewer's ``att_ce_loss`` does; this is its cross-entropy
    minus the teacher's entropy, same gradient). A key with teacher probability 0 contributes 0; student
    probabilities are floored at 1e-12 inside the log, so the result stays finite (≤ ~27.6 nats per row) where
    the student gives 0 to a key the teacher does not. Probability inputs are expected to be non-negative.

    Args:
        student_attention: ``(B, heads, T, T)`` probabilities (or scores with ``from_scores=True``).
        teacher_attention: ``(B, heads, T, T)``, same kind; a different head count needs ``average_heads=True``
            (the head-averaged maps are compared; with scores, the scores are averaged before the softmax).
        attention_mask: ``(B, T)``, True/1 = real token; masks both query rows and keys.
        reduction: ``"mean"`` over heads × counted query rows; ``"sum"``: sum over counted query rows of the mean
            over heads; ``"none"``: per query position ``(B, T)``, mean over heads, 0 where masked.
        from_scores: the inputs are pre-softmax attention scores rather than probabilities.
        average_heads: compare the head-averaged maps ``(B, 1, T, T)``.

    Returns:
        A float32 (float64 for float64 input) scalar in nats, or ``(B, T)`` for ``reduction="none"``.
    """
    if not isinstance(from_scores, bool):
        raise InvalidArgumentError(f"from_scores must be True or False, got {from_scores!r}")
    student_attention, teacher_attention, mask = _attention_pair(
        student_attention, teacher_attention, attention_mask, reduction, average_heads
    )
    all_keys = torch.ones_like(student_attention[:, :1, :1, :], dtype=torch.bool)  # (B, 1, 1, T)
    key_mask = all_keys if mask is None else mask[:, None, None, :]  # (B, 1, 1, T)
    student_p, teacher_p = (
        _row_probs(attention, key_mask, from_scores) for attention in (student_attention, teacher_attention)
    )
    support = teacher_p > 0
    teacher_logp = torch.log(torch.where(support, teacher_p, torch.ones_like(teacher_p)))
    student_logp = torch.log(student_p.clamp_min(_MIN_PROB))
    terms = torch.where(support, teacher_p * (teacher_logp - student_logp), torch.zeros_like(teacher_p))
    per_row = terms.sum(-1).mean(dim=1)  # (B, T): KL per query row, mean over heads
    counted = select_counted(per_row, mask, trailing_dims=0)  # (n_counted_rows,)
    return reduce_positions(counted, mask, per_row.shape, reduction)


def _row_probs(attention: torch.Tensor, key_mask: torch.Tensor, from_scores: bool) -> torch.Tensor:
    """Attention rows as distributions over the counted keys; rows with no counted key (or no mass) are all 0."""
    if from_scores:
        lowest = torch.finfo(attention.dtype).min
        probs = torch.softmax(attention.masked_fill(~key_mask, lowest), dim=-1)
        return torch.where(key_mask, probs, torch.zeros_like(probs))
    kept = torch.where(key_mask, attention, torch.zeros_like(attention))
    mass = kept.sum(-1, keepdim=True)
    return kept / torch.where(mass > 0, mass, torch.ones_like(mass))  # a row with no mass stays 0, finite grads
