"""The teacher-output cache: stored top-k equal the live teacher's, resume and workers give identical bytes.

Every reference below runs the teacher on exactly the batches :func:`write_cache` forms (batches start at each
shard's first example), so float32 entries can be compared bit for bit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_batch, make_causal_batch, make_tiny_bert, make_tiny_chat_tokenizer, make_tiny_llama
from kdistill import __version__
from kdistill.cache import (
    CacheIncompleteError,
    CacheMismatchError,
    CacheReader,
    build_manifest,
    dataset_fingerprint,
    dense_logprobs,
    shard_name,
    tokenizer_hash,
    write_cache,
)
from kdistill.core.views import SequenceView
from kdistill.errors import InvalidArgumentError, KdistillError, ShapeMismatchError
from kdistill.tasks.causal_lm import CausalLMView

NUM_LABELS = 5
VOCAB = 128


def split_examples(batch: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """A padded batch back into unpadded examples (lists), as a tokenizer would give them."""
    examples = []
    for row in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][row].sum())
        example = {"input_ids": batch["input_ids"][row, :length].tolist()}
        labels = batch["labels"][row]
        example["labels"] = labels[:length].tolist() if labels.dim() else int(labels)
        examples.append(example)
    return examples


def pad_collate(chunk: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` with 0 (and token ``labels`` with -100) to the longest example of the chunk."""
    width = max(len(example["input_ids"]) for example in chunk)
    ids = torch.zeros(len(chunk), width, dtype=torch.long)
    mask = torch.zeros(len(chunk), width, dtype=torch.long)
    token_labels = isinstance(chunk[0]["labels"], list)
    labels = torch.full((len(chunk), width), -100) if token_labels else torch.zeros(len(chunk), dtype=torch.long)
    for row, example in enumerate(chunk):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        mask[row, :n] = 1
        if token_labels:
            labels[row, :n] = torch.tensor(example["labels"])
        else:
            labels[row] = example["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def causal_examples(count: int = 7, seq: int = 10, seed: int = 0) -> list[dict[str, Any]]:
    batch = make_causal_batch(batch=count, seq=seq, vocab=VOCAB, seed=seed)
    batch["attention_mask"][:, 0] = 1  # every example has at least one token
    return split_examples(batch)


def sequence_examples(count: int = 10) -> list[dict[str, Any]]:
    return split_examples(make_batch(batch=count, seq=9, num_labels=NUM_LABELS, seed=1))


def manifest_for(examples: Sequence[Mapping[str, Any]], *, vocab: int, **overrides: Any) -> dict[str, Any]:
    fields = {
        "teacher": "tiny",
        "teacher_revision": None,
        "tokenizer_hash": "tok",
        "dataset_fingerprint": dataset_fingerprint(examples),
        "k": 4,
        "dtype": "float32",
        "temperature": 1.0,
        "num_examples": len(examples),
        "vocab_size": vocab,
        "shard_size": 3,
    }
    fields.update(overrides)
    return build_manifest(**fields)


def live_logprobs(teacher, examples, view, manifest, batch_size):
    """Per example: the live float32 and float64 log-softmax of its counted rows and their positions."""
    shard_size, temperature = manifest["shard_size"], manifest["temperature"]
    result = {}
    with torch.no_grad():
        for shard_start in range(0, len(examples), shard_size):
            stop = min(shard_start + shard_size, len(examples))
            for first in range(shard_start, stop, batch_size):
                last = min(first + batch_size, stop)
                batch = pad_collate(examples[first:last])
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                logits = view.logits(teacher(**inputs))[0]
                mask = view.kd_mask(batch)
                if mask is None:
                    mask = torch.ones(logits.shape[:-1], dtype=torch.bool)
                for row in range(last - first):
                    row_mask = mask[row].reshape(-1)
                    row_logits = logits[row].reshape(-1, logits.shape[-1])[row_mask]
                    result[first + row] = (
                        torch.log_softmax(row_logits.float() / temperature, dim=-1),
                        torch.log_softmax(row_logits.double() / temperature, dim=-1),
                        row_mask.nonzero().reshape(-1),
                    )
    return result


def check_against_live(reader, teacher, examples, view, manifest, batch_size):
    live = live_logprobs(teacher, examples, view, manifest, batch_size)
    k = manifest["k"]
    total = 0
    for index in range(len(examples)):
        (entry,) = reader.get(index)
        live32, live64, positions = live[index]
        values, ids = torch.topk(live32, k, dim=-1)
        assert torch.equal(entry["position"], positions)
        assert torch.equal(entry["ids"], ids.to(torch.int32))
        if manifest["dtype"] == "float32":
            assert entry["logprobs"].dtype == torch.float32
            assert torch.equal(entry["logprobs"], values)
        else:
            assert entry["logprobs"].dtype == torch.float16
            assert torch.equal(entry["logprobs"], values.half())
        reference = torch.log1p(-live64.gather(-1, ids).exp().sum(-1))
        torch.testing.assert_close(entry["leftover"].double(), reference, rtol=1e-6, atol=1e-6)
        total += len(positions)
    assert total > 0


def test_sequence_classifier_round_trip(tmp_path: Path) -> None:
    teacher = make_tiny_bert(num_layers=2, num_labels=NUM_LABELS)
    examples = sequence_examples()
    manifest = manifest_for(examples, vocab=NUM_LABELS, k=3, temperature=2.0, shard_size=4)
    write_cache(tmp_path, teacher, examples, pad_collate, SequenceView(), manifest, batch_size=3)
    reader = CacheReader(tmp_path)
    assert len(reader) == 10 and reader.is_complete() and reader.num_shards == 3
    assert list(reader.examples_in(2)) == [8, 9]
    assert reader.manifest["kdistill_version"] == __version__ and reader.manifest["num_heads"] == 1
    check_against_live(reader, teacher, examples, SequenceView(), manifest, batch_size=3)
    assert reader.get(4)[0]["position"].tolist() == [0]
    assert torch.equal(reader.get(torch.tensor(4))[0]["ids"], reader.get(4)[0]["ids"])  # any integer index
    assert teacher.training is False


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_causal_lm_round_trip(tmp_path: Path, dtype: str) -> None:
    teacher = make_tiny_llama(num_layers=2)
    examples = causal_examples()
    manifest = manifest_for(examples, vocab=VOCAB, k=8, dtype=dtype, temperature=1.5)
    write_cache(tmp_path, teacher, examples, pad_collate, CausalLMView(), manifest, batch_size=2)
    reader = CacheReader(tmp_path)
    check_against_live(reader, teacher, examples, CausalLMView(), manifest, batch_size=2)
    # next-token positions only: an example of n tokens counts positions 0 .. n - 2
    for index, example in enumerate(examples):
        assert reader.get(index)[0]["position"].tolist() == list(range(len(example["input_ids"]) - 1))


def test_full_vocabulary_gives_back_the_distribution(tmp_path: Path) -> None:
    teacher = make_tiny_llama(num_layers=2)
    examples = causal_examples(count=4)
    manifest = manifest_for(examples, vocab=VOCAB, k=VOCAB, shard_size=2)
    write_cache(tmp_path, teacher, examples, pad_collate, CausalLMView(), manifest, batch_size=2)
    reader = CacheReader(tmp_path)
    live = live_logprobs(teacher, examples, CausalLMView(), manifest, batch_size=2)
    for index in range(len(examples)):
        (entry,) = reader.get(index)
        assert torch.all(entry["leftover"] == -math.inf)
        assert torch.equal(dense_logprobs(entry, VOCAB), live[index][0])


def test_dense_logprobs_spreads_the_leftover() -> None:
    entry = {
        "ids": torch.tensor([[2, 0]], dtype=torch.int32),
        "logprobs": torch.tensor([[math.log(0.5), math.log(0.3)]]),
        "leftover": torch.tensor([math.log(0.2)]),
    }
    dense = dense_logprobs(entry, 4)
    torch.testing.assert_close(dense.exp(), torch.tensor([[0.3, 0.1, 0.5, 0.1]]))


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.glob("shard-*.safetensors"))}


