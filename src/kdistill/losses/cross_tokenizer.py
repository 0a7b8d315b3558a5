"""Distillation between a student and a teacher with different tokenizers.

When the two models do not share a vocabulary, token id ``i`` means different strings on the two sides and no
per-id divergence makes sense. Two tools here:

* :func:`uld_loss`, Universal Logit Distillation (Boizard et al., 2024): positions are paired by order (the i-th
  counted student position with the i-th counted teacher position, up to the shorter count), and each side's
  probabilities are sorted in descending order, the shorter vocabulary padded with zeros, and compared by their L1
  distance. That is the closed-form Wasserstein-1 distance ULD uses; it only compares the *shapes* of the two
  distributions, so it needs no mapping between vocabularies.
* :func:`align_by_offsets` groups the two tokenizations of one text into minimal spans covering the same characters,
  and :func:`aligned_distillation_loss` compares the two models once per group (by the ULD distance, or by any
  registered divergence when both models share one output space). This pairs positions by the text they cover
  instead of by their index, which is what a split word (``"unbelievable"`` vs ``"un" "believ" "able"``) needs.
  A group is read at one token per side, the same on both: its ``"last"`` token (the default: the position whose
  prediction follows the whole span, right for language models) or its ``"first"`` token (right for token
  classification, where a word's tag sits on its first piece, and a merged span of several words starts with the
  word whose tag opens it).

The teacher is detached in the ULD distance: gradients reach the student only. Temperatures divide both sides'
logits; no T² factor inside.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kdistill.errors import InvalidArgumentError, ShapeMismatchError, VocabMismatchError
from kdistill.losses._common import check_mask, check_reduction, check_temperature, compute_dtype, reduce_positions
from kdistill.losses._lookup import LOSSES

Offsets = Sequence[tuple[int, int]] | Sequence[Sequence[int]] | torch.Tensor
Group = tuple[list[int], list[int]]
POSITIONS = ("last", "first")  # which token of an aligned group stands for it, on both sides


def _check_position(position: str) -> None:
    if position not in POSITIONS:
        raise InvalidArgumentError(f"position must be one of {', '.join(map(repr, POSITIONS))}, got {position!r}")


def _uld_rows(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
    """ULD distance per row between temperature-scaled logits ``(n, V_s)`` and ``(n, V_t)``.

    Σ_j |sort↓(p_S)_j − sort↓(p_T)_j| with the shorter sorted vector padded by zeros.
    """
    student_p = torch.softmax(student_rows, dim=-1).sort(dim=-1, descending=True).values
    teacher_p = torch.softmax(teacher_rows, dim=-1).sort(dim=-1, descending=True).values
    size = max(student_p.shape[-1], teacher_p.shape[-1])
    student_p = torch.nn.functional.pad(student_p, (0, size - student_p.shape[-1]))
    teacher_p = torch.nn.functional.pad(teacher_p, (0, size - teacher_p.shape[-1]))
    return (student_p - teacher_p).abs().sum(-1)


def _check_floating(name: str, tensor: Any, dims: tuple[int, ...]) -> None:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise InvalidArgumentError(f"{name} must be a floating-point tensor")
    if tensor.dim() not in dims:
        shapes = " or ".join({2: "(T, V)", 3: "(B, T, V)"}[d] for d in dims)
        raise ShapeMismatchError(f"{name} has shape {tuple(tensor.shape)} but must be {shapes}")


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_mask: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Universal Logit Distillation loss between models with any two vocabularies.

    Args:
        student_logits: ``(B, T_s, V_s)`` or one sequence ``(T_s, V_s)``.
        teacher_logits: ``(B, T_t, V_t)`` or ``(T_t, V_t)``; ``T_t``/``V_t`` may differ from the student's.
        student_mask: bool ``(B, T_s)`` (or ``(T_s,)``), True = counted; None counts every position.
        teacher_mask: bool ``(B, T_t)`` (or ``(T_t,)``), likewise.
        temperature: both sides' logits are divided by it before the softmax.
        reduction: ``"mean"`` over paired positions, ``"sum"``, ``"batchmean"`` (sum / B, B = 1 for one sequence),
            ``"none"``: the student's positions' shape, each paired position holding its distance, 0 elsewhere.

    Per row, the i-th counted student position is paired with the i-th counted teacher position; counted positions
    beyond the shorter count are left out. The teacher is detached.
    """
    _check_floating("student_logits", student_logits, (2, 3))
    _check_floating("teacher_logits", teacher_logits, (2, 3))
    if student_logits.dim() != teacher_logits.dim():
        raise ShapeMismatchError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must both be batched (B, T, V) or both one sequence (T, V)"
        )
    check_reduction(reduction)
    check_temperature(temperature)
    single = student_logits.dim() == 2
    if single:
        student_logits, teacher_logits = student_logits[None], teacher_logits[None]
        student_mask = student_mask[None] if isinstance(student_mask, torch.Tensor) else student_mask
        teacher_mask = teacher_mask[None] if isinstance(teacher_mask, torch.Tensor) else teacher_mask
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ShapeMismatchError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "have different batch sizes"
        )
    batch, student_len, student_vocab = student_logits.shape
    _, teacher_len, teacher_vocab = teacher_logits.shape
    student_mask = check_mask(student_mask, student_logits.shape[:-1], what="student_logits")
    teacher_mask = check_mask(teacher_mask, teacher_logits.shape[:-1], what="teacher_logits")
    if student_mask is None:
        student_mask = torch.ones(batch, student_len, dtype=torch.bool, device=student_logits.device)
    if teacher_mask is None:
        teacher_mask = torch.ones(batch, teacher_len, dtype=torch.bool, device=teacher_logits.device)

    # pair the i-th counted student position with the i-th counted teacher position, row by row
    student_rank = student_mask.long().cumsum(-1)  # 1-based rank of each counted position
    teacher_count = teacher_mask.long().sum(-1, keepdim=True)
    paired = student_mask & (student_rank <= teacher_count)  # (B, T_s)
    student_count = student_mask.long().sum(-1, keepdim=True)
    teacher_rank = teacher_mask.long().cumsum(-1)
    teacher_paired = teacher_mask & (teacher_rank <= student_count)  # (B, T_t), same count per row, same order

    dtype = compute_dtype(student_logits, teacher_logits)
    student_rows = student_logits.reshape(-1, student_vocab)[paired.reshape(-1)].to(dtype)
    teacher_rows = teacher_logits.detach().reshape(-1, teacher_vocab)[teacher_paired.reshape(-1)].to(dtype)
    if temperature != 1:
        student_rows, teacher_rows = student_rows / temperature, teacher_rows / temperature
    per_position = _uld_rows(student_rows, teacher_rows)  # (n_pairs,)
    out = reduce_positions(per_position, paired, paired.shape, reduction)
    return out[0] if single and reduction == "none" else out


