"""The teacher-output cache's format and manifest: top-k log-probabilities of every counted position, in shards.

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
  4 + 256 + 128 + 4 = 392 bytes (see :func:`kdistill.cache.reader.cache_bytes`);
* when the manifest lists ``features`` (teacher feature specs such as ``"layer 4"``): ``feature_offsets`` (int64
  ``(E + 1,)``) and ``feature.{j}`` (``(m, H_j)`` in the manifest dtype), the teacher's ``j``-th feature at every
  attended (attention-mask) position of each example, in order. Attended positions are stored, not padded ones, so
  a batch of any padding (right or left) can lay them out again from its own attention mask.

This module holds the format (its version, the manifest's fields, shard names and tensor names) and the manifest:
building it, hashing the tokenizer and the data it depends on, reading it back and comparing it. Writing the
shards is :mod:`kdistill.cache.store`, reading them :mod:`kdistill.cache.reader`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kdistill._io import write_json_atomically
from kdistill._version import __version__
from kdistill.errors import InvalidArgumentError, KdistillError

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
#: the stored dtypes a manifest may name
DTYPES = {"float16": torch.float16, "float32": torch.float32}


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
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise InvalidArgumentError(f"cache vocab_size must be an integer >= 1; got {vocab_size!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > vocab_size:
        raise InvalidArgumentError(f"cache k must be an integer in [1, vocab_size={vocab_size}]; got {k!r}")
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"cache dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
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


def first_difference(found: Mapping[str, Any], expected: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first field (manifest order, then any extra fields sorted) whose values differ, or None."""
    extra = sorted((set(found) | set(expected)) - set(MANIFEST_FIELDS))
    for field in (*MANIFEST_FIELDS, *extra):
        if field not in expected and field not in found:
            continue
        left, right = found.get(field, "<missing>"), expected.get(field, "<missing>")
        if left != right:
            return field, left, right
    return None


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of the cache at ``directory``, checked for its format version and every field.

    Raises:
        CacheIncompleteError: no readable ``manifest.json``.
        CacheMismatchError: another ``format_version`` (with the advice to rebuild), or a missing field.
    """
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


def ensure_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` (atomically) or check that the one there is equal, naming the first difference."""
    path = directory / MANIFEST_NAME
    if path.exists():
        found = read_manifest(directory)
        difference = first_difference(found, manifest)
        if difference is not None:
            field, left, right = difference
            raise CacheMismatchError(
                f"cache manifest field {field!r} is {left!r} in {path} but the run has {right!r}; "
                "use another directory or delete this cache"
            )
        return
    write_json_atomically(path, manifest)


def shard_name(shard: int) -> str:
    """The file name of shard ``shard``."""
    return f"shard-{shard:05d}.safetensors"


def num_shards(manifest: Mapping[str, Any]) -> int:
    """How many shards a cache with this manifest has (``ceil(num_examples / shard_size)``)."""
    return -(-int(manifest["num_examples"]) // int(manifest["shard_size"]))


def shard_keys(manifest: Mapping[str, Any]) -> set[str]:
    """The names of the tensors every shard of a cache with this manifest holds."""
    keys = {"example_offsets", "position"}
    keys |= {f"head{h}.{name}" for h in range(int(manifest["num_heads"])) for name in ("ids", "logprobs", "leftover")}
    if manifest["features"]:
        keys |= {"feature_offsets"} | {f"feature.{j}" for j in range(len(manifest["features"]))}
    return keys