@pytest.fixture(scope="module")
def causal_setup(tmp_path_factory: pytest.TempPathFactory):
    """A teacher, examples, a manifest (7 examples, 3 shards) and an uninterrupted one-worker cache of them."""
    teacher = make_tiny_llama(num_layers=2)
    examples = causal_examples()
    manifest = manifest_for(examples, vocab=VOCAB, k=5)
    reference = tmp_path_factory.mktemp("reference")
    write_cache(reference, teacher, examples, pad_collate, CausalLMView(), manifest, batch_size=2)
    return teacher, examples, manifest, reference


@pytest.mark.parametrize("damage", ["delete", "tmp_left", "truncated"])
def test_resume_writes_only_the_missing_shard(tmp_path: Path, causal_setup, damage: str) -> None:
    teacher, examples, manifest, reference = causal_setup
    write_cache(tmp_path, teacher, examples, pad_collate, CausalLMView(), manifest, batch_size=2)
    last = tmp_path / shard_name(2)
    if damage == "truncated":  # killed mid-write of a non-atomic writer: a torn file
        last.write_bytes(last.read_bytes()[:100])
    else:
        last.unlink()
    if damage == "tmp_left":  # killed before the rename
        (tmp_path / f".{last.name}.tmp-99999").write_bytes(b"partial")
    assert not CacheReader(tmp_path).is_complete() or damage == "truncated"
    before = {name: (tmp_path / name).stat().st_mtime_ns for name in (shard_name(0), shard_name(1))}
    written = []
    write_cache(
        tmp_path,
        teacher,
        examples,
        pad_collate,
        CausalLMView(),
        manifest,
        batch_size=2,
        progress=lambda done, total: written.append((done, total)),
    )
    after = {name: (tmp_path / name).stat().st_mtime_ns for name in before}
    assert after == before
    assert written == [(1, 3), (2, 3), (3, 3)]
    assert shard_bytes(tmp_path) == shard_bytes(reference)
    assert CacheReader(tmp_path).is_complete()
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))  # the stale temp file is gone
    check_against_live(CacheReader(tmp_path), teacher, examples, CausalLMView(), manifest, batch_size=2)