# ---------------------------------------------------------------- alignment by character offsets


def _as_spans(offsets: Offsets, name: str) -> list[tuple[int, int]]:
    rows = offsets.tolist() if isinstance(offsets, torch.Tensor) else list(offsets)
    spans = []
    for index, row in enumerate(rows):
        if len(row) != 2:
            raise ShapeMismatchError(f"{name}[{index}] is {row!r}, but every offset must be a (start, end) pair")
        start, end = int(row[0]), int(row[1])
        if start < 0 or end < start:
            raise InvalidArgumentError(f"{name}[{index}] is ({start}, {end}); need 0 <= start <= end")
        spans.append((start, end))
    return spans


def _counted(spans: list[tuple[int, int]], name: str) -> list[int]:
    """Indices of the tokens that cover text (start < end); their ends must not decrease."""
    kept = [i for i, (start, end) in enumerate(spans) if end > start]
    for previous, current in itertools.pairwise(kept):
        if spans[current][1] < spans[previous][1]:
            raise InvalidArgumentError(
                f"{name}[{current}] = {spans[current]} ends before {name}[{previous}] = {spans[previous]}; "
                "offsets must follow the text in order"
            )
    return kept


def align_by_offsets(student_offsets: Offsets, teacher_offsets: Offsets) -> list[Group]:
    """Group two tokenizations of the same text into minimal spans that end at the same character.

    Args:
        student_offsets: per student token, its character span ``(start, end)`` (a list of pairs or an ``(N, 2)``
            tensor, as a fast tokenizer's ``return_offsets_mapping`` gives). Tokens with ``start == end`` (special
            tokens, whose span is ``(0, 0)``) are ignored.
        teacher_offsets: the same for the teacher's tokens.

    Returns:
        ``[(student_indices, teacher_indices), ...]`` in text order, indices into the given token lists. Each
        counted token is in exactly one group and every group has at least one token per side. Tokens whose spans
        are equal form 1:1 groups; elsewhere a group grows, on the side whose span ends first, until both sides'
        last tokens end at the same character (leading whitespace that one tokenizer puts in a token and the other
        does not is therefore harmless). Tokens that end no later than a group's end (several byte-level pieces of
        one character share its span) join that group. Tokens left on one side when the other runs out (the texts
        differ at the end) join the last group.
    """
    student_spans = _as_spans(student_offsets, "student_offsets")
    teacher_spans = _as_spans(teacher_offsets, "teacher_offsets")
    student_kept = _counted(student_spans, "student_offsets")
    teacher_kept = _counted(teacher_spans, "teacher_offsets")
    groups: list[Group] = []
    i = j = 0
    while i < len(student_kept) and j < len(teacher_kept):
        student_group, teacher_group = [student_kept[i]], [teacher_kept[j]]
        student_end, teacher_end = student_spans[student_kept[i]][1], teacher_spans[teacher_kept[j]][1]
        i, j = i + 1, j + 1
        while student_end != teacher_end:
            if student_end < teacher_end:
                if i == len(student_kept):
                    break
                student_group.append(student_kept[i])
                student_end = student_spans[student_kept[i]][1]
                i += 1
            else:
                if j == len(teacher_kept):
                    break
                teacher_group.append(teacher_kept[j])
                teacher_end = teacher_spans[teacher_kept[j]][1]
                j += 1
        end = max(student_end, teacher_end)
        while i < len(student_kept) and student_spans[student_kept[i]][1] <= end:
            student_group.append(student_kept[i])
            i += 1
        while j < len(teacher_kept) and teacher_spans[teacher_kept[j]][1] <= end:
            teacher_group.append(teacher_kept[j])
            j += 1
        groups.append((student_group, teacher_group))
    if groups:
        groups[-1][0].extend(student_kept[i:])
        groups[-1][1].extend(teacher_kept[j:])
    return groups


