"""Dynamic padding of pre-tokenized examples into batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdistill.errors import InvalidArgumentError

_TOKEN_KEYS = ("input_ids", "token_type_ids", "position_ids")


@dataclass(frozen=True)
class PadCollator:
    """Pad examples ``{"input_ids": [...], "labels": int | [...], ...}`` to the longest in the batch.

    ``attention_mask`` is built (1 = real token) unless given; token-level ``labels`` (lists) are padded with
    ``label_pad_id``; per-example labels become a ``(B,)`` tensor. Examples may carry separate ``"student"`` and
    ``"teacher"`` dicts (two tokenizations of one text); each is padded on its own.
    """

    pad_id: int = 0
    label_pad_id: int = -100
    padding_side: str = "right"

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise InvalidArgumentError("cannot collate an empty list of examples")
        if "student" in examples[0]:
            batch: dict[str, Any] = {
                "student": self._pad([e["student"] for e in examples]),
                "teacher": self._pad([e["teacher"] for e in examples]),
            }
            rest = [{k: v for k, v in e.items() if k not in ("student", "teacher")} for e in examples]
            batch.update(self._pad(rest, require_ids=False))
            return batch
        return self._pad(examples)

    def _pad(self, examples: Sequence[Mapping[str, Any]], require_ids: bool = True) -> dict[str, Any]:
        keys = list(examples[0])
        if require_ids and "input_ids" not in keys:
            raise InvalidArgumentError(f"examples need 'input_ids'; got keys {keys}")
        length = max((len(e["input_ids"]) for e in examples), default=0) if "input_ids" in keys else 0
        batch: dict[str, Any] = {}
        for key in keys:
            values = [e[key] for e in examples]
            if key in _TOKEN_KEYS or key == "attention_mask":
                batch[key] = self._pad_lists(values, length, self.pad_id if key != "attention_mask" else 0)
            elif key == "labels" and (
                isinstance(values[0], (list, tuple)) or (isinstance(values[0], torch.Tensor) and values[0].dim() == 1)
            ):  # per-token labels
                batch[key] = self._pad_lists(values, length, self.label_pad_id)
            elif isinstance(values[0], (int, float, bool)):
                batch[key] = torch.tensor(values)
            elif isinstance(values[0], torch.Tensor):
                batch[key] = torch.stack(values)
            else:
                batch[key] = values
        if "input_ids" in keys and "attention_mask" not in keys:
            batch["attention_mask"] = self._pad_lists([[1] * len(e["input_ids"]) for e in examples], length, 0)
        return batch

    def _pad_lists(self, rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            # a tensor row as it is (list() of a tensor would make one 0-d tensor per token: ~100× slower)
            row_tensor = torch.as_tensor(row if isinstance(row, (torch.Tensor, list)) else list(row), dtype=torch.long)
            if self.padding_side == "right":
                out[i, : len(row)] = row_tensor
            else:
                out[i, length - len(row) :] = row_tensor
        return out
