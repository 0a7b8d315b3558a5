"""Task views: which logits a model's outputs hold, which positions count, and the gold labels.

A view answers three questions for the objective, for any model: ``logits(outputs)`` (a list, one entry per head:
one for classification, start and end for extractive QA), ``kd_mask(batch)`` (the positions of those logits
that the KD term counts; None when every entry counts) and ``labels(batch)`` (hard labels aligned with the logits,
``-100`` = ignored). The tasks of later modules (QA, causal LM) add their own views.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kdistill.errors import InvalidArgumentError


def _logits_of(outputs: Any, key: str = "logits") -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and key in outputs:
        return outputs[key]
    value = getattr(outputs, key, None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise InvalidArgumentError(f"the model's outputs have no {key!r}; got {type(outputs).__name__}")


def student_inputs(batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """The student's inputs: ``batch["student"]`` when the batch carries separate inputs, else the batch."""
    return batch.get("student", batch)


def teacher_inputs(batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """The teacher's inputs: ``batch["teacher"]`` when the batch carries separate inputs, else the batch."""
    return batch.get("teacher", batch)


def attention_mask_of(inputs: Mapping[str, Any]) -> torch.Tensor | None:
    mask = inputs.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) else None


@dataclass(frozen=True)
class SequenceView:
    """One prediction per example: logits ``(B, C)``, labels ``(B,)``."""

    logits_key: str = "logits"

    def logits(self, outputs: Any) -> list[torch.Tensor]:
        return [_logits_of(outputs, self.logits_key)]

    def kd_mask(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        return None

    def labels(self, batch: Mapping[str, Any]) -> list[torch.Tensor] | None:
        labels = batch.get("labels")
        return None if labels is None else [labels]

    def count_logit_positions(self, batch: Mapping[str, Any]) -> int:
        return _batch_size(student_inputs(batch))


@dataclass(frozen=True)
class TokenView:
    """One prediction per token: logits ``(B, T, C)``, labels ``(B, T)``; KD counts every real token."""

    logits_key: str = "logits"

    def logits(self, outputs: Any) -> list[torch.Tensor]:
        return [_logits_of(outputs, self.logits_key)]

    def kd_mask(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        return attention_mask_of(student_inputs(batch))

    def labels(self, batch: Mapping[str, Any]) -> list[torch.Tensor] | None:
        labels = batch.get("labels")
        return None if labels is None else [labels]

    def count_logit_positions(self, batch: Mapping[str, Any]) -> int:
        mask = self.kd_mask(batch)
        inputs = student_inputs(batch)
        return int(mask.sum()) if mask is not None else _batch_size(inputs) * _seq_len(inputs)


def _batch_size(inputs: Mapping[str, Any]) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    raise InvalidArgumentError("the batch holds no tensor to take its size from")


def _seq_len(inputs: Mapping[str, Any]) -> int:
    for key in ("input_ids", "attention_mask"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[1])
    return 1


def infer_view(student_logits: torch.Tensor) -> SequenceView | TokenView:
    """A view from the shape of the student's logits: ``(B, C)`` → sequence, ``(B, T, C)`` → token."""
    return SequenceView() if student_logits.dim() == 2 else TokenView()
