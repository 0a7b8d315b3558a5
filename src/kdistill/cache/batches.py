"""Batches that carry the teacher's cached top-k outputs instead of needing the teacher.

:class:`CachedTeacherCollate` wraps a task's collate function: each example names its row in the cache
(``cache_index``, its index in the cached training examples), and the batch gains ``teacher_topk``: per head the
top-k ids, log-probabilities and leftover log-mass laid out like the student's logits (``(B, k)`` for one
prediction per example, ``(B, T, k)`` per token) with a ``mask`` of the positions the cache holds. The
distiller then computes the KD term with :func:`kdistill.losses.sparse_divergence`, and the teacher never runs.

When the cache holds teacher features for the run's intermediate matches, the batch also gains
``teacher_features``: ``{match name: (B, T, H) float32}``, each example's stored rows put back at the positions
its (teacher) attention mask marks, zeros elsewhere. The distiller uses them as the teacher's features.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kdistill.cache.store import attended_positions
from kdistill.errors import InvalidArgumentError

CACHE_INDEX = "cache_index"


@dataclass
class CachedTeacherCollate:
    """``collate`` plus the cached teacher outputs of the batch's examples.

    Args:
        collate: the task's collate function.
        reader: a :class:`~kdistill.cache.CacheReader` over the cache of these examples.
        per_token: the student's logits have a position axis (token tasks, causal LMs) rather than one row per
            example (sequence classification).
        leftover_policy: how :func:`~kdistill.losses.sparse_divergence` treats the mass outside the top k
            (``"renormalize"`` or ``"uniform"``).
        features: match name → index of its teacher feature in the cache's ``features`` (``feature.{j}``); each
            becomes ``batch["teacher_features"][name]``. Empty: no features are read.
    """

    collate: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]
    reader: Any
    per_token: bool
    leftover_policy: str = "renormalize"
    features: Mapping[str, int] = field(default_factory=dict)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        missing = [i for i, example in enumerate(examples) if CACHE_INDEX not in example]
        if missing:
            raise InvalidArgumentError(f"example {missing[0]} of the batch has no {CACHE_INDEX!r} (its cache row)")
        indices = [int(example[CACHE_INDEX]) for example in examples]
        batch = self.collate([{k: v for k, v in example.items() if k != CACHE_INDEX} for example in examples])
        length = _sequence_length(batch) if self.per_token else 1
        entries = [self.reader.get(index) for index in indices]
        heads = []
        for head in range(int(self.reader.manifest["num_heads"])):
            heads.append(self._layout([per_example[head] for per_example in entries], length))
        batch["teacher_topk"] = {
            "heads": heads,
            "temperature": float(self.reader.manifest["temperature"]),
            "leftover_policy": self.leftover_policy,
        }
        if self.features:
            batch["teacher_features"] = self._features(batch, indices)
        return batch

    def _features(self, batch: Mapping[str, Any], indices: list[int]) -> dict[str, torch.Tensor]:
        """The cached teacher features of the batch's examples, ``(B, T, H)`` per match, zero where not attended."""
        stored = [self.reader.get_features(index) for index in indices]
        length = _sequence_length(batch.get("teacher", batch))
        attended = attended_positions(batch, length)
        grids: dict[int, torch.Tensor] = {}
        for j in sorted(set(self.features.values())):
            width = int(stored[0][j].shape[-1]) if stored else 0
            grid = torch.zeros(len(indices), length, width, dtype=torch.float32)
            for row, (index, values) in enumerate(zip(indices, stored, strict=True)):
                where = attended[row]
                if int(where.sum()) != values[j].shape[0]:
                    raise InvalidArgumentError(
                        f"example {index}: the cache holds teacher features at {values[j].shape[0]} positions but the "
                        f"batch attends to {int(where.sum())}; was the cache written with other data or max_length?"
                    )
                grid[row, where] = values[j].float()
            grids[j] = grid
        return {name: grids[j] for name, j in self.features.items()}

    def _layout(self, entries: list[dict[str, torch.Tensor]], length: int) -> dict[str, torch.Tensor]:
        k = int(self.reader.manifest["k"])
        rows = len(entries)
        shape = (rows, length) if self.per_token else (rows,)
        ids = torch.arange(k, dtype=torch.long).expand(*shape, k).clone()  # distinct valid ids where nothing counts
        logprobs = torch.full((*shape, k), -float(torch.log(torch.tensor(float(k)))), dtype=torch.float32)
        leftover = torch.full(shape, float("-inf"), dtype=torch.float32)
        mask = torch.zeros(shape, dtype=torch.bool)
        for row, entry in enumerate(entries):
            position = entry["position"].long()
            if not self.per_token:
                if position.numel() != 1:
                    raise InvalidArgumentError(
                        f"the cache holds {position.numel()} positions for one example, but the student has one "
                        "prediction per example; was the cache written for another task?"
                    )
                index: Any = row
            else:
                if position.numel() and int(position.max()) >= length:
                    raise InvalidArgumentError(
                        f"the cache holds position {int(position.max())} but the batch is {length} tokens long; "
                        "was the cache written with other data or max_length?"
                    )
                index = (row, position)
            ids[index] = entry["ids"].long()
            logprobs[index] = entry["logprobs"].float()
            leftover[index] = entry["leftover"].float()
            mask[index] = True
        return {"ids": ids, "logprobs": logprobs, "leftover": leftover, "mask": mask}


def _sequence_length(batch: Mapping[str, Any]) -> int:
    inputs = batch.get("student", batch)
    for key in ("input_ids", "attention_mask"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[1])
    raise InvalidArgumentError("the batch has no (B, T) input_ids to lay the cached positions out on")


def with_cache_index(examples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The examples, each with its index in the list as ``cache_index`` (the cache is written in that order)."""
    return [{**example, CACHE_INDEX: index} for index, example in enumerate(examples)]
