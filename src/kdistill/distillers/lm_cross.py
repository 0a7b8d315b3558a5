"""Causal-LM distillation between a teacher and a student with different tokenizers: ULD and offset alignment.

When the teacher tokenizes differently, each batch carries the teacher's own tokenization of the same records in
``batch["teacher"]`` (see :func:`kdistill.data.sft.render_sft`), and token id ``i`` means different strings on the two
sides, so no per-id divergence makes sense. :func:`cross_tokenizer_loss_sums` compares next-token distributions
by the shape of their sorted probabilities instead (the ULD distance of
:func:`kdistill.losses.cross_tokenizer.uld_loss`: Σ_j |sort↓(p_S)_j − sort↓(p_T)_j|), and pairs the two sides'
positions in one of two ways:

* ``"uld"`` (Universal Logit Distillation, Boizard et al., 2024): the i-th counted next-token position of the
  student (its completion tokens: ``labels[t + 1] != -100``, see :mod:`kdistill.core.shift`) is paired with the i-th
  counted position of the teacher, per example, up to the shorter count. That is what ULD does: it assumes the two
  tokenizations advance through the completion at about the same pace, and it ignores the positions one side has in
  excess.
* ``"align"``: the completion tokens of both sides are grouped into minimal spans covering the same characters of
  the completion text (:func:`~kdistill.losses.cross_tokenizer.align_by_offsets` on ``completion_offsets``, which
  ``render_sft(..., offsets=True)`` measures from the start of the assistant content, since the two chat templates
  render different prompts around it). Each group is compared once, at the positions that predict the group's
  *first* token: there both models have read exactly the same text and are about to emit the same characters, so
  their distributions over "the next piece of text" are comparable. At the position predicting the group's last
  token the two models would have read different amounts of the group (the student one word, the teacher two of
  its three pieces), and after the last token they predict text that may start a different group on each side.
  A group whose first token is the first token of the sequence has no position predicting it and is left out.

The unit of the KD sum is one paired position (``"uld"``) or one aligned group (``"align"``), ``"aligned_pairs"``
as for the engine's :class:`~kdistill.distillers.cross.CrossTokenizerDistiller`: :func:`aligned_pair_count` counts
them from the labels and offsets alone, before any forward, and the caller divides the KD sum by their global count
over the optimizer step and all processes (the hard-label term keeps the student's counted next tokens). So gradient
accumulation stays exact, and the KD term reads "ULD distance per paired position". Temperature divides both sides'
logits; no T² inside (the caller's objective applies it when configured, as for a same-tokenizer divergence).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdistill.core.shift import IGNORE_INDEX, counted_next_tokens, next_token_labels
from kdistill.data.sft import COMPLETION_OFFSETS
from kdistill.distillers.kd_terms import CountsPositions, KDStrategy, Logits, Side
from kdistill.distillers.lm_heads import causal_lm_inputs
from kdistill.distillers.lm_loss import LMLossSums
from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.losses import token_cross_entropy
from kdistill.losses.cross_tokenizer import align_by_offsets, uld_loss

CROSS_TOKENIZER_METHODS = ("uld", "align")
UNIT = "aligned_pairs"  # what the cross-tokenizer KD sum counts: paired positions (uld) or aligned groups (align)


def check_method(method: Any, name: str = "cross_tokenizer") -> None:
    if method not in CROSS_TOKENIZER_METHODS:
        raise InvalidArgumentError(
            f"{name}={method!r} is not one of {', '.join(map(repr, CROSS_TOKENIZER_METHODS))} (or None)"
        )


def _teacher_side(inputs: Mapping[str, Any]) -> tuple[Mapping[str, Any], torch.Tensor]:
    """The teacher's own tokenization of a cross-tokenizer batch (``inputs["teacher"]``) and its labels."""
    teacher_inputs = inputs.get("teacher")
    if not isinstance(teacher_inputs, Mapping):
        raise InvalidArgumentError(
            "a cross-tokenizer batch needs the teacher's own tokenization in 'teacher' (input_ids, "
            "attention_mask, labels); render the records with kdistill.data.sft.render_sft(teacher_tokenizer=...)"
        )
    return teacher_inputs, _labels(teacher_inputs, "inputs['teacher']")


def _labels(inputs: Mapping[str, Any], where: str) -> torch.Tensor:
    labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise InvalidArgumentError(
            f"{where} must carry 'labels' of shape (batch, sequence) with -100 where nothing is learned"
        )
    return labels


