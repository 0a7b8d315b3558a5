"""Teacher outputs cached on disk: top-k log-probabilities per counted position, and the teacher features a run's
intermediate matches need (see :mod:`kdistill.cache.manifest` for the layout; :mod:`~kdistill.cache.store` writes,
:mod:`~kdistill.cache.reader` reads, :mod:`~kdistill.cache.batches` lays entries on a batch)."""

from kdistill.cache.batches import CachedTeacherCollate, with_cache_index
from kdistill.cache.manifest import (
    FORMAT_VERSION,
    MANIFEST_FIELDS,
    CacheIncompleteError,
    CacheMismatchError,
    build_manifest,
    dataset_fingerprint,
    num_shards,
    shard_name,
    tokenizer_hash,
)
from kdistill.cache.reader import CacheReader, cache_bytes, dense_logprobs
from kdistill.cache.store import topk_entries, write_cache

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FIELDS",
    "CacheIncompleteError",
    "CacheMismatchError",
    "CacheReader",
    "CachedTeacherCollate",
    "build_manifest",
    "cache_bytes",
    "dataset_fingerprint",
    "dense_logprobs",
    "num_shards",
    "shard_name",
    "tokenizer_hash",
    "topk_entries",
    "with_cache_index",
    "write_cache",
]
