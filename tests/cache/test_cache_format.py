"""Cache format 2: packed rows (offsets per shard, int32 positions), cache_bytes, old caches refused, and teacher
features for intermediate matches (stored as the live teacher computes them, laid out again on any padding, and
giving the live teacher's loss terms)."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from test_cache import NUM_LABELS, VOCAB, causal_examples, manifest_for, pad_collate, sequence_examples

from conftest import make_tiny_bert, make_tiny_llama
from kdistill.cache import CacheMismatchError, CacheReader, cache_bytes, write_cache
from kdistill.cache.batches import CachedTeacherCollate, with_cache_index
from kdistill.core.views import SequenceView
from kdistill.distillers import Distiller, Match, Objective, expand_layer_map
from kdistill.errors import InvalidArgumentError, KdistillError
from kdistill.features import extract_features
from kdistill.runs.cache_checks import cached_feature_specs
from kdistill.tasks.causal_lm import CausalLMView


def header_bytes(path: Path) -> int:
    """A safetensors file's 8-byte length prefix plus its JSON header: everything that is not tensor data."""
    with path.open("rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def test_a_position_costs_392_bytes_at_k_64_in_float16(tmp_path: Path) -> None:
    teacher = make_tiny_llama(num_layers=1)
    examples = causal_examples(count=7)
    manifest = manifest_for(examples, vocab=VOCAB, k=64, dtype="float16", shard_size=3)
    write_cache(tmp_path, teacher, examples, pad_collate, CausalLMView(), manifest, batch_size=2)
    positions = sum(len(example["input_ids"]) - 1 for example in examples)  # next-token positions
    shards = sorted(tmp_path.glob("shard-*.safetensors"))
    assert len(shards) == 3
    measured = cache_bytes(tmp_path)
    assert measured["shard_bytes"] == sum(path.stat().st_size for path in shards)
    assert measured["positions"] == positions
    assert measured["bytes_per_position"] == pytest.approx(measured["shard_bytes"] / positions)
    assert (measured["examples"], measured["shards"]) == (7, 3)
    # tensor data: 4 (int32 position) + 64 * 4 (ids) + 64 * 2 (float16 log-probs) + 4 (leftover) per position,
    # plus 8 bytes per example (and one more per shard) of offsets
    data = sum(path.stat().st_size - header_bytes(path) for path in shards)
    assert data == 392 * positions + 8 * (7 + 3)
    reader = CacheReader(tmp_path)
    for index, example in enumerate(examples):  # the offsets find each example's rows
        (entry,) = reader.get(index)
        assert entry["position"].dtype == torch.int64
        assert entry["position"].tolist() == list(range(len(example["input_ids"]) - 1))


def test_a_cache_of_another_format_is_refused_with_advice_to_rebuild(tmp_path: Path) -> None:
    teacher = make_tiny_llama(num_layers=1)
    examples = causal_examples(count=3)
    manifest = manifest_for(examples, vocab=VOCAB)
    write_cache(tmp_path, teacher, examples, pad_collate, CausalLMView(), manifest)
    old = json.loads((tmp_path / "manifest.json").read_text())
    old["format_version"] = 1
    del old["features"]  # a version-1 manifest has no features field: the version is what gets named
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(CacheMismatchError, match=r"format_version 1 but this kdistill reads format_version 2; rebu"):
        CacheReader(tmp_path)
    with pytest.raises(CacheMismatchError, match="rebuild the cache"):
        write_cache(tmp_path, teacher, examples, pad_collate, CausalLMView(), manifest)
    with pytest.raises(CacheMismatchError, match="rebuild the cache"):
        cache_bytes(tmp_path)


def live_features(model, batch, specs):
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        _, features = extract_features(model, inputs, {spec: spec for spec in specs})
    return features


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_features_are_the_live_teachers_at_attended_positions(tmp_path: Path, dtype: str) -> None:
    teacher = make_tiny_llama(num_layers=2)
    examples = causal_examples(count=7)
    specs = ["layer 2", "embeddings"]
    manifest = manifest_for(examples, vocab=VOCAB, k=4, dtype=dtype, shard_size=3, features=specs)
    write_cache(tmp_path, teacher, examples, pad_collate, CausalLMView(), manifest, batch_size=3)
    reader = CacheReader(tmp_path)
    assert reader.features == specs
    for start in range(0, 7, 3):  # one teacher batch per shard, as written
        batch = pad_collate(examples[start : start + 3])
        live = live_features(teacher, batch, specs)
        for row in range(batch["input_ids"].shape[0]):
            attended = batch["attention_mask"][row].bool()
            stored = reader.get_features(start + row)
            for j, spec in enumerate(specs):
                expected = live[spec][row][attended]
                assert stored[j].shape == expected.shape == (int(attended.sum()), 32)
                assert torch.equal(stored[j], expected.to(getattr(torch, dtype)))
    data = sum(path.stat().st_size - header_bytes(path) for path in tmp_path.glob("shard-*.safetensors"))
    tokens = sum(len(example["input_ids"]) for example in examples)
    width = 4 if dtype == "float32" else 2
    assert data == (4 + 4 * 4 + 4 * width + 4) * (tokens - 7) + 2 * 8 * (7 + 3) + 2 * 32 * width * tokens
    assert cache_bytes(tmp_path)["shard_bytes"] > data  # features count in a benchmark's bytes


def left_pad_collate(chunk):
    """Left padding: the attended positions move with the batch's width, and the features must follow them."""
    batch = pad_collate(chunk)
    for key in ("input_ids", "attention_mask"):
        batch[key] = torch.stack([row.roll(int((row_mask == 0).sum())) for row, row_mask in
                                  zip(batch[key], batch["attention_mask"], strict=True)])  # fmt: skip
    return batch


def test_collate_lays_features_out_on_the_batchs_own_padding(tmp_path: Path) -> None:
    teacher = make_tiny_llama(num_layers=2)
    examples = causal_examples(count=5)
    manifest = manifest_for(examples, vocab=VOCAB, k=4, shard_size=5, features=["layer 1"])
    write_cache(tmp_path, teacher, examples, pad_collate, CausalLMView(), manifest, batch_size=5)
    reader = CacheReader(tmp_path)
    chosen = [4, 1]  # another batch than the written one: other width, other order
    for collate_fn in (pad_collate, left_pad_collate):
        collate = CachedTeacherCollate(collate_fn, reader, per_token=True, features={"m": 0})
        batch = collate([with_cache_index(examples)[i] for i in chosen])
        grid = batch["teacher_features"]["m"]
        assert grid.shape == (2, batch["input_ids"].shape[1], 32) and grid.dtype == torch.float32
        for row, index in enumerate(chosen):
            attended = batch["attention_mask"][row].bool()
            assert torch.equal(grid[row][attended], reader.get_features(index)[0])
            assert torch.all(grid[row][~attended] == 0)

    def shorter(chunk):  # the data changed since the cache was written: one token less per example
        return pad_collate([{"input_ids": e["input_ids"][1:], "labels": e["labels"][1:]} for e in chunk])

    shifted = CachedTeacherCollate(shorter, reader, per_token=True, features={"m": 0})
    with pytest.raises(InvalidArgumentError, match=r"example 4: the cache holds teacher features at \d+ positions"):
        shifted([with_cache_index(examples)[4]])


def test_uncacheable_matches_are_refused_by_name() -> None:
    attention = Objective(matches=[Match(teacher="layer 2", student="layer 1", feature="attention",
                                         loss="attention_mse")])  # fmt: skip
    with pytest.raises(InvalidArgumentError, match=r"attention maps cannot be cached \(heads × T × T"):
        cached_feature_specs(attention)
    logits = Objective(matches=[Match(teacher="logits", student="logits", feature="logits", loss="forward_kl")])
    with pytest.raises(InvalidArgumentError, match="'logits:logits->logits': logits matches cannot be cached"):
        cached_feature_specs(logits)
    matches = [Match(teacher="layer 2", student="layer 1"), Match(teacher="layer 2", student="layer 2", name="b"),
               Match(teacher="embeddings", student="embeddings", feature="embeddings")]  # fmt: skip
    assert cached_feature_specs(Objective(matches=matches)) == ["layer 2", "embeddings"]


def test_a_distiller_without_teacher_needs_the_features_of_its_matches() -> None:
    student = make_tiny_bert(num_layers=1, num_labels=NUM_LABELS)
    objective = Objective(kd_weight=0.0, hard_weight=1.0, matches=[Match(teacher="layer 1", student="layer 1")])
    distiller = Distiller(student, None, objective, view=SequenceView())
    with pytest.raises(KdistillError, match=r"match 'hidden:layer 1->layer 1' needs the teacher's features"):
        distiller.setup(pad_collate(sequence_examples(4)))


def test_cached_features_give_the_live_teachers_terms(tmp_path: Path) -> None:
    teacher = make_tiny_bert(num_layers=4, num_labels=NUM_LABELS)
    with torch.no_grad():
        teacher.classifier.weight.mul_(20.0)
    examples = sequence_examples()
    matches = expand_layer_map("uniform", 4, 2, loss="hidden_mse", projection="linear")  # teacher layers 2 and 4
    objective = Objective(kd_weight=1.0, hard_weight=0.0, temperature=2.0, matches=matches)
    specs = cached_feature_specs(objective)
    assert specs == ["layer 2", "layer 4"]
    manifest = manifest_for(examples, vocab=NUM_LABELS, k=NUM_LABELS, temperature=2.0, shard_size=10, features=specs)
    write_cache(tmp_path, teacher, examples, pad_collate, SequenceView(), manifest, batch_size=10)
    start = make_tiny_bert(num_layers=2, hidden=16, heads=2, num_labels=NUM_LABELS, seed=3)  # projections needed

    live = Distiller(copy.deepcopy(start), teacher, objective, view=SequenceView())
    torch.manual_seed(0)
    live.setup(pad_collate(examples))
    collate = CachedTeacherCollate(pad_collate, CacheReader(tmp_path), per_token=False,
                                   features={m.name: specs.index(m.teacher) for m in matches})  # fmt: skip
    from_cache = Distiller(copy.deepcopy(start), None, objective, view=SequenceView())
    torch.manual_seed(0)
    batch = collate(with_cache_index(examples))
    from_cache.setup(batch)
    assert sorted(from_cache.projections_state()) == sorted(live.projections_state())  # built from cached shapes
    weights = {"kd": 1.0, **{m.name: 1.0 for m in matches}}
    with torch.no_grad():
        got = from_cache.compute_terms(from_cache.module, batch, weights, 0, 1)
        expected = live.compute_terms(live.module, pad_collate(examples), weights, 0, 1)
    assert sorted(got) == sorted(expected) == sorted(weights)
    for name in weights:
        assert float(got[name].total) == pytest.approx(float(expected[name].total), rel=1e-5), name

    # float64 reference of each match term: Σ over attended positions of mean_H (W s + b - t)²
    inputs = pad_collate(examples)
    mask = inputs["attention_mask"].bool()
    student_features = live_features(from_cache.student, inputs, ["layer 1", "layer 2"])
    teacher_features = live_features(teacher, inputs, specs)
    state = from_cache.projections_state()
    for match in matches:
        weight, bias = state[f"{match.name}/weight"].double(), state[f"{match.name}/bias"].double()
        projected = student_features[match.student].double() @ weight.T + bias
        reference = (projected - teacher_features[match.teacher].double()).pow(2).mean(-1)[mask].sum()
        assert float(got[match.name].total) == pytest.approx(float(reference), rel=1e-5), match.name
        assert float(reference) > 1e-3