def cross_tokenizer_loss_sums(
    student: nn.Module,
    teacher: nn.Module | None,
    inputs: Mapping[str, Any],
    *,
    method: str = "uld",
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    hard_weight: float = 0.0,
    strategy: KDStrategy | None = None,
) -> LMLossSums:
    """The KD and CE terms of causal-LM distillation across tokenizers, as sums (see the module docstring).

    Args:
        student: the student causal LM (its parameters get gradients).
        teacher: the teacher causal LM, run on ``inputs["teacher"]`` under ``torch.no_grad()`` in eval mode; None
            only when ``kd_weight == 0``.
        inputs: the student's ``input_ids``, ``attention_mask``, ``labels`` ``(B, T_s)`` and ``teacher``: the
            teacher's ``input_ids``, ``attention_mask``, ``labels`` ``(B, T_t)`` for the same records. ``"align"``
            also needs ``completion_offsets`` on both sides (one list of ``[start, end]`` per row and token).
        method: ``"uld"`` or ``"align"``.
        temperature: divides both sides' logits.
        kd_weight, hard_weight: a zero skips its term.
        strategy: the KD strategy (default: :class:`LMAlignedKD` of ``method``).

    Returns:
        :class:`~kdistill.distillers.lm_loss.LMLossSums` whose ``count`` is the student's counted next tokens (the
        unit of ``hard_sum``, the student's next-token cross-entropy), ``kd_sum`` the summed ULD distance over pairs
        or groups (their count is :func:`aligned_pair_count`).

    Raises:
        InvalidArgumentError: an unknown method, a missing teacher, or a batch without the teacher's tokenization or
            the offsets ``"align"`` needs (naming the key).
        ShapeMismatchError: offsets that do not fit their rows, or teacher and student batches of different sizes.
    """
    check_method(method, "method")
    labels = _labels(inputs, "inputs")
    want_kd, want_hard = kd_weight != 0, hard_weight != 0
    student_logits = student(**causal_lm_inputs(inputs), use_cache=False).logits  # (B, T_s, V_s)
    kd_sum = hard_sum = None
    if want_kd:
        if teacher is None:
            raise InvalidArgumentError("teacher is None but the KD term (kd_weight != 0) needs a teacher")
        teacher_inputs, teacher_labels = _teacher_side(inputs)
        if teacher_labels.shape[0] != labels.shape[0]:
            raise ShapeMismatchError(
                f"the teacher's batch has {teacher_labels.shape[0]} rows but the student's {labels.shape[0]}"
            )
        if teacher.training:
            teacher.eval()
        with torch.no_grad():
            teacher_logits = teacher(**causal_lm_inputs(teacher_inputs), use_cache=False).logits  # (B, T_t, V_t)
        strategy = strategy or LMAlignedKD(method)
        kd_sum = strategy.values(Logits(student_logits), Logits(teacher_logits), None, temperature, inputs)
    if want_hard:
        hard_sum = token_cross_entropy(student_logits, next_token_labels(labels), reduction="sum")
    count = int(counted_next_tokens(labels).sum())
    return LMLossSums(kd_sum=kd_sum, hard_sum=hard_sum, count=count, student_logits=student_logits)


def _offsets(inputs: Mapping[str, Any], where: str) -> Sequence[Any]:
    offsets = inputs.get(COMPLETION_OFFSETS)
    if offsets is None:
        raise InvalidArgumentError(
            f"cross_tokenizer='align' needs {where}[{COMPLETION_OFFSETS!r}] (each token's characters in the "
            "completion); render the records with kdistill.data.sft.render_sft(..., offsets=True)"
        )
    return offsets


