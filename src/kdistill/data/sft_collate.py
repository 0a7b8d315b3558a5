"""Padding causal-LM examples (see :mod:`kdistill.data.sft`) into batches: :class:`SFTCollator`.

The student's ``input_ids``, ``attention_mask`` and ``labels`` are right-padded; with ``with_prompts`` the prompts
are also returned left-padded (for generation); a nested ``teacher`` tokenization is padded the same way into
``batch["teacher"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdistill.core.shift import IGNORE_INDEX
from kdistill.errors import InvalidArgumentError

__all__ = ["SFTCollator"]

_PADDED_KEYS = ("input_ids", "attention_mask", "labels")


def _as_token_list(value: Any, key: str, index: int) -> list[int]:
    """A 1-D token sequence (list, tuple or tensor) as a list of ints; a clear error for anything else."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise InvalidArgumentError(
                f"example {index}: {key!r} must be one-dimensional, got a tensor of shape {tuple(value.shape)}"
            )
        return [int(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    raise InvalidArgumentError(
        f"example {index}: {key!r} must be a list or tensor of ints, got {type(value).__name__}"
    )


@dataclass(frozen=True)
class SFTCollator:
    """Pad causal-LM examples into a batch of ``torch.long`` tensors.

    ``input_ids`` (``pad_token_id``), ``attention_mask`` (0; all ones when absent) and ``labels`` (``label_pad_id``)
    are right-padded to the longest row, rounded up to ``pad_to_multiple_of``. With ``with_prompts`` the batch also
    holds ``prompt_input_ids`` and ``prompt_attention_mask``: each example's first ``prompt_length`` tokens,
    *left*-padded so that generation (on-policy distillation, evaluation) continues every row from its last
    column. A nested ``teacher`` dict (the teacher's own tokenization) is collated the same way into
    ``batch["teacher"]``. Other keys pass through: ints become a long tensor, floats a float tensor, equal-shape
    tensors are stacked, anything else stays a list.

    Args:
        pad_token_id: the id written into padded ``input_ids`` (and ``prompt_input_ids``) positions.
        label_pad_id: the label of padded positions; ``-100`` is ignored by every loss.
        pad_to_multiple_of: round padded lengths up to a multiple of this (tensor-core friendly shapes).
        with_prompts: also return the left-padded prompts (examples must carry ``prompt_length``).
        teacher_pad_token_id: the id padding the teacher's own ``input_ids`` (None: ``pad_token_id``). A teacher with
            another tokenizer needs an id of *its* vocabulary there: the padded positions are masked, but the
            embedding lookup still runs on them, and the student's pad id may not exist in the teacher's vocabulary.
    """

    pad_token_id: int
    label_pad_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None
    with_prompts: bool = False
    teacher_pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise InvalidArgumentError(
                f"pad_token_id must be an int, got {self.pad_token_id!r} (does the tokenizer have a pad token?)"
            )
        if self.teacher_pad_token_id is not None and (
            isinstance(self.teacher_pad_token_id, bool) or not isinstance(self.teacher_pad_token_id, int)
        ):
            raise InvalidArgumentError(
                f"teacher_pad_token_id must be an int or None, got {self.teacher_pad_token_id!r} (does the teacher's "
                "tokenizer have a pad token?)"
            )
        if isinstance(self.label_pad_id, bool) or not isinstance(self.label_pad_id, int):
            raise InvalidArgumentError(f"label_pad_id must be an int, got {self.label_pad_id!r}")
        if self.pad_to_multiple_of is not None and (
            isinstance(self.pad_to_multiple_of, bool)
            or not isinstance(self.pad_to_multiple_of, int)
            or self.pad_to_multiple_of < 1
        ):
            raise InvalidArgumentError(
                f"pad_to_multiple_of must be a positive int or None, got {self.pad_to_multiple_of!r}"
            )

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate ``examples`` (dicts of lists or tensors) into one batch dict."""
        if not examples:
            raise InvalidArgumentError("cannot collate an empty list of examples")
        for index, example in enumerate(examples):
            if not isinstance(example, Mapping):
                raise InvalidArgumentError(f"example {index} must be a dict, got {type(example).__name__}")
        batch = self._collate(examples, where="", pad_id=self.pad_token_id)
        has_teacher = ["teacher" in e for e in examples]
        if any(has_teacher):
            if not all(has_teacher):
                index = has_teacher.index(False)
                raise InvalidArgumentError(
                    f"example {index} has no 'teacher' tokenization while others have one; all or none must"
                )
            teachers = [e["teacher"] for e in examples]
            for index, teacher in enumerate(teachers):
                if not isinstance(teacher, Mapping):
                    raise InvalidArgumentError(
                        f"example {index}: 'teacher' must be a dict of token lists, got {type(teacher).__name__}"
                    )
            teacher_pad = self.pad_token_id if self.teacher_pad_token_id is None else self.teacher_pad_token_id
            batch["teacher"] = self._collate(teachers, where="teacher ", pad_id=teacher_pad)
        return batch

    def _round(self, length: int) -> int:
        multiple = self.pad_to_multiple_of
        return length if multiple is None else -(-length // multiple) * multiple

    def _collate(self, examples: Sequence[Mapping[str, Any]], where: str, pad_id: int) -> dict[str, Any]:
        """Pad one tokenization (the student's, or the teachers' with ``where="teacher "`` in messages)."""
        ids: list[list[int]] = []
        masks: list[list[int]] = []
        labels: list[list[int]] = []
        for index, example in enumerate(examples):
            if "input_ids" not in example:
                raise InvalidArgumentError(
                    f"{where}example {index} has no 'input_ids' (its keys: {sorted(map(str, example))})"
                )
        has_labels = ["labels" in e for e in examples]
        if any(has_labels) and not all(has_labels):
            index = has_labels.index(False)
            raise InvalidArgumentError(f"{where}example {index} has no 'labels' while others have them")
        for index, example in enumerate(examples):
            row = _as_token_list(example["input_ids"], "input_ids", index)
            ids.append(row)
            for key, out in (("attention_mask", masks), ("labels", labels)):
                if key not in example:
                    if key == "attention_mask":
                        out.append([1] * len(row))
                    continue
                values = _as_token_list(example[key], key, index)
                if len(values) != len(row):
                    raise InvalidArgumentError(
                        f"{where}example {index}: {key!r} has {len(values)} entries but 'input_ids' has {len(row)}"
                    )
                out.append(values)
        length = self._round(max(len(row) for row in ids))
        batch: dict[str, Any] = {
            "input_ids": self._pad(ids, length, pad_id, left=False),
            "attention_mask": self._pad(masks, length, 0, left=False),
        }
        if labels:
            batch["labels"] = self._pad(labels, length, self.label_pad_id, left=False)
        if self.with_prompts:
            prompts, prompt_masks = [], []
            for index, (example, row, mask) in enumerate(zip(examples, ids, masks, strict=True)):
                count = example.get("prompt_length")
                if isinstance(count, torch.Tensor) and count.numel() == 1:
                    count = int(count.item())
                if isinstance(count, bool) or not isinstance(count, int):
                    raise InvalidArgumentError(
                        f"{where}example {index} needs an int 'prompt_length' for with_prompts=True, got {count!r}"
                    )
                if not 1 <= count <= len(row):
                    raise InvalidArgumentError(
                        f"{where}example {index}: prompt_length {count} must be between 1 and its length {len(row)}"
                    )
                prompts.append(row[:count])
                prompt_masks.append(mask[:count])
            prompt_length = self._round(max(len(p) for p in prompts))
            batch["prompt_input_ids"] = self._pad(prompts, prompt_length, pad_id, left=True)
            batch["prompt_attention_mask"] = self._pad(prompt_masks, prompt_length, 0, left=True)
        for key in examples[0]:
            if key in _PADDED_KEYS or key == "teacher":
                continue
            batch[key] = self._pass_through(key, examples, where)
        return batch

    @staticmethod
    def _pass_through(key: str, examples: Sequence[Mapping[str, Any]], where: str) -> Any:
        """An extra per-example value (``example_id``, ``prompt_length``, a category name) as a batch entry."""
        values = []
        for index, example in enumerate(examples):
            if key not in example:
                raise InvalidArgumentError(f"{where}example {index} has no {key!r} while example 0 has it")
            values.append(example[key])
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return torch.tensor(values, dtype=torch.long)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return torch.tensor(values, dtype=torch.float32)
        if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            return torch.stack(values)
        return values

    @staticmethod
    def _pad(rows: Sequence[Sequence[int]], length: int, value: int, *, left: bool) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if not row:
                continue
            tensor = torch.tensor(row, dtype=torch.long)
            if left:
                out[i, length - len(row) :] = tensor
            else:
                out[i, : len(row)] = tensor
        return out