def _resolve_method(method: str | Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor] | None:
    """None for ULD; otherwise the divergence ``method`` names in :data:`~kdistill.losses.LOSSES` (or is)."""
    if method == "uld":
        return None
    if callable(method):
        return method
    if not isinstance(method, str):
        raise InvalidArgumentError(f"method must be 'uld' or a divergence name, got {method!r}")
    entry = LOSSES.entry(method) if method in LOSSES else None
    if entry is None or entry.kind != "divergence":
        raise InvalidArgumentError(
            f"method={method!r} is neither 'uld' nor a registered divergence ({', '.join(LOSSES.names('divergence'))})"
        )
    return entry.obj


def _aligned_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_offsets: Offsets,
    teacher_offsets: Offsets,
    method: str | Callable[..., torch.Tensor],
    temperature: float,
    kwargs: dict[str, Any],
    position: str = "last",
) -> torch.Tensor:
    """Per-group distances ``(n_groups,)`` for one sequence pair, each group read at its ``position`` token."""
    _check_floating("student_logits", student_logits, (2,))
    _check_floating("teacher_logits", teacher_logits, (2,))
    for name, logits, offsets in (
        ("student", student_logits, student_offsets),
        ("teacher", teacher_logits, teacher_offsets),
    ):
        if len(offsets) != logits.shape[0]:
            raise ShapeMismatchError(
                f"{name}_offsets has {len(offsets)} spans but {name}_logits {tuple(logits.shape)} has "
                f"{logits.shape[0]} positions"
            )
    fn = _resolve_method(method)
    if fn is not None and student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise VocabMismatchError(
            f"student vocabulary has {student_logits.shape[-1]} entries but teacher vocabulary has "
            f"{teacher_logits.shape[-1]}; method={method!r} needs one shared vocabulary, use method='uld'"
        )
    groups = align_by_offsets(student_offsets, teacher_offsets)
    device = student_logits.device
    pick = -1 if position == "last" else 0
    student_index = torch.tensor([g[0][pick] for g in groups], dtype=torch.long, device=device)
    teacher_index = torch.tensor([g[1][pick] for g in groups], dtype=torch.long, device=teacher_logits.device)
    dtype = compute_dtype(student_logits, teacher_logits)
    student_rows = student_logits[student_index].to(dtype)
    teacher_rows = teacher_logits[teacher_index].to(dtype)
    if fn is None:
        return _uld_rows(student_rows / temperature, teacher_rows.detach() / temperature)
    return fn(student_rows, teacher_rows, temperature=temperature, reduction="none", **kwargs)