def uld_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_labels: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Σ over paired positions of the ULD distance: each side's counted next-token positions paired in order per
    row, up to the shorter count (teacher detached)."""
    student_mask = counted_next_tokens(student_labels.to(student_logits.device))
    teacher_mask = counted_next_tokens(teacher_labels.to(teacher_logits.device))
    return uld_loss(
        student_logits, teacher_logits, student_mask, teacher_mask, temperature=temperature, reduction="sum"
    )


def aligned_positions(
    student_labels: Sequence[int],
    teacher_labels: Sequence[int],
    student_offsets: Sequence[Sequence[int]],
    teacher_offsets: Sequence[Sequence[int]],
) -> list[tuple[int, int]]:
    """``(student position, teacher position)`` per aligned group of one row: the positions predicting its first
    token.

    Only completion tokens (label != -100) take part: the others' offsets are replaced by ``(0, 0)``, which
    :func:`~kdistill.losses.cross_tokenizer.align_by_offsets` ignores. ``student_labels`` may be longer than the
    offsets (right padding); the row's tokens are its first ``len(student_offsets)``.
    """
    spans = []
    for name, labels, offsets in (
        ("student", student_labels, student_offsets),
        ("teacher", teacher_labels, teacher_offsets),
    ):
        if len(offsets) > len(labels):
            raise ShapeMismatchError(
                f"the {name} row has {len(offsets)} completion offsets but only {len(labels)} positions"
            )
        spans.append(
            [tuple(span) if label != IGNORE_INDEX else (0, 0) for span, label in zip(offsets, labels, strict=False)]
        )
    groups = align_by_offsets(spans[0], spans[1])
    return [(s[0] - 1, t[0] - 1) for s, t in groups if s[0] >= 1 and t[0] >= 1]


def aligned_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_labels: torch.Tensor,
    student_offsets: Sequence[Sequence[Sequence[int]]],
    teacher_offsets: Sequence[Sequence[Sequence[int]]],
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Σ over aligned groups of the ULD distance between the distributions predicting each group's first token."""
    batch = student_logits.shape[0]
    if len(student_offsets) != batch or len(teacher_offsets) != batch:
        raise ShapeMismatchError(
            f"{len(student_offsets)} student and {len(teacher_offsets)} teacher offset lists for a batch of {batch}"
        )
    student_rows: list[int] = []
    teacher_rows: list[int] = []
    student_len, teacher_len = student_logits.shape[1], teacher_logits.shape[1]
    for b in range(batch):
        pairs = aligned_positions(
            student_labels[b].tolist(), teacher_labels[b].tolist(), student_offsets[b], teacher_offsets[b]
        )
        student_rows += [b * student_len + s for s, _ in pairs]
        teacher_rows += [b * teacher_len + t for _, t in pairs]
    if not student_rows:
        return student_logits.sum() * 0.0  # keeps the graph: a batch without groups contributes nothing
    student_index = torch.tensor(student_rows, dtype=torch.long, device=student_logits.device)
    teacher_index = torch.tensor(teacher_rows, dtype=torch.long, device=teacher_logits.device)
    picked_student = student_logits.reshape(-1, student_logits.shape[-1]).index_select(0, student_index)
    picked_teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1]).index_select(0, teacher_index)
    # one (n, V) "sequence" per side, paired row by row: uld_loss with every position counted
    return uld_loss(picked_student, picked_teacher.to(picked_student.device), temperature=temperature, reduction="sum")


def aligned_pair_count(inputs: Mapping[str, Any], method: str) -> int:
    """The units of the cross-tokenizer KD sum in a batch, from labels and offsets alone (no forward).

    ``"uld"``: per row, the smaller of the two sides' counted next-token positions; ``"align"``: the aligned groups
    of every row that :func:`aligned_positions` compares.

    Raises:
        InvalidArgumentError: an unknown method, or a batch without the teacher's tokenization or offsets.
    """
    check_method(method, "method")
    labels = _labels(inputs, "inputs")
    teacher_inputs, teacher_labels = _teacher_side(inputs)
    if method == "uld":
        student_counts = counted_next_tokens(labels).sum(-1)  # (B,)
        teacher_counts = counted_next_tokens(teacher_labels).sum(-1).to(student_counts.device)  # (B,)
        return int(torch.minimum(student_counts, teacher_counts).sum())
    student_offsets, teacher_offsets = _offsets(inputs, "inputs"), _offsets(teacher_inputs, "inputs['teacher']")
    return sum(
        len(aligned_positions(labels[b].tolist(), teacher_labels[b].tolist(), student_offsets[b], teacher_offsets[b]))
        for b in range(labels.shape[0])
    )


class LMAlignedKD:
    """The cross-tokenizer KD strategy of causal LMs: the ULD distance between each side's next-token
    distributions at paired positions (``"uld"``) or at the first token of each aligned group (``"align"``); its
    unit is ``"aligned_pairs"``, counted by :func:`aligned_pair_count`. Both sides' labels (and offsets) come from
    the batch: the student's, and the teacher's own tokenization in ``batch["teacher"]``."""

    name = "cross_tokenizer"
    unit = UNIT

    def __init__(self, method: str) -> None:
        check_method(method, "method")
        self.method = method

    def count(self, batch: Mapping[str, Any], view: CountsPositions) -> float:
        return float(aligned_pair_count(batch, self.method))

    def values(
        self,
        student: Side,
        teacher: Side,
        mask: torch.Tensor | None,
        temperature: float | torch.Tensor,
        batch: Mapping[str, Any],
    ) -> torch.Tensor:
        if not isinstance(student, Logits) or not isinstance(teacher, Logits):
            raise InvalidArgumentError("cross-tokenizer KD needs both models' logits")
        labels = _labels(batch, "inputs")
        teacher_inputs, teacher_labels = _teacher_side(batch)
        if self.method == "uld":
            return uld_sum(student.value, teacher.value, labels, teacher_labels, temperature=float(temperature))
        return aligned_sum(
            student.value,
            teacher.value,
            labels,
            teacher_labels,
            _offsets(batch, "inputs"),
            _offsets(teacher_inputs, "inputs['teacher']"),
            temperature=float(temperature),
        )
