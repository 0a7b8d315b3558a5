"""DistillationTrainer from a teacher-output cache (``teacher_cache``): no teacher runs, the KD term reads the cached
top-k, and with a full cache the updates, the logged loss and its terms equal those of the live teacher; the
options a cache cannot serve are refused by name before training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_hf import _args, _examples, _models, _params, _stack

from kdistill.cache import CacheMismatchError, CacheReader, build_manifest, dataset_fingerprint, write_cache
from kdistill.cache.batches import CachedTeacherCollate, with_cache_index
from kdistill.errors import InvalidArgumentError, VocabMismatchError
from kdistill.integrations import DistillationTrainer
from kdistill.tasks.causal_lm import CausalLMView

VOCAB = 128


def _write(tmp_path: Path, teacher: torch.nn.Module, examples: list, k: int, temperature: float) -> Path:
    manifest = build_manifest(
        teacher="tiny", teacher_revision=None, tokenizer_hash="-", dataset_fingerprint=dataset_fingerprint(examples),
        k=k, dtype="float32", temperature=temperature, num_examples=len(examples), vocab_size=VOCAB, shard_size=3,
    )  # fmt: skip
    directory = tmp_path / "cache"
    write_cache(directory, teacher, examples, _stack, CausalLMView(), manifest, batch_size=4)
    return directory


def _train(student, teacher, args, **kwargs: Any) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, data_collator=_stack, **kwargs)
    trainer.train()
    assert trainer.teacher is None if teacher is None else trainer.teacher is teacher
    return _params(student), [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize(("chunked", "policy"), [(False, "renormalize"), (True, "renormalize"), (True, "uniform")])
def test_a_full_cache_trains_like_the_live_teacher(tmp_path: Path, chunked: bool, policy: str) -> None:
    examples = _examples()
    student, teacher = _models()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(6.0)  # a confident teacher: the KD term dominates the updates
    cache = _write(tmp_path, teacher, examples, VOCAB, temperature=2.0)
    start = _params(student)
    options = {"temperature": 2.0, "hard_weight": 0.5, "chunked_loss": chunked, "chunk_size": 5,
               "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 0.5}  # fmt: skip
    live_params, live_logs = _train(student, teacher, _args(tmp_path / "live", **options), train_dataset=examples)
    student.load_state_dict(start, strict=False)
    cached_params, cached_logs = _train(
        student, None, _args(tmp_path / "cached", teacher_cache=str(cache), cache_leftover=policy, **options),
        train_dataset=with_cache_index(examples),
    )  # fmt: skip
    assert max(float((live_params[n] - start[n]).abs().max()) for n in start) > 1e-3
    for name in live_params:
        torch.testing.assert_close(cached_params[name], live_params[name], rtol=1e-5, atol=1e-6, msg=name)
    assert len(cached_logs) == len(live_logs) == 2
    for cached, live in zip(cached_logs, live_logs, strict=True):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert cached[key] == pytest.approx(live[key], rel=1e-5), key


def test_a_top_k_cache_logs_the_sparse_kd_term(tmp_path: Path) -> None:
    """The logged kd_loss of the first step is the renormalized top-k forward KL of the start weights (float64)."""
    examples = _examples()
    student, teacher = _models()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(6.0)  # a KL well above float32 rounding
    cache = _write(tmp_path, teacher, examples, 5, temperature=1.5)
    reference_student = _models()[0].double()
    args = _args(tmp_path, teacher_cache=str(cache), temperature=1.5, max_steps=1, per_device_train_batch_size=8)
    trainer = DistillationTrainer(model=student, args=args, data_collator=_stack,
                                  train_dataset=with_cache_index(examples))  # fmt: skip
    trainer.train()
    [log] = [entry for entry in trainer.state.log_history if "loss" in entry]
    batch = _stack(examples)
    with torch.no_grad():
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        t = torch.log_softmax(teacher.double()(**kwargs).logits / 1.5, dim=-1)
        s = reference_student(**kwargs).logits / 1.5
    labels = batch["labels"]
    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != -100
    top = t[counted].topk(5, dim=-1)
    p = top.values.log_softmax(-1)
    q = s[counted].gather(-1, top.indices).log_softmax(-1)
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert expected > 0.01
    assert log["kd_loss"] == pytest.approx(expected, rel=1e-5)  # a float32 student and cache
    assert log["loss"] == pytest.approx(1.5**2 * expected, rel=1e-5)  # kd_weight 1, T² scaling, hard_weight 0


def test_a_cached_collate_given_as_the_data_collator_is_used(tmp_path: Path) -> None:
    examples = _examples()
    student, teacher = _models()
    cache = _write(tmp_path, teacher, examples, 4, temperature=1.0)
    collate = CachedTeacherCollate(_stack, CacheReader(cache), per_token=True)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), data_collator=collate,
                                  train_dataset=with_cache_index(examples))  # fmt: skip
    before = _params(student)
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in _params(student).items())


def test_what_a_cache_cannot_serve_is_refused_by_name(tmp_path: Path) -> None:
    examples = _examples()
    student, teacher = _models()
    cache = str(_write(tmp_path, teacher, examples, 4, temperature=2.0))
    indexed = with_cache_index(examples)

    def make(teacher_model=None, train_dataset=indexed, **overrides: Any) -> None:
        args = _args(tmp_path, **{"teacher_cache": cache, "temperature": 2.0, **overrides})
        DistillationTrainer(model=student, teacher_model=teacher_model, args=args, data_collator=_stack,
                            train_dataset=train_dataset)  # fmt: skip

    with pytest.raises(InvalidArgumentError, match=r"on_policy_fraction=0\.5 cannot be used with teacher_cache"):
        _args(tmp_path, teacher_cache=cache, on_policy_fraction=0.5)
    with pytest.raises(InvalidArgumentError, match="teacher_model and a teacher cache were both given"):
        make(teacher_model=teacher)
    with pytest.raises(InvalidArgumentError, match="train_dataset example 0 has no 'cache_index'"):
        make(train_dataset=examples)
    with pytest.raises(CacheMismatchError, match=r"'temperature' is 2\.0 but the arguments have temperature=1\.0"):
        make(temperature=1.0)
    with pytest.raises(InvalidArgumentError, match="cache_leftover='spread' is not one of"):
        make(cache_leftover="spread")
    small = _models(student_vocab=120)[0]
    with pytest.raises(VocabMismatchError, match=r"student vocabulary has 120 entries but the cache's teacher .* 128"):
        DistillationTrainer(model=small, args=_args(tmp_path, teacher_cache=cache, temperature=2.0),
                            data_collator=_stack, train_dataset=indexed)  # fmt: skip