def aligned_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_offsets: Offsets,
    teacher_offsets: Offsets,
    *,
    method: str | Callable[..., torch.Tensor] = "uld",
    temperature: float = 1.0,
    reduction: str = "mean",
    position: str = "last",
    **kwargs: Any,
) -> torch.Tensor:
    """Distillation over the minimal aligned spans of ONE sequence pair (see :func:`align_by_offsets`).

    Each aligned group is scored at one token per side, its last by default: the token whose prediction follows
    the whole span, so both models are predicting what comes after the same text. Token classification reads the
    first token instead (``position="first"``), where the tag of the group's first word sits.

    Args:
        student_logits: ``(T_s, V_s)``, one row per student token (``len(student_offsets) == T_s``).
        teacher_logits: ``(T_t, V_t)``, one row per teacher token.
        student_offsets: character spans of the student tokens; ``(0, 0)`` marks special tokens.
        teacher_offsets: character spans of the teacher tokens.
        method: ``"uld"`` (sorted-probability L1, any two vocabularies; teacher detached) or the name of a
            registered divergence (or a divergence callable), which needs ``V_s == V_t`` and the same token ids.
        temperature: both sides' logits are divided by it.
        reduction: ``"mean"`` over groups (0 when there are none), ``"sum"``, ``"batchmean"`` (= sum: one
            sequence), ``"none"`` ``(n_groups,)``.
        position: ``"last"`` or ``"first"``: the token of each group (on both sides) whose logits stand for it.
        **kwargs: passed to the divergence (``beta``, ``skew``).
    """
    check_reduction(reduction)
    check_temperature(temperature)
    _check_position(position)
    per_group = _aligned_rows(
        student_logits, teacher_logits, student_offsets, teacher_offsets, method, temperature, kwargs, position
    )
    if reduction == "none":
        return per_group
    return reduce_positions(per_group, None, torch.Size([1, per_group.shape[0]]), reduction)


def aligned_distillation_loss_batch(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_offsets: Sequence[Offsets],
    teacher_offsets: Sequence[Offsets],
    *,
    method: str | Callable[..., torch.Tensor] = "uld",
    temperature: float = 1.0,
    reduction: str = "mean",
    position: str = "last",
    **kwargs: Any,
) -> torch.Tensor:
    """:func:`aligned_distillation_loss` over the rows of a batch (a Python loop; alignment is per text anyway).

    Args:
        student_logits: ``(B, T_s, V_s)``; row ``b`` uses its first ``len(student_offsets[b])`` positions (the rest
            is right padding).
        teacher_logits: ``(B, T_t, V_t)``; likewise with ``teacher_offsets``.
        student_offsets: ``B`` offset lists, one per row.
        teacher_offsets: ``B`` offset lists.
        reduction: ``"mean"`` over all groups of all rows, ``"sum"``, or ``"batchmean"`` (sum / B).
        method, temperature, position, **kwargs: as in :func:`aligned_distillation_loss`.
    """
    check_reduction(reduction, ("mean", "sum", "batchmean"))
    check_temperature(temperature)
    _check_position(position)
    _check_floating("student_logits", student_logits, (3,))
    _check_floating("teacher_logits", teacher_logits, (3,))
    batch = student_logits.shape[0]
    if teacher_logits.shape[0] != batch or len(student_offsets) != batch or len(teacher_offsets) != batch:
        raise ShapeMismatchError(
            f"student_logits {tuple(student_logits.shape)}, teacher_logits {tuple(teacher_logits.shape)}, "
            f"{len(student_offsets)} student and {len(teacher_offsets)} teacher offset lists must agree on the batch"
        )
    pieces = []
    for b in range(batch):
        student_len, teacher_len = len(student_offsets[b]), len(teacher_offsets[b])
        if student_len > student_logits.shape[1] or teacher_len > teacher_logits.shape[1]:
            raise ShapeMismatchError(
                f"row {b} has {student_len} student and {teacher_len} teacher spans but the logits hold "
                f"{student_logits.shape[1]} and {teacher_logits.shape[1]} positions"
            )
        pieces.append(
            _aligned_rows(
                student_logits[b, :student_len],
                teacher_logits[b, :teacher_len],
                student_offsets[b],
                teacher_offsets[b],
                method,
                temperature,
                kwargs,
                position,
            )
        )
    per_group = torch.cat(pieces) if pieces else student_logits.new_zeros(0)
    return reduce_positions(per_group, None, torch.Size([batch, per_group.shape[0]]), reduction)
