"""The causal-LM KD term from cached top-k teacher outputs (:func:`kdistill.distillers.lm_cached.cached_lm_loss_sums`).

``teacher_topk`` is built here as :class:`kdistill.cache.CachedTeacherCollate` documents it, from the teacher's own
logits, so these tests check the loss and not the cache's storage: a ``k = V`` cache gives the live teacher's KD
term and gradients (float64 models), a ``k < V`` cache gives float64 references written here for both leftover
policies, the chunked path equals the plain one, and a cache of other positions or temperature is refused.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from conftest import LLAMA_VOCAB, make_causal_batch, make_tiny_llama
from kdistill.core.shift import counted_next_tokens, next_token_labels
from kdistill.distillers.lm_cached import cached_lm_loss_sums
from kdistill.distillers.lm_loss import causal_lm_loss_sums
from kdistill.errors import InvalidArgumentError, ShapeMismatchError

TEMPERATURE = 2.0


def _batch() -> dict[str, torch.Tensor]:
    batch = make_causal_batch(batch=3, seq=9, seed=2)
    batch["labels"][0, :3] = -100  # a masked prompt
    return batch


def _models(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, nn.Module]:
    teacher = make_tiny_llama(num_layers=2, hidden=32, seed=0).to(dtype)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(6.0)  # peaked: KL values well above rounding
    student = make_tiny_llama(num_layers=1, hidden=16, seed=1).to(dtype)
    return student, teacher


def _teacher_topk(teacher: nn.Module, batch: dict, k: int, temperature: float = TEMPERATURE) -> dict[str, Any]:
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = torch.log_softmax(logits.double() / temperature, dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    mass = torch.logsumexp(values, dim=-1).clamp(max=0.0)
    leftover = torch.full_like(mass, -math.inf) if k == logits.shape[-1] else torch.log(-torch.expm1(mass))
    head = {"ids": ids, "logprobs": values.to(logits.dtype), "leftover": leftover.to(logits.dtype),
            "mask": counted_next_tokens(batch["labels"])}  # fmt: skip
    return {"heads": [head], "temperature": temperature, "leftover_policy": "renormalize"}


def _loss_and_grads(student: nn.Module, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    student.zero_grad(set_to_none=True)
    sums = compute()
    total = sums.kd_sum + (0.0 if sums.hard_sum is None else sums.hard_sum)
    total.backward()
    grads = {name: p.grad.detach().clone() for name, p in student.named_parameters() if p.grad is not None}
    return total.detach(), grads


def _assert_same(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict], rtol: float, atol: float) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("policy", ["renormalize", "uniform"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd"])
def test_a_full_cache_gives_the_live_teachers_loss_and_gradients(chunked: bool, policy: str, divergence: str) -> None:
    student, teacher = _models()
    batch = _batch()
    topk = _teacher_topk(teacher, batch, LLAMA_VOCAB)
    options = {"divergence": divergence, "temperature": TEMPERATURE, "hard_weight": 1.0, "chunked": chunked,
               "chunk_size": 5}  # fmt: skip
    live = _loss_and_grads(student, lambda: causal_lm_loss_sums(student, teacher, batch, **options))
    cached = _loss_and_grads(
        student, lambda: cached_lm_loss_sums(student, batch, topk, leftover_policy=policy, **options)
    )
    assert float(live[0]) > 1.0
    _assert_same(cached, live, rtol=1e-9, atol=1e-11)


def _reference_kd(student: nn.Module, batch: dict, topk: dict, policy: str) -> torch.Tensor:
    """Forward KL of the renormalized (or uniformly completed) top-k teacher from the student, float64, by hand."""
    head = topk["heads"][0]
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    total = torch.zeros((), dtype=torch.float64)
    vocab = s.shape[-1]
    for b, t in counted_next_tokens(batch["labels"]).nonzero().tolist():
        ids, lp = head["ids"][b, t], head["logprobs"][b, t].double()
        student_row = s[b, t] / TEMPERATURE
        if policy == "renormalize":
            p = lp - torch.logsumexp(lp, 0)
            q = student_row[ids] - torch.logsumexp(student_row[ids], 0)
        else:
            k = ids.numel()
            p = torch.full((vocab,), float(head["leftover"][b, t]) - math.log(vocab - k), dtype=torch.float64)
            p[ids] = lp
            q = student_row - torch.logsumexp(student_row, 0)
        total += (p.exp() * (p - q)).sum()
    return total


@pytest.mark.parametrize("policy", ["renormalize", "uniform"])
@pytest.mark.parametrize("chunked", [False, True])
def test_a_top_k_cache_matches_a_float64_reference(policy: str, chunked: bool) -> None:
    student, teacher = _models()
    batch = _batch()
    topk = _teacher_topk(teacher, batch, 7)
    got = cached_lm_loss_sums(student, batch, topk, temperature=TEMPERATURE, leftover_policy=policy,
                              chunked=chunked, chunk_size=4)  # fmt: skip
    expected = _reference_kd(student, batch, topk, policy)
    assert float(got.kd_sum.detach()) == pytest.approx(float(expected), rel=1e-10)
    assert got.count == int(counted_next_tokens(batch["labels"]).sum())
    if policy == "uniform":  # the leftover mass matters: the two policies must differ here
        other = cached_lm_loss_sums(student, batch, topk, temperature=TEMPERATURE, leftover_policy="renormalize")
        assert abs(float(other.kd_sum.detach()) - float(got.kd_sum.detach())) > 1e-3


@pytest.mark.parametrize("policy", ["renormalize", "uniform"])
def test_chunked_equals_plain_in_float32(policy: str) -> None:
    student, teacher = _models(torch.float32)
    batch = _batch()
    topk = _teacher_topk(teacher, batch, 5)
    options = {"temperature": TEMPERATURE, "leftover_policy": policy, "hard_weight": 0.5, "divergence": "reverse_kl"}
    plain = _loss_and_grads(student, lambda: cached_lm_loss_sums(student, batch, topk, **options))
    chunked = _loss_and_grads(
        student, lambda: cached_lm_loss_sums(student, batch, topk, chunked=True, chunk_size=3, **options)
    )
    _assert_same(chunked, plain, rtol=1e-4, atol=1e-6)


def test_the_hard_label_term_is_the_live_one() -> None:
    student, teacher = _models()
    batch = _batch()
    topk = _teacher_topk(teacher, batch, 3)
    got = cached_lm_loss_sums(student, batch, topk, temperature=TEMPERATURE, hard_weight=1.0)
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = next_token_labels(batch["labels"])
    expected = nn.functional.cross_entropy(logits.reshape(-1, LLAMA_VOCAB), targets.reshape(-1), reduction="sum")
    assert float(got.hard_sum.detach()) == pytest.approx(float(expected), rel=1e-10)


def test_a_cache_of_other_positions_or_temperature_is_refused() -> None:
    student, teacher = _models()
    batch = _batch()
    topk = _teacher_topk(teacher, batch, 3)
    shifted = dict(batch, labels=batch["labels"].clone())
    shifted["labels"][0, 3] = -100  # one counted position fewer than the cache holds
    held = int(counted_next_tokens(batch["labels"]).sum())
    message = rf"the cache holds {held} positions of this batch but its labels count {held - 1} .* row 0, position 2"
    with pytest.raises(ShapeMismatchError, match=message):
        cached_lm_loss_sums(student, shifted, topk, temperature=TEMPERATURE)
    longer = {key: torch.nn.functional.pad(value, (0, 2), value=-100 if key == "labels" else 0)
              for key, value in batch.items()}  # fmt: skip
    with pytest.raises(ShapeMismatchError, match=r"shape \(3, 9\).*labels have shape \(3, 11\)"):
        cached_lm_loss_sums(student, longer, topk, temperature=TEMPERATURE)
    with pytest.raises(InvalidArgumentError, match=r"temperature is 2\.0 but the loss uses temperature=1\.0"):
        cached_lm_loss_sums(student, batch, topk, temperature=1.0)
    small = make_tiny_llama(num_layers=1, hidden=16, vocab=20, seed=1).double()
    small_batch = dict(batch, input_ids=batch["input_ids"] % 20)
    for chunked in (False, True):
        with pytest.raises(InvalidArgumentError, match=r"teacher id \d+ but the student's vocabulary has 20"):
            cached_lm_loss_sums(small, small_batch, topk, temperature=TEMPERATURE, chunked=chunked)
