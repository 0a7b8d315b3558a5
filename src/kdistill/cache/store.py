"""A teacher-output cache on disk: the top-k log-probabilities of every counted position, in safetensors shards.

Running a large teacher once and reading its outputs many times is what makes offline distillation cheap. The
cache keeps, for every position a task view counts (:meth:`kd_mask`), the teacher's ``k`` most likely ids, their
log-probabilities at the cache's temperature, and the ``leftover`` log-mass of all the other ids, so a student's
loss can be computed without the teacher and without ``(N, T, V)`` floats on disk. When the run's intermediate
matches need the teacher's hidden states, the cache holds those too (the manifest's ``features``).

Layout of a cache directory (format version 2)::

    manifest.json             what the cache was built from (teacher, tokenizer, data, k, dtype, temperature,
                              features, ...)
    shard-00000.safetensors   examples [0, shard_size), then [shard_size, 2 * shard_size), ...

Each shard of ``E`` examples holds:

* ``example_offsets`` (int64 ``(E + 1,)``): the rows of the shard's ``i``-th example are
  ``[example_offsets[i], example_offsets[i + 1])`` — 8 bytes per example instead of an index on every row;
* ``position`` (int32 ``(n,)``): which flattened position of the example's padded row each row is;
* per head ``h``: ``head{h}.ids`` (int32 ``(n, k)``, most likely first), ``head{h}.logprobs`` (``(n, k)`` in the
  manifest dtype) and ``head{h}.leftover`` (float32 ``(n,)``, ``log(1 - Σ top-k probabilities)``, ``-inf`` when
  ``k = V``). Rows are in example order, then position order: at ``k = 64`` in float16 a row is
  4 + 256 + 128 + 4 = 392 bytes (see :func:`cache_bytes`);
* when the manifest lists ``features`` (teacher feature specs such as ``"layer 4"``): ``feature_offsets`` (int64
  ``(E + 1,)``) and ``feature.{j}`` (``(m, H_j)`` in the manifest dtype), the teacher's ``j``-th feature at every
  attended (attention-mask) position of each example, in order. Attended positions are stored, not padded ones, so
  a batch of any padding (right or left) can lay them out again from its own attention mask.

Writing is resumable and parallel: shard ``s`` covers the examples ``[s * shard_size, (s + 1) * shard_size)`` and its
batches start at the shard's first example, so its bytes do not depend on which worker wrote it or whether the run
was interrupted; worker ``w`` of ``n`` writes the shards with ``s % n == w``; a shard appears only by an atomic
rename, and a rerun skips the shards that exist and load. The manifest is written first and compared on every
rerun, so a cache is never extended with outputs of another teacher, temperature or ``k``. A cache written in
another ``format_version`` is refused when opened, with the advice to rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kdistill._io import write_json_atomically
from kdistill.errors import InvalidArgumentError, KdistillError, ShapeMismatchError

#: 2: per-shard ``example_offsets`` instead of a per-row int64 ``example_index``, int32 ``position``, ``features``.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
MANIFEST_FIELDS = (
    "format_version",
    "kdistill_version",
    "teacher",
    "teacher_revision",
    "tokenizer_hash",
    "dataset_fingerprint",
    "k",
    "dtype",
    "temperature",
    "num_examples",
    "vocab_size",
    "shard_size",
    "num_heads",
    "features",
)
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class CacheMismatchError(InvalidArgumentError):
    """A cache's manifest differs from what a run expects; the message names the field and both values."""


class CacheIncompleteError(KdistillError, FileNotFoundError):
    """A cache directory lacks its manifest or a shard; the message names the path."""


# --------------------------------------------------------------------------------------------------- manifest


