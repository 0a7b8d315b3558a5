"""Token-level distillation between a teacher and a student that tokenize the same text differently.

:class:`CrossTokenizerDistiller` is a :class:`~kdistill.distillers.core.Distiller` whose KD term pairs two
tokenizations instead of comparing position ``i`` with position ``i``; the hard-label term, the teacher's forward
and the engine's contract are the Distiller's own. Each batch carries both sides' inputs (``batch["student"]``,
``batch["teacher"]``) with each token's character span in the text (``offset_mapping`` ``(B, T, 2)``, ``(0, 0)``
for special and padding tokens), as :class:`~kdistill.tasks.token.TokenClassificationTask` makes them with
``cross_tokenizer`` set. The counted tokens of a side are those that cover text (start < end).

Two methods (``distill.cross_tokenizer``):

* ``"uld"`` — Universal Logit Distillation (:func:`~kdistill.losses.cross_tokenizer.uld_loss`): per row the i-th
  counted student token is paired with the i-th counted teacher token (up to the shorter count) and compared by the
  L1 distance of their sorted probabilities. It needs no relation between the two output spaces; it ignores
  ``distill.kd_loss``.
* ``"align"`` — tokens grouped by the characters they cover
  (:func:`~kdistill.losses.cross_tokenizer.align_by_offsets`): equal spans give 1:1 groups; where the tokenizers cut
  a span differently, a group merges the tokens of both sides until they end at the same character. Each group is
  compared once, by the run's ``distill.kd_loss`` (forward KL, ...; both sides predict the task's labels, so the
  output spaces are one), between the logits of its *first* token on each side: under the first-piece labelling
  of token classification that is where the tag of the group's (first) word sits, so a word split into pieces is
  read where the teacher was trained to tag it, exactly as the word-level student's first-piece alignment does.

The KD term is a sum over its units, like every term of the engine: the paired positions (``"uld"``) or the
aligned groups (``"align"``), counted by :meth:`CrossTokenizerDistiller.count_units` as ``"aligned_pairs"`` before
any forward, so the loop's global normalization (accumulation, processes) applies unchanged. Temperature ``T``
divides both sides' logits, and the sum is multiplied by ``T²`` when ``distill.t2_scaling`` is on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from kdistill.core.views import SequenceView, TokenView, student_inputs, teacher_inputs
from kdistill.distillers.core import Distiller
from kdistill.distillers.kd_terms import CountsPositions, Logits, Side
from kdistill.distillers.objective import Objective, TermValue
from kdistill.errors import InvalidArgumentError, KdistillError, ShapeMismatchError
from kdistill.losses.cross_tokenizer import align_by_offsets, aligned_distillation_loss_batch, uld_loss

METHODS = ("uld", "align")
UNIT = "aligned_pairs"  # ULD's paired positions, or the aligned groups


class CrossTokenizerDistiller(Distiller):
    """One live teacher and a student with another tokenizer, on a token-level task.

    Args:
        student: the model being trained; its logits are ``(B, T_s, C)``.
        teacher: one frozen model, run on ``batch["teacher"]`` at its own positions; logits ``(B, T_t, C')``
            (``C' == C`` for ``"align"``).
        objective: the weighted terms; the KD term is computed as described in the module docstring.
        method: ``"uld"`` or ``"align"``.
        view: the task's view (token-level); inferred from the student's logits when None.

    Raises:
        InvalidArgumentError: an unknown method, a teacher that is not one model, intermediate matches (the two
            models' hidden states have no common positions), per-position temperatures (flsw, cwsm: they need one
            position per pair of logits), or a sequence-level view.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        objective: Objective,
        *,
        method: str,
        view: TokenView | None = None,
    ) -> None:
        if method not in METHODS:
            raise InvalidArgumentError(f"distill.cross_tokenizer must be 'uld' or 'align', got {method!r}")
        if not isinstance(teacher, nn.Module):
            raise InvalidArgumentError(
                f"distill.cross_tokenizer pairs one teacher's tokens with the student's; got {type(teacher).__name__}"
                " (extra_teachers, 'ema' and 'self' are not available with it)"
            )
        if objective.matches:
            names = ", ".join(repr(m.name) for m in objective.matches)
            raise InvalidArgumentError(
                f"distill.cross_tokenizer: intermediate matches ({names}; distill.matches / distill.layer_map) need "
                "one tokenization, since the two models' hidden states have no common positions; remove them"
            )
        if objective.temperature.per_position is not None:
            raise InvalidArgumentError(
                "distill.temperature: per-position temperatures (flsw, cwsm) need one position per pair of logits; "
                "with distill.cross_tokenizer give a number or a schedule"
            )
        if isinstance(view, SequenceView):
            raise InvalidArgumentError(
                "distill.cross_tokenizer is for token-level tasks; sequence classification needs no pairing of tokens"
            )
        super().__init__(student, teacher, objective, view=view)
        self.method = method
        self.kd_strategy = AlignedKD(method, objective.kd_loss, objective.kd_kwargs)

    def _terms_from(
        self,
        outputs: Any,
        student_features: Mapping[str, torch.Tensor],
        teacher_features: Mapping[str, torch.Tensor],
        teacher_logits: list[list[torch.Tensor]] | None,
        batch: Mapping[str, Any],
        weights: Mapping[str, float],
        step: int,
        total_steps: int,
    ) -> dict[str, TermValue]:
        # every term but KD is the Distiller's (hard labels follow the student's own tokens)
        terms = super()._terms_from(
            outputs, student_features, teacher_features, None, batch, {**weights, "kd": 0.0}, step, total_steps
        )
        if weights.get("kd", 0.0) != 0.0:
            if teacher_logits is None:
                raise KdistillError("the KD term has weight > 0 but the teacher gave no logits")
            [student_head] = self._student_logits(outputs)
            terms = {"kd": self.cross_kd_term(student_head, teacher_logits[0][0], batch, step, total_steps), **terms}
        return terms

    def cross_kd_term(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        batch: Mapping[str, Any],
        step: int = 0,
        total_steps: int = 1,
    ) -> TermValue:
        """The KD term of one micro-batch: the sum over ``"aligned_pairs"`` (× T² when configured).

        Args:
            student_logits: ``(B, T_s, C)`` at the student's tokens.
            teacher_logits: ``(B, T_t, C')`` at the teacher's tokens.
            batch: the batch, with both sides' ``offset_mapping``.
        """
        for name, logits in (("student", student_logits), ("teacher", teacher_logits)):
            if logits.dim() != 3:
                raise ShapeMismatchError(
                    f"distill.cross_tokenizer needs token-level logits (B, T, C); the {name}'s are "
                    f"{tuple(logits.shape)}"
                )
        student_offsets, teacher_offsets = _offsets(batch)
        for name, logits, offsets in (
            ("student", student_logits, student_offsets),
            ("teacher", teacher_logits, teacher_offsets),
        ):
            if tuple(offsets.shape[:2]) != tuple(logits.shape[:2]):
                raise ShapeMismatchError(
                    f"batch['{name}']['offset_mapping'] is {tuple(offsets.shape)} but the {name}'s logits are "
                    f"{tuple(logits.shape)}: one span per token is needed"
                )
        temperature = self.objective.temperature_at(step, total_steps, student_logits, teacher_logits)
        return self.objective.kd_from(
            self.kd_strategy, Logits(student_logits), Logits(teacher_logits), None, temperature, batch
        )


class AlignedKD:
    """The cross-tokenizer KD strategy of token-level encoder tasks (see the module docstring): ULD over paired
    tokens, or the run's divergence over groups aligned by characters; its unit is ``"aligned_pairs"``."""

    name = "cross_tokenizer"
    unit = UNIT

    def __init__(
        self, method: str, divergence: str | Callable[..., torch.Tensor], kd_kwargs: Mapping[str, Any] | None
    ) -> None:
        self.method = method
        self.divergence = divergence
        self.kd_kwargs = {k: v for k, v in (kd_kwargs or {}).items() if k != "vocab_policy"}

    def count(self, batch: Mapping[str, Any], view: CountsPositions) -> float:
        """ULD: per row the smaller count of text-covering tokens; align: the aligned groups (no forward)."""
        student_offsets, teacher_offsets = _offsets(batch)
        if self.method == "uld":
            pairs = torch.minimum(_covers_text(student_offsets).sum(-1), _covers_text(teacher_offsets).sum(-1))
            return float(pairs.sum())
        return float(sum(len(align_by_offsets(s, t)) for s, t in zip(student_offsets, teacher_offsets, strict=True)))

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
        student_logits, teacher_logits = student.value, teacher.value
        student_offsets, teacher_offsets = _offsets(batch)
        student_offsets = student_offsets.to(student_logits.device)
        teacher_offsets = teacher_offsets.to(teacher_logits.device)
        if self.method == "uld":
            return uld_loss(
                student_logits,
                teacher_logits,
                _covers_text(student_offsets),
                _covers_text(teacher_offsets),
                temperature=float(temperature),
                reduction="sum",
            )
        return aligned_distillation_loss_batch(
            student_logits,
            teacher_logits,
            list(student_offsets),
            list(teacher_offsets),
            method=self.divergence,
            temperature=float(temperature),
            reduction="sum",
            position="first",
            **self.kd_kwargs,
        )


def _offsets(batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides' ``offset_mapping`` ``(B, T, 2)``; refused, naming what is missing, when a batch lacks them."""
    spans = []
    for side, inputs in (("student", student_inputs(batch)), ("teacher", teacher_inputs(batch))):
        if "student" not in batch or "teacher" not in batch or "offset_mapping" not in inputs:
            raise KdistillError(
                f"distill.cross_tokenizer needs batches with batch['{side}']['offset_mapping'] (each token's "
                "character span); build the examples with TokenClassificationTask(cross_tokenizer=...).preprocess "
                "and the teacher's tokenizer"
            )
        value = torch.as_tensor(inputs["offset_mapping"])
        if value.dim() != 3 or value.shape[-1] != 2:
            raise ShapeMismatchError(f"batch['{side}']['offset_mapping'] is {tuple(value.shape)}; need (B, T, 2)")
        spans.append(value)
    if spans[0].shape[0] != spans[1].shape[0]:
        raise ShapeMismatchError(
            f"the student's offsets hold {spans[0].shape[0]} rows but the teacher's {spans[1].shape[0]}"
        )
    return spans[0], spans[1]


def _covers_text(offsets: torch.Tensor) -> torch.Tensor:
    """True where a token covers text ``(B, T)``: the counted tokens (special and padding tokens are (0, 0))."""
    return offsets[..., 1] > offsets[..., 0]
