"""Writing a teacher-output cache: the teacher run over the examples, its top-k entries stored shard by shard.

Writing is resumable and parallel: shard ``s`` covers the examples ``[s * shard_size, (s + 1) * shard_size)`` and its
batches start at the shard's first example, so its bytes do not depend on which worker wrote it or whether the run
was interrupted; worker ``w`` of ``n`` writes the shards with ``s % n == w``; a shard appears only by an atomic
rename, and a rerun skips the shards that exist and load. The manifest is written first and compared on every
rerun, so a cache is never extended with outputs of another teacher, temperature or ``k``. A cache written in
another ``format_version`` is refused when opened, with the advice to rebuild it.

The format (layout, manifest, shard names) is :mod:`kdistill.cache.manifest`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kdistill.cache.manifest import (
    DTYPES,
    FORMAT_VERSION,
    MANIFEST_FIELDS,
    CacheMismatchError,
    ensure_manifest,
    num_shards,
    shard_keys,
    shard_name,
)
from kdistill.core.batch import model_inputs
from kdistill.core.views import attention_mask_of, teacher_inputs
from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.features import FeatureTap


def topk_entries(
    logits: torch.Tensor, k: int, temperature: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids int32 (n, k), logprobs (n, k) in dtype, leftover float32 (n,))`` for logits ``(n, V)``.

    The log-softmax is taken in float32 at ``temperature``; ``leftover = log(1 - Σ exp(top-k))`` is computed in
    float64 as ``log(-expm1(logsumexp(top-k)))`` (stable when the top-k hold almost all the mass), with the sum
    clamped to at most 1, and is ``-inf`` when ``k = V``.
    """
    vocab = logits.shape[-1]
    if k < 1 or k > vocab:
        raise InvalidArgumentError(f"cache k must be in [1, V={vocab}]; got {k}")
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = torch.topk(logprobs, k, dim=-1, largest=True, sorted=True)
    if k == vocab:
        leftover = torch.full(values.shape[:-1], -math.inf, dtype=torch.float32)
    else:
        mass = torch.logsumexp(values.double(), dim=-1).clamp(max=0.0)
        leftover = torch.log(-torch.expm1(mass)).float()
    return ids.to(torch.int32), values.to(dtype), leftover


