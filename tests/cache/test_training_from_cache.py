"""Distilling from the cache: the engine's KD term on cached top-k equals the live teacher's (k = V) or a reference
computed here (k < V), and training from a k = V cache ends where training with the live teacher ends."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_cache import NUM_LABELS, VOCAB, causal_examples, manifest_for, pad_collate, sequence_examples

from conftest import make_tiny_bert, make_tiny_llama
from kdistill.cache import CacheReader, write_cache
from kdistill.cache.batches import CachedTeacherCollate, with_cache_index
from kdistill.core.views import SequenceView
from kdistill.distillers import Distiller, Objective
from kdistill.tasks.causal_lm import CausalLMView
from kdistill.training import TrainConfig, train

CASES = {
    "sequence": (lambda: make_tiny_bert(num_labels=NUM_LABELS), SequenceView(), sequence_examples, NUM_LABELS),
    "causal": (make_tiny_llama, CausalLMView(), causal_examples, VOCAB),
}


def cached(tmp_path: Path, case: str, k: int | str, temperature: float = 2.0):
    make_teacher, view, make_examples, vocab = CASES[case]
    teacher, examples = make_teacher(), make_examples()
    with torch.no_grad():  # a confident teacher: KL values well above float32 noise
        teacher.get_output_embeddings().weight.mul_(8.0) if case == "causal" else teacher.classifier.weight.mul_(20.0)
    k = vocab if k == "all" else k
    manifest = manifest_for(examples, vocab=vocab, k=k, temperature=temperature)
    # one batch, as the live teacher sees them below: the same padding, so the same float32 outputs
    write_cache(tmp_path / "cache", teacher, examples, pad_collate, view, manifest, batch_size=len(examples))
    return teacher, view, examples, CacheReader(tmp_path / "cache")


def kd_total(distiller: Distiller, batch) -> torch.Tensor:
    with torch.no_grad():
        return distiller.compute_terms(distiller.module, batch, {"kd": 1.0}, 0, 1)["kd"].total


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("policy", ["renormalize", "uniform"])
def test_k_equals_v_cache_gives_the_live_kd_term(tmp_path: Path, case: str, policy: str) -> None:
    teacher, view, examples, reader = cached(tmp_path, case, "all")
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.2 * torch.randn_like(p))
    objective = Objective(kd_weight=1.0, hard_weight=0.0, temperature=2.0)
    live = Distiller(student, teacher, objective, view=view)
    live.setup(pad_collate(examples))
    collate = CachedTeacherCollate(pad_collate, reader, per_token=case == "causal", leftover_policy=policy)
    from_cache = Distiller(student, None, objective, view=view)
    from_cache.setup(collate(with_cache_index(examples)))
    expected = kd_total(live, pad_collate(examples))
    got = float(kd_total(from_cache, collate(with_cache_index(examples))))
    assert got == pytest.approx(float(expected), rel=1e-5)


def test_top_k_cache_matches_a_reference(tmp_path: Path) -> None:
    teacher, view, examples, reader = cached(tmp_path, "sequence", 2, temperature=1.5)
    student = make_tiny_bert(num_labels=NUM_LABELS, seed=3)
    distiller = Distiller(student, None, Objective(kd_weight=1.0, hard_weight=0.0, temperature=1.5), view=view)
    collate = CachedTeacherCollate(pad_collate, reader, per_token=False)
    batch = collate(with_cache_index(examples))
    distiller.setup(batch)
    got = float(kd_total(distiller, batch))
    inputs = pad_collate(examples)
    with torch.no_grad():
        t = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.double() / 1.5
        s = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.double() / 1.5
    top = t.log_softmax(-1).topk(2, dim=-1)
    p = top.values.log_softmax(-1)  # renormalized over the top 2
    q = s.gather(-1, top.indices).log_softmax(-1)  # the student over the same ids, renormalized
    reference = float((p.exp() * (p - q)).sum()) * 1.5**2
    assert got == pytest.approx(reference, rel=1e-4)  # float32 cache and student against a float64 reference


def test_training_from_a_k_equals_v_cache_ends_like_the_live_teacher(tmp_path: Path) -> None:
    teacher, view, examples, reader = cached(tmp_path, "sequence", "all")
    start = make_tiny_bert(num_labels=NUM_LABELS, num_layers=2, seed=5)
    objective = Objective(kd_weight=1.0, hard_weight=0.0, temperature=2.0)
    config = {"batch_size": 4, "num_epochs": 2, "learning_rate": 0.5, "progress": False, "log_with": (),
              "lr_scheduler": "constant", "optimizer": "sgd", "max_grad_norm": None}  # fmt: skip
    students = {}
    for name in ("live", "cache"):
        student = copy.deepcopy(start)
        if name == "live":
            distiller, data, collate = Distiller(student, teacher, objective, view=view), examples, pad_collate
        else:
            distiller = Distiller(student, None, objective, view=view)
            data, collate = with_cache_index(examples), CachedTeacherCollate(pad_collate, reader, per_token=False)
        train(distiller, data, TrainConfig(output_dir=str(tmp_path / name), **config), collate_fn=collate)
        students[name] = student
    pairs = zip(students["live"].parameters(), start.parameters(), strict=True)
    moved = max(float((p - q).abs().max()) for p, q in pairs)
    assert moved > 1e-4  # training did something
    for (name, a), b in zip(students["live"].named_parameters(), students["cache"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
