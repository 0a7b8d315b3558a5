"""Validation and reduction shared by every loss in :mod:`kdistill.losses`.

The contract all logit divergences follow:

* logits are ``(..., V)``; ``mask`` is a bool tensor of the leading shape ``(...)``, True where a position counts;
* math runs in float32 at least (bf16/fp16 inputs are upcast, float64 stays float64);
* only counted positions are computed, then reduced by ``reduction``:
  ``"mean"`` (over counted positions, 0 when none count), ``"sum"``, ``"batchmean"`` (sum / size of dim 0),
  ``"none"`` (per position, 0 where masked).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from kdistill.errors import InvalidArgumentError, ShapeMismatchError, VocabMismatchError

Reduction = Literal["mean", "sum", "batchmean", "none"]
VocabPolicy = Literal["error", "truncate", "pad"]

REDUCTIONS: tuple[str, ...] = ("mean", "sum", "batchmean", "none")
VOCAB_POLICIES: tuple[str, ...] = ("error", "truncate", "pad")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the math runs in: float32, or float64 when any input is float64."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def check_reduction(reduction: str, allowed: tuple[str, ...] = REDUCTIONS) -> None:
    if reduction not in allowed:
        raise InvalidArgumentError(f"reduction={reduction!r} is not one of {', '.join(map(repr, allowed))}")


def check_temperature(temperature: float | torch.Tensor, leading_shape: torch.Size | None = None) -> None:
    """A temperature is a finite number > 0, or (per position) a tensor of the positions' shape with such values."""
    if isinstance(temperature, torch.Tensor):
        if leading_shape is None or (temperature.dim() > 0 and tuple(temperature.shape) != tuple(leading_shape)):
            where = f"the positions' shape {tuple(leading_shape)}" if leading_shape is not None else "a scalar"
            raise ShapeMismatchError(f"temperature tensor has shape {tuple(temperature.shape)} but must be {where}")
        if not temperature.is_floating_point() or not bool(
            torch.isfinite(temperature).all() & (temperature > 0).all()
        ):
            raise InvalidArgumentError("temperature tensor must hold finite floating-point values > 0")
        return
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise InvalidArgumentError(f"temperature must be a finite number > 0, got {temperature!r}")


def scale_rows(rows: torch.Tensor, temperature: float | torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Divide counted rows ``(n_counted, V)`` by a scalar temperature or by their per-position temperatures."""
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        per_row = select_counted(temperature, mask, trailing_dims=0).to(rows.dtype)  # (n_counted,)
        return rows / per_row[:, None]
    if not isinstance(temperature, torch.Tensor) and temperature == 1:
        return rows  # no (rows, V) copy, and no division in the backward
    return rows / temperature


def check_unit_interval(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise InvalidArgumentError(f"{name} must be in [0, 1], got {value!r}")


def check_mask(mask: torch.Tensor | None, leading_shape: torch.Size, what: str = "logits") -> torch.Tensor | None:
    """Validate a position mask against the leading shape of ``what``; returns it as bool, or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise InvalidArgumentError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(leading_shape):
        raise ShapeMismatchError(
            f"mask has shape {tuple(mask.shape)} but {what} have leading shape {tuple(leading_shape)} "
            "(mask must cover every position, without the vocabulary dimension)"
        )
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise InvalidArgumentError(f"mask must be bool (True = counted), got dtype {mask.dtype}")
        mask = mask != 0
    return mask


def align_vocab(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring student and teacher logits to one vocabulary size according to ``vocab_policy``.

    * ``"error"``: differing sizes raise :class:`VocabMismatchError` naming both.
    * ``"truncate"``: both are cut to the smaller size (the larger model's extra columns are dropped and its
      distribution renormalized over the shared ids; the usual recipe for Qwen-style padded vocabularies).
    * ``"pad"``: the smaller side gains columns equal to its own smallest finite logit at that position (detached),
      so a token a model lacks is as unlikely as its least likely token and no divergence becomes infinite.

    Both policies assume token id ``i`` means the same token in both vocabularies for the shared ids.
    """
    if vocab_policy not in VOCAB_POLICIES:
        raise InvalidArgumentError(
            f"vocab_policy={vocab_policy!r} is not one of {', '.join(map(repr, VOCAB_POLICIES))}"
        )
    student_vocab, teacher_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
    if student_vocab == teacher_vocab:
        return student_logits, teacher_logits
    if vocab_policy == "error":
        raise VocabMismatchError(
            f"student vocabulary has {student_vocab} entries but teacher vocabulary has {teacher_vocab}; "
            "choose vocab_policy='truncate' or 'pad' if token ids agree on the shared part, "
            "or a cross-tokenizer method if they do not"
        )
    if vocab_policy == "truncate":
        size = min(student_vocab, teacher_vocab)
        return student_logits[..., :size], teacher_logits[..., :size]
    if student_vocab < teacher_vocab:
        return _pad_with_row_min(student_logits, teacher_vocab), teacher_logits
    return student_logits, _pad_with_row_min(teacher_logits, student_vocab)


def _pad_with_row_min(logits: torch.Tensor, size: int) -> torch.Tensor:
    finite = torch.where(torch.isfinite(logits), logits, torch.full_like(logits, float("inf")))
    row_min = finite.amin(dim=-1, keepdim=True).detach()
    row_min = torch.where(torch.isfinite(row_min), row_min, torch.zeros_like(row_min))
    return torch.cat([logits, row_min.expand(*logits.shape[:-1], size - logits.shape[-1])], dim=-1)


def check_logit_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    for name, tensor in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(tensor, torch.Tensor):
            raise InvalidArgumentError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() < 1:
            raise ShapeMismatchError(f"{name} must have a vocabulary dimension, got a 0-d tensor")
        if not tensor.is_floating_point():
            raise InvalidArgumentError(f"{name} must be floating point, got dtype {tensor.dtype}")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ShapeMismatchError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "differ before the vocabulary dimension"
        )


def select_counted(tensor: torch.Tensor, mask: torch.Tensor | None, trailing_dims: int = 1) -> torch.Tensor:
    """Flatten the leading dims of ``tensor`` and keep the counted rows: ``(..., *rest) -> (n_counted, *rest)``."""
    rest = tensor.shape[tensor.dim() - trailing_dims :]
    flat = tensor.reshape(-1, *rest)
    if mask is None:
        return flat
    return flat[mask.reshape(-1)]


def reduce_positions(
    per_position: torch.Tensor,
    mask: torch.Tensor | None,
    leading_shape: torch.Size,
    reduction: str,
) -> torch.Tensor:
    """Reduce per-position values computed on counted rows only.

    Args:
        per_position: ``(n_counted,)`` values, one per counted position in row-major order.
        mask: bool ``leading_shape`` or None (all positions counted).
        leading_shape: the positions' shape ``(...)``.
        reduction: one of ``"mean"``, ``"sum"``, ``"batchmean"``, ``"none"``.
    """
    if reduction == "none":
        if mask is None:
            return per_position.reshape(leading_shape)
        out = per_position.new_zeros(mask.numel())
        out = out.masked_scatter(mask.reshape(-1), per_position)
        return out.reshape(leading_shape)
    total = per_position.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(per_position.numel(), 1)
    batch = leading_shape[0] if len(leading_shape) > 0 else 1
    return total / max(batch, 1)