def _collate_and_run(
    teacher: torch.nn.Module,
    chunk: Sequence[Mapping[str, Any]],
    collate: Callable[[Sequence[Mapping[str, Any]]], Mapping[str, Any]],
    device: torch.device,
    features: Sequence[str] = (),
) -> tuple[Mapping[str, Any], Any, list[torch.Tensor]]:
    """Collate ``chunk``, run the teacher on it, and return the batch, the outputs and the requested features.

    The features are captured with the same hooks (:class:`~kdistill.features.FeatureTap`, ``"hidden"`` kind) a
    live :class:`~kdistill.distillers.Distiller` uses on its teacher, so a cached feature is the live one.
    """
    batch = collate(chunk)
    inputs = teacher_inputs(_to_device(batch, device))
    sources = {f"feature.{j}": spec for j, spec in enumerate(features)}
    with FeatureTap(teacher, sources) as tap:
        outputs = teacher(**model_inputs(teacher, inputs), **tap.model_kwargs)
        captured = tap.collect(outputs)
    return batch, outputs, [captured[f"feature.{j}"] for j in range(len(features))]


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def attended_positions(batch: Mapping[str, Any], length: int) -> torch.Tensor:
    """Bool ``(B, length)``: the positions whose teacher features a cache keeps (the teacher's attention mask).

    Without an attention mask every position counts. Shared by the writer and
    :class:`~kdistill.cache.CachedTeacherCollate`, so both agree on which rows a feature has.
    """
    inputs = teacher_inputs(batch)
    mask = attention_mask_of(inputs)
    if mask is None:
        ids = inputs.get("input_ids")
        rows = int(ids.shape[0]) if isinstance(ids, torch.Tensor) else 1
        return torch.ones(rows, length, dtype=torch.bool)
    if mask.dim() != 2 or int(mask.shape[1]) != length:
        raise ShapeMismatchError(
            f"the teacher's attention_mask has shape {tuple(mask.shape)} but its features have {length} positions"
        )
    return mask.bool().cpu()


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """``[0, c0, c0 + c1, ...]`` as int64: the row ranges of consecutive examples."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.to(torch.int64).cumsum(0)])


def _shard_tensors(
    teacher: torch.nn.Module,
    examples: Sequence[Mapping[str, Any]],
    start: int,
    stop: int,
    collate: Callable[[Sequence[Mapping[str, Any]]], Mapping[str, Any]],
    view: Any,
    manifest: Mapping[str, Any],
    batch_size: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Run the teacher over examples ``[start, stop)`` in batches from ``start`` and gather the shard's tensors."""
    k, temperature, vocab = int(manifest["k"]), float(manifest["temperature"]), int(manifest["vocab_size"])
    num_heads, dtype, features = int(manifest["num_heads"]), DTYPES[manifest["dtype"]], list(manifest["features"])
    count_parts: list[torch.Tensor] = []
    position_parts: list[torch.Tensor] = []
    head_parts: list[dict[str, list[torch.Tensor]]] = [
        {"ids": [], "logprobs": [], "leftover": []} for _ in range(num_heads)
    ]
    feature_counts: list[torch.Tensor] = []
    feature_parts: list[list[torch.Tensor]] = [[] for _ in features]
    for first in range(start, stop, batch_size):
        last = min(first + batch_size, stop)
        chunk = [examples[i] for i in range(first, last)]
        batch, outputs, captured = _collate_and_run(teacher, chunk, collate, device, features)
        heads = view.logits(outputs)
        if len(heads) != num_heads:
            raise ShapeMismatchError(
                f"the view gives {len(heads)} logits heads but the cache manifest has num_heads={num_heads}"
            )
        lead = tuple(heads[0].shape[:-1])
        for h, logits in enumerate(heads):
            if tuple(logits.shape[:-1]) != lead:
                raise ShapeMismatchError(
                    f"cached heads must share their leading shape; head 0 is {lead}, head {h} is "
                    f"{tuple(logits.shape[:-1])}"
                )
            if logits.shape[-1] != vocab:
                raise ShapeMismatchError(
                    f"the teacher's head {h} has {logits.shape[-1]} logits per position but the cache manifest "
                    f"has vocab_size={vocab}"
                )
        mask = view.kd_mask(batch)
        if mask is None:
            mask = torch.ones(lead, dtype=torch.bool)
        mask = mask.to(torch.bool).cpu()
        if tuple(mask.shape) != lead:
            raise ShapeMismatchError(f"the view's kd_mask has shape {tuple(mask.shape)} but the logits have {lead}")
        flat = mask.reshape(mask.shape[0], -1)  # (B, P): P positions per example, row-major
        rows, positions = flat.nonzero(as_tuple=True)
        count_parts.append(flat.sum(1))
        position_parts.append(positions.to(torch.int32))
        for h, logits in enumerate(heads):  # select and reduce where the logits are: only (n, k) comes back
            where = logits.device
            grid = logits.detach().reshape(flat.shape[0], flat.shape[1], vocab)
            selected = grid[rows.to(where), positions.to(where)]
            ids, logprobs, leftover = topk_entries(selected, k, temperature, dtype)
            head_parts[h]["ids"].append(ids.cpu())
            head_parts[h]["logprobs"].append(logprobs.cpu())
            head_parts[h]["leftover"].append(leftover.cpu())
        if features:
            attended = None
            for j, (spec, value) in enumerate(zip(features, captured, strict=True)):
                if value.dim() != 3 or value.shape[0] != len(chunk):
                    raise ShapeMismatchError(
                        f"cached teacher feature {spec!r} must be (batch, positions, hidden) with batch {len(chunk)}; "
                        f"the teacher gives {tuple(value.shape)}"
                    )
                if attended is None:
                    attended = attended_positions(batch, int(value.shape[1]))
                    feature_counts.append(attended.sum(1))
                elif value.shape[1] != attended.shape[1]:
                    raise ShapeMismatchError(
                        f"cached teacher feature {spec!r} has {value.shape[1]} positions but {features[0]!r} has "
                        f"{attended.shape[1]}"
                    )
                feature_parts[j].append(value.detach()[attended.to(value.device)].to(dtype).cpu())
    tensors: dict[str, torch.Tensor] = {
        "example_offsets": _offsets(_cat(count_parts, (0,), torch.int64)),
        "position": _cat(position_parts, (0,), torch.int32),
    }
    for h, parts in enumerate(head_parts):
        tensors[f"head{h}.ids"] = _cat(parts["ids"], (0, k), torch.int32)
        tensors[f"head{h}.logprobs"] = _cat(parts["logprobs"], (0, k), dtype)
        tensors[f"head{h}.leftover"] = _cat(parts["leftover"], (0,), torch.float32)
    if features:
        tensors["feature_offsets"] = _offsets(_cat(feature_counts, (0,), torch.int64))
        for j, parts in enumerate(feature_parts):
            tensors[f"feature.{j}"] = _cat(parts, (0, 0), dtype)
    return tensors


def _cat(parts: list[torch.Tensor], empty_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts).contiguous() if parts else torch.empty(empty_shape, dtype=dtype)