def test_two_workers_match_one(tmp_path: Path, causal_setup) -> None:
    teacher, examples, manifest, reference = causal_setup
    write_cache(tmp_path, teacher, examples, pad_collate, CausalLMView(), manifest, batch_size=2, num_workers=2)
    assert sorted(shard_bytes(tmp_path)) == [shard_name(0), shard_name(2)]
    assert not CacheReader(tmp_path).is_complete()
    with pytest.raises(CacheIncompleteError, match="shard 1"):
        CacheReader(tmp_path).get(3)
    write_cache(
        tmp_path, teacher, examples, pad_collate, CausalLMView(), manifest, batch_size=2, worker=1, num_workers=2
    )
    assert shard_bytes(tmp_path) == shard_bytes(reference)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", 2.0), ("k", 6), ("tokenizer_hash", "other"), ("teacher_revision", "v2")]
)
def test_manifest_mismatch_is_refused(causal_setup, field: str, value: Any) -> None:
    teacher, examples, manifest, reference = causal_setup
    other = manifest_for(examples, vocab=VOCAB, **{"k": 5, field: value})
    with pytest.raises(CacheMismatchError, match=f"'{field}' is .* but the run has {value!r}"):
        write_cache(reference, teacher, examples, pad_collate, CausalLMView(), other, batch_size=2)
    reader = CacheReader(reference)
    reader.check_against(manifest)
    with pytest.raises(KdistillError) as error:
        reader.check_against(other)
    assert str(error.value) == f"cache manifest field {field!r} is {manifest[field]!r} but the run has {value!r}"


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    examples = causal_examples(count=3)
    with pytest.raises(InvalidArgumentError, match=r"k must be an integer in \[1, vocab_size=128\]; got 0"):
        manifest_for(examples, vocab=VOCAB, k=0)
    with pytest.raises(InvalidArgumentError, match="got 129"):
        manifest_for(examples, vocab=VOCAB, k=VOCAB + 1)
    with pytest.raises(InvalidArgumentError, match="dtype"):
        manifest_for(examples, vocab=VOCAB, dtype="bfloat8")
    with pytest.raises(InvalidArgumentError, match="temperature"):
        manifest_for(examples, vocab=VOCAB, temperature=0.0)
    teacher = make_tiny_llama(num_layers=1)
    wrong_vocab = manifest_for(examples, vocab=VOCAB * 2)
    with pytest.raises(ShapeMismatchError, match=r"128 logits per position .* vocab_size=256"):
        write_cache(tmp_path / "a", teacher, examples, pad_collate, CausalLMView(), wrong_vocab)
    manifest = manifest_for(examples, vocab=VOCAB)
    with pytest.raises(ShapeMismatchError, match=r"2 examples .* num_examples=3"):
        write_cache(tmp_path / "b", teacher, examples[:2], pad_collate, CausalLMView(), manifest)
    with pytest.raises(InvalidArgumentError, match="worker must be in"):
        write_cache(tmp_path / "c", teacher, examples, pad_collate, CausalLMView(), manifest, worker=2, num_workers=2)
    with pytest.raises(CacheIncompleteError, match=r"manifest.json is missing"):
        CacheReader(tmp_path / "nowhere")
    write_cache(tmp_path / "d", teacher, examples, pad_collate, CausalLMView(), manifest)
    with pytest.raises(InvalidArgumentError, match=r"example_index must be in \[0, 3\); got 3"):
        CacheReader(tmp_path / "d").get(3)
    assert not any(name.startswith(".") for name in os.listdir(tmp_path / "d"))


def test_hashes() -> None:
    tokenizer = make_tiny_chat_tokenizer()
    assert tokenizer_hash(tokenizer) == tokenizer_hash(make_tiny_chat_tokenizer())
    assert tokenizer_hash(tokenizer) != tokenizer_hash(make_tiny_chat_tokenizer(vocab=100))
    with pytest.raises(InvalidArgumentError, match="get_vocab"):
        tokenizer_hash(object())
    examples = causal_examples(count=3)
    assert dataset_fingerprint(examples) == dataset_fingerprint([dict(e) for e in examples])
    assert dataset_fingerprint(examples) != dataset_fingerprint(examples[::-1])
    assert dataset_fingerprint([{"input_ids": [1, 2]}, {"input_ids": [3]}]) != dataset_fingerprint(
        [{"input_ids": [1]}, {"input_ids": [2, 3]}]
    )
