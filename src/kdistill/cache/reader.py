"""Reading a teacher-output cache: :class:`CacheReader` (one example's entries at a time), what it costs on disk
(:func:`cache_bytes`), and a dense reference of one entry (:func:`dense_logprobs`)."""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kdistill.cache.manifest import (
    CacheIncompleteError,
    CacheMismatchError,
    first_difference,
    num_shards,
    read_manifest,
    shard_keys,
    shard_name,
)
from kdistill.errors import InvalidArgumentError, ShapeMismatchError


class CacheReader:
    """Read a teacher cache: shards opened lazily and memory-mapped, one example's entries at a time.

    ``get(i)`` finds example ``i``'s shard (``i // shard_size``) and its rows there through the shard's stored
    ``example_offsets``, then reads only those rows; ``get_features(i)`` does the same for the stored teacher
    features.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self._handles: dict[int, Any] = {}
        self._offsets: dict[tuple[int, str], torch.Tensor] = {}

    def __len__(self) -> int:
        return int(self.manifest["num_examples"])

    @property
    def num_shards(self) -> int:
        return num_shards(self.manifest)

    @property
    def features(self) -> list[str]:
        """The teacher feature specs the cache holds (``feature.{j}`` is the ``j``-th), possibly none."""
        return list(self.manifest["features"])

    def examples_in(self, shard: int) -> range:
        """The example indices shard ``shard`` covers."""
        if not 0 <= shard < self.num_shards:
            raise InvalidArgumentError(f"shard must be in [0, {self.num_shards}); got {shard}")
        size = int(self.manifest["shard_size"])
        return range(shard * size, min((shard + 1) * size, len(self)))

    def is_complete(self) -> bool:
        """True when every shard file is present."""
        return all((self.directory / shard_name(s)).is_file() for s in range(self.num_shards))

    def check_against(self, expected: Mapping[str, Any]) -> None:
        """Raise :class:`CacheMismatchError` naming the first manifest field that differs from ``expected``."""
        normalized = json.loads(json.dumps(dict(expected)))
        difference = first_difference(self.manifest, normalized)
        if difference is not None:
            field, left, right = difference
            raise CacheMismatchError(f"cache manifest field {field!r} is {left!r} but the run has {right!r}")

    def _handle(self, shard: int) -> Any:
        from safetensors import safe_open

        if shard not in self._handles:
            path = self.directory / shard_name(shard)
            if not path.is_file():
                raise CacheIncompleteError(
                    f"shard {shard} of the cache at {self.directory} is missing ({path.name}); rerun write_cache"
                )
            handle = safe_open(str(path), framework="pt")
            missing = sorted(shard_keys(self.manifest) - set(handle.keys()))
            if missing:
                raise CacheIncompleteError(f"{path} lacks the tensor {missing[0]!r}; delete it and rerun write_cache")
            expected = len(self.examples_in(shard)) + 1
            for name in ("example_offsets", "feature_offsets") if self.manifest["features"] else ("example_offsets",):
                offsets = handle.get_tensor(name)
                if tuple(offsets.shape) != (expected,):
                    raise CacheMismatchError(
                        f"{path}: {name} has shape {tuple(offsets.shape)} but the shard covers {expected - 1} examples"
                        f" (expected ({expected},)); delete it and rerun write_cache"
                    )
                self._offsets[shard, name] = offsets
            self._handles[shard] = handle
        return self._handles[shard]

    def _rows(self, example_index: Any, offsets: str) -> tuple[Any, int, int]:
        """``(shard handle, begin, end)``: where example ``example_index``'s rows lie under ``offsets``."""
        if isinstance(example_index, bool) or not hasattr(example_index, "__index__"):
            raise InvalidArgumentError(f"example_index must be an integer; got {example_index!r}")
        example_index = operator.index(example_index)
        if not 0 <= example_index < len(self):
            raise InvalidArgumentError(f"example_index must be in [0, {len(self)}); got {example_index!r}")
        size = int(self.manifest["shard_size"])
        shard = example_index // size
        handle = self._handle(shard)
        local = example_index - shard * size
        begin, end = (int(v) for v in self._offsets[shard, offsets][local : local + 2])
        return handle, begin, end

    def get(self, example_index: int) -> list[dict[str, torch.Tensor]]:
        """One example's entries, a dict per head: ``ids``, ``logprobs``, ``leftover`` and ``position`` (int64)."""
        handle, begin, end = self._rows(example_index, "example_offsets")
        position = handle.get_slice("position")[begin:end].to(torch.int64)
        return [
            {
                "ids": handle.get_slice(f"head{h}.ids")[begin:end],
                "logprobs": handle.get_slice(f"head{h}.logprobs")[begin:end],
                "leftover": handle.get_slice(f"head{h}.leftover")[begin:end],
                "position": position,
            }
            for h in range(int(self.manifest["num_heads"]))
        ]

    def get_features(self, example_index: int) -> list[torch.Tensor]:
        """One example's stored teacher features: per spec of :attr:`features`, ``(attended positions, hidden)``."""
        if not self.manifest["features"]:
            raise InvalidArgumentError(f"the cache at {self.directory} holds no teacher features (manifest features)")
        handle, begin, end = self._rows(example_index, "feature_offsets")
        return [handle.get_slice(f"feature.{j}")[begin:end] for j in range(len(self.manifest["features"]))]


def cache_bytes(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What a cache costs on disk: ``{"shard_bytes", "positions", "bytes_per_position", "examples", "shards"}``.

    ``shard_bytes`` is the total size of the shard files present (headers, offsets and features included),
    ``positions`` the number of cached (counted) positions in them, and ``bytes_per_position`` their ratio (0 when
    nothing is cached): the number a benchmark reports. Only the shards' headers are read.
    """
    from safetensors import safe_open

    directory = Path(directory)
    manifest = read_manifest(directory)
    total = positions = shards = 0
    for shard in range(num_shards(manifest)):
        path = directory / shard_name(shard)
        if not path.is_file():
            continue
        total += path.stat().st_size
        shards += 1
        with safe_open(str(path), framework="pt") as handle:
            positions += int(handle.get_slice("position").get_shape()[0])
    return {
        "shard_bytes": total,
        "positions": positions,
        "bytes_per_position": total / positions if positions else 0.0,
        "examples": int(manifest["num_examples"]),
        "shards": shards,
    }


def dense_logprobs(entry: Mapping[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Dense ``(n, V)`` float32 log-probabilities from one head's cached entry (a reference, for tests and checks).

    The top-k ids get their stored log-probabilities; the leftover mass is spread uniformly over the other
    ``V - k`` ids (``leftover - log(V - k)`` each), the maximum-entropy completion of what the cache knows. With
    ``k = V`` this is the full distribution exactly. Losses on cached outputs should use the sparse entries; this
    materializes ``n × V`` floats.
    """
    ids, logprobs, leftover = entry["ids"].long(), entry["logprobs"].float(), entry["leftover"].float()
    k = ids.shape[-1]
    if k > vocab_size:
        raise ShapeMismatchError(f"the entry has k={k} ids but vocab_size is {vocab_size}")
    fill = torch.full(leftover.shape, -math.inf) if k == vocab_size else leftover - math.log(vocab_size - k)
    dense = fill.unsqueeze(-1).expand(*leftover.shape, vocab_size).clone()
    return dense.scatter_(-1, ids, logprobs)