def _shard_loads(path: Path, manifest: Mapping[str, Any]) -> bool:
    """True when ``path`` is a readable shard with every expected tensor, ``k`` wide (a torn file is rewritten)."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    num_heads, k = int(manifest["num_heads"]), int(manifest["k"])
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            widths = {handle.get_slice(f"head{h}.ids").get_shape()[-1] for h in range(num_heads)} if keys else set()
    except Exception:  # any unreadable file is simply not a finished shard
        return False
    return shard_keys(manifest) <= keys and widths == {k}


def write_cache(
    directory: str | os.PathLike[str],
    teacher: torch.nn.Module,
    examples: Sequence[Mapping[str, Any]],
    collate: Callable[[Sequence[Mapping[str, Any]]], Mapping[str, Any]],
    view: Any,
    manifest: Mapping[str, Any],
    *,
    batch_size: int = 32,
    worker: int = 0,
    num_workers: int = 1,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write (or finish) the shards of this worker into ``directory`` and return the directory.

    Args:
        directory: the cache directory (created when missing).
        teacher: the model; run in eval mode under ``no_grad`` (its training flag is restored afterwards).
        examples: pre-tokenized examples, indexable; ``len(examples)`` must equal ``manifest["num_examples"]``.
        collate: turns a list of examples into a batch (pads), as the training run's collator does.
        view: the task view: ``logits(outputs)`` per head and ``kd_mask(batch)`` (None = every position counts).
        manifest: from :func:`build_manifest`; written first, or compared with the one there (a difference in any
            field raises :class:`CacheMismatchError` naming it).
        batch_size: examples per teacher forward; batches start at each shard's first example.
        worker, num_workers: this process writes the shards ``s`` with ``s % num_workers == worker``.
        device: where the batches go (and the teacher, when given); default: the teacher's device.
        progress: called as ``progress(done, total)`` after each of this worker's shards, written or skipped.
    """
    directory = Path(directory)
    manifest = json.loads(json.dumps(dict(manifest)))
    missing = [field for field in MANIFEST_FIELDS if field not in manifest]
    if missing:
        raise InvalidArgumentError(f"the cache manifest lacks the field {missing[0]!r}; build it with build_manifest")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CacheMismatchError(
            f"the cache manifest has format_version {manifest['format_version']!r}; this kdistill writes "
            f"{FORMAT_VERSION}: build it with build_manifest"
        )
    if int(manifest["k"]) < 1 or int(manifest["k"]) > int(manifest["vocab_size"]):
        raise InvalidArgumentError(f"cache k must be in [1, vocab_size={manifest['vocab_size']}]; got {manifest['k']}")
    if manifest["dtype"] not in DTYPES:
        raise InvalidArgumentError(f"cache dtype must be one of {sorted(DTYPES)}; got {manifest['dtype']!r}")
    if len(examples) != int(manifest["num_examples"]):
        raise ShapeMismatchError(
            f"write_cache got {len(examples)} examples but the cache manifest has num_examples="
            f"{manifest['num_examples']}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"write_cache batch_size must be an integer >= 1; got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 1:
        raise InvalidArgumentError(f"write_cache num_workers must be an integer >= 1; got {num_workers!r}")
    if not isinstance(worker, int) or not 0 <= worker < num_workers:
        raise InvalidArgumentError(f"write_cache worker must be in [0, num_workers={num_workers}); got {worker!r}")

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    ensure_manifest(directory, manifest)
    if device is not None:
        teacher.to(device)
        target = torch.device(device)
    else:
        first_param = next(iter(teacher.parameters()), None)
        target = first_param.device if first_param is not None else torch.device("cpu")
    shard_size = int(manifest["shard_size"])
    mine = [s for s in range(num_shards(manifest)) if s % num_workers == worker]
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            for done, shard in enumerate(mine, start=1):
                path = directory / shard_name(shard)
                if not _shard_loads(path, manifest):
                    start = shard * shard_size
                    stop = min(start + shard_size, int(manifest["num_examples"]))
                    tensors = _shard_tensors(
                        teacher, examples, start, stop, collate, view, manifest, batch_size, target
                    )
                    for stale in directory.glob(f".{path.name}.tmp-*"):  # left by a killed writer of this shard
                        stale.unlink(missing_ok=True)
                    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                    # one metadata key: safetensors writes a dict of several in no fixed order, breaking bit-identity
                    metadata = {"kdistill_cache": json.dumps({"format_version": FORMAT_VERSION, "shard": shard})}
                    save_file(tensors, str(tmp), metadata=metadata)
                    os.replace(tmp, path)
                if progress is not None:
                    progress(done, len(mine))
    finally:
        teacher.train(was_training)
    return directory