def build_manifest(
    *,
    teacher: str,
    teacher_revision: str | None,
    tokenizer_hash: str,
    dataset_fingerprint: str,
    k: int,
    dtype: str,
    temperature: float,
    num_examples: int,
    vocab_size: int,
    shard_size: int,
    num_heads: int = 1,
    features: Sequence[str] = (),
) -> dict[str, Any]:
    """The manifest of a cache: everything its contents depend on, validated, in :data:`MANIFEST_FIELDS` order.

    Two caches (or a cache and a run) agree exactly when their manifests are equal, so every input that changes a
    stored number is a field: the teacher and its revision, the tokenizer and the data (as hashes), ``k``, the
    stored dtype, the temperature, the sizes, and ``features``: the teacher feature specs (``"layer 4"``,
    ``"embeddings"``, a module path) whose values the cache holds for the run's intermediate matches, in order (the
    ``j``-th is ``feature.{j}`` in the shards). ``kdistill_version`` and ``format_version`` are added here.
    """
    from kdistill import __version__

    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise InvalidArgumentError(f"cache vocab_size must be an integer >= 1; got {vocab_size!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > vocab_size:
        raise InvalidArgumentError(f"cache k must be an integer in [1, vocab_size={vocab_size}]; got {k!r}")
    if dtype not in _DTYPES:
        raise InvalidArgumentError(f"cache dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise InvalidArgumentError(f"cache temperature must be a finite number > 0; got {temperature!r}")
    if not isinstance(num_examples, int) or num_examples < 0:
        raise InvalidArgumentError(f"cache num_examples must be an integer >= 0; got {num_examples!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise InvalidArgumentError(f"cache shard_size must be an integer >= 1; got {shard_size!r}")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise InvalidArgumentError(f"cache num_heads must be an integer >= 1; got {num_heads!r}")
    if isinstance(features, str) or not all(isinstance(spec, str) and spec for spec in features):
        raise InvalidArgumentError(f"cache features must be a list of teacher feature specs; got {features!r}")
    if len(set(features)) != len(features):
        raise InvalidArgumentError(f"cache features must not repeat a spec; got {list(features)!r}")
    manifest = {
        "format_version": FORMAT_VERSION,
        "kdistill_version": __version__,
        "teacher": str(teacher),
        "teacher_revision": teacher_revision,
        "tokenizer_hash": str(tokenizer_hash),
        "dataset_fingerprint": str(dataset_fingerprint),
        "k": k,
        "dtype": dtype,
        "temperature": float(temperature),
        "num_examples": num_examples,
        "vocab_size": vocab_size,
        "shard_size": shard_size,
        "num_heads": num_heads,
        "features": list(features),
    }
    return json.loads(json.dumps(manifest))  # the values exactly as they read back from manifest.json


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's class name and its vocabulary (sorted ``token -> id`` pairs, as JSON).

    Works for any tokenizer with ``get_vocab()`` (every Hugging Face tokenizer); two tokenizers with the same hash
    map text to the same ids, which is what makes cached ids meaningful for a student.
    """
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        raise InvalidArgumentError(
            f"tokenizer_hash needs a tokenizer with get_vocab(); got {type(tokenizer).__name__}"
        )
    vocab = sorted((str(token), int(index)) for token, index in get_vocab().items())
    payload = json.dumps({"class": type(tokenizer).__name__, "vocab": vocab}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def dataset_fingerprint(examples: Sequence[Mapping[str, Any]]) -> str:
    """sha256 over the examples' ``input_ids`` in order (each length-prefixed, as int64 little-endian).

    The length prefix keeps ``[1, 2] [3]`` and ``[1] [2, 3]`` apart; the order matters because the cache is
    addressed by example index.
    """
    digest = hashlib.sha256()
    digest.update(len(examples).to_bytes(8, "little"))
    for index in range(len(examples)):
        example = examples[index]
        ids = example.get("input_ids") if isinstance(example, Mapping) else None
        if ids is None:
            raise InvalidArgumentError(f"dataset_fingerprint: example {index} has no 'input_ids'")
        values = torch.as_tensor(ids).reshape(-1).to(torch.int64)
        digest.update(values.numel().to_bytes(8, "little"))
        digest.update(values.numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def _first_difference(found: Mapping[str, Any], expected: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first field (manifest order, then any extra fields sorted) whose values differ, or None."""
    extra = sorted((set(found) | set(expected)) - set(MANIFEST_FIELDS))
    for field in (*MANIFEST_FIELDS, *extra):
        if field not in expected and field not in found:
            continue
        left, right = found.get(field, "<missing>"), expected.get(field, "<missing>")
        if left != right:
            return field, left, right
    return None


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise CacheIncompleteError(f"no teacher cache at {directory}: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CacheIncompleteError(f"the cache manifest {path} cannot be read: {error}") from error
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:  # before any other field: an old cache lacks fields that are not its fault
        raise CacheMismatchError(
            f"the cache at {directory} has format_version {version!r} but this kdistill reads format_version "
            f"{FORMAT_VERSION}; rebuild the cache with `kdistill cache` (into another directory, or delete this one)"
        )
    missing = [field for field in MANIFEST_FIELDS if field not in manifest]
    if missing:
        raise CacheMismatchError(f"the cache manifest {path} lacks the field {missing[0]!r}")
    return manifest


def _ensure_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` (atomically) or check that the one there is equal, naming the first difference."""
    path = directory / MANIFEST_NAME
    if path.exists():
        found = _read_manifest(directory)
        difference = _first_difference(found, manifest)
        if difference is not None:
            field, left, right = difference
            raise CacheMismatchError(
                f"cache manifest field {field!r} is {left!r} in {path} but the run has {right!r}; "
                "use another directory or delete this cache"
            )
        return
    write_json_atomically(path, manifest)


# --------------------------------------------------------------------------------------------------- writing


def shard_name(shard: int) -> str:
    """The file name of shard ``shard``."""
    return f"shard-{shard:05d}.safetensors"


def num_shards(manifest: Mapping[str, Any]) -> int:
    """How many shards a cache with this manifest has (``ceil(num_examples / shard_size)``)."""
    return -(-int(manifest["num_examples"]) // int(manifest["shard_size"]))


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
    return _shard_keys(manifest) <= keys and widths == {k}


def _shard_keys(manifest: Mapping[str, Any]) -> set[str]:
    """The names of the tensors every shard of a cache with this manifest holds."""
    keys = {"example_offsets", "position"}
    keys |= {f"head{h}.{name}" for h in range(int(manifest["num_heads"])) for name in ("ids", "logprobs", "leftover")}
    if manifest["features"]:
        keys |= {"feature_offsets"} | {f"feature.{j}" for j in range(len(manifest["features"]))}
    return keys


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
    from kdistill.core.batch import model_inputs
    from kdistill.core.views import teacher_inputs
    from kdistill.features import FeatureTap

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
    from kdistill.core.views import attention_mask_of, teacher_inputs

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
    num_heads, dtype, features = int(manifest["num_heads"]), _DTYPES[manifest["dtype"]], list(manifest["features"])
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
    if manifest["dtype"] not in _DTYPES:
        raise InvalidArgumentError(f"cache dtype must be one of {sorted(_DTYPES)}; got {manifest['dtype']!r}")
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
    _ensure_manifest(directory, manifest)
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


# --------------------------------------------------------------------------------------------------- reading


class CacheReader:
    """Read a teacher cache: shards opened lazily and memory-mapped, one example's entries at a time.

    ``get(i)`` finds example ``i``'s shard (``i // shard_size``) and its rows there through the shard's stored
    ``example_offsets``, then reads only those rows; ``get_features(i)`` does the same for the stored teacher
    features.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.manifest = _read_manifest(self.directory)
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
        difference = _first_difference(self.manifest, normalized)
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
            missing = sorted(_shard_keys(self.manifest) - set(handle.keys()))
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
    manifest = _read_manifest(directory)
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
