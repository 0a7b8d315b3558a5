"""The KD-term strategies: one interface, one unit each, the same numbers on every path, T² applied once."""

from __future__ import annotations

import pytest
import torch

from kdistill.distillers import CrossTokenizerDistiller, Distiller, MultiTeacherDistiller, Objective
from kdistill.distillers.cross import AlignedKD
from kdistill.distillers.kd_terms import (
    ChunkedKD,
    DenseKD,
    Ensemble,
    HeadStates,
    KDStrategy,
    Logits,
    MixtureKD,
    TopK,
    TopKKD,
)
from kdistill.distillers.lm_cross import LMAlignedKD
from kdistill.errors import InvalidArgumentError
from kdistill.integrations import DistillationArguments
from kdistill.integrations.trainer import lm_kd_strategy
from kdistill.tasks.causal_lm import CausalLMView


def _reference_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, t: float) -> torch.Tensor:
    """Σ over counted positions of KL(p_t || p_s) at temperature t, in float64."""
    p_t = torch.softmax(teacher.double() / t, -1)
    log_p_s = torch.log_softmax(student.double() / t, -1)
    per_position = (p_t * (p_t.log() - log_p_s)).sum(-1)
    return per_position[mask].sum()


def _head(batch: int = 2, seq: int = 5, hidden: int = 6, vocab: int = 11, seed: int = 0) -> HeadStates:
    generator = torch.Generator().manual_seed(seed)
    return HeadStates(
        torch.randn(batch, seq, hidden, generator=generator),
        torch.randn(vocab, hidden, generator=generator),
        torch.randn(vocab, generator=generator),
    )


def _logits_of(head: HeadStates) -> torch.Tensor:
    return head.hidden @ head.weight.t() + head.bias


def test_every_strategy_implements_the_interface_and_declares_its_unit():
    strategies = [
        DenseKD(),
        MixtureKD(),
        ChunkedKD(),
        TopKKD(),
        AlignedKD("uld", "forward_kl", {}),
        LMAlignedKD("align"),
    ]
    for strategy in strategies:
        assert isinstance(strategy, KDStrategy)
    assert {s.name: s.unit for s in strategies} == {
        "dense": "logit_positions",
        "mixture": "logit_positions",
        "chunked": "logit_positions",
        "cached_topk": "logit_positions",
        "cross_tokenizer": "aligned_pairs",
    }


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_dense_chunked_and_full_topk_give_the_float64_reference(temperature):
    student, teacher = _head(seed=1), _head(seed=2)
    labels = torch.tensor([[-100, -100, 4, 5, 6], [7, 8, 9, -100, -100]])  # uneven rows, padding on both sides
    batch = {"labels": labels}
    mask = CausalLMView().kd_mask(batch)
    reference = _reference_kl(_logits_of(student), _logits_of(teacher), mask, temperature)
    dense = DenseKD().values(Logits(_logits_of(student)), Logits(_logits_of(teacher)), mask, temperature, batch)
    chunked = ChunkedKD(chunk_size=3).values(student, teacher, mask, temperature, batch)
    logprobs = torch.log_softmax(_logits_of(teacher) / temperature, -1)
    ids = torch.arange(11).expand(*logprobs.shape)
    topk = TopK(ids, logprobs, torch.zeros(logprobs.shape[:-1]), temperature)
    cached = TopKKD(chunk_size=3).values(student, topk, mask, temperature, batch)
    cached_plain = TopKKD().values(Logits(_logits_of(student)), topk, mask, temperature, batch)
    for value in (dense.sum(), chunked, cached, cached_plain):
        torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-6)
    # every strategy counts the same unit of this batch: the counted next tokens
    view = CausalLMView()
    assert {s.count(batch, view) for s in (DenseKD(), ChunkedKD(), TopKKD())} == {float(mask.sum())} == {5.0}


def test_mixture_of_one_teacher_is_the_dense_term_and_two_follow_their_weights():
    student, a, b = (torch.randn(4, 7, generator=torch.Generator().manual_seed(s)) for s in (3, 4, 5))
    mask = torch.tensor([True, True, False, True])
    one = MixtureKD().values(Logits(student), Ensemble([a], [1.0]), mask, 2.0, {})
    torch.testing.assert_close(one.sum().double(), _reference_kl(student, a, mask, 2.0), rtol=1e-5, atol=1e-6)
    two = MixtureKD().values(Logits(student), Ensemble([a, b], [0.25, 0.75]), mask, 2.0, {})
    p = 0.25 * torch.softmax(a.double() / 2, -1) + 0.75 * torch.softmax(b.double() / 2, -1)
    log_p_s = torch.log_softmax(student.double() / 2, -1)
    reference = (p * (p.log() - log_p_s)).sum(-1)[mask].sum()
    torch.testing.assert_close(two.sum().double(), reference, rtol=1e-5, atol=1e-6)


def test_objective_applies_t_squared_once_for_every_strategy():
    student, teacher = _head(seed=6), _head(seed=7)
    batch = {"labels": torch.tensor([[1, 2, 3, 4, 5], [-100, 6, 7, 8, 9]])}
    mask = CausalLMView().kd_mask(batch)
    with_t2, without = Objective(temperature=3.0), Objective(temperature=3.0, t2_scaling=False)
    for strategy, s, t in (
        (DenseKD(), Logits(_logits_of(student)), Logits(_logits_of(teacher))),
        (ChunkedKD(), student, teacher),
    ):
        scaled = with_t2.kd_from(strategy, s, t, mask, 3.0, batch)
        plain = without.kd_from(strategy, s, t, mask, 3.0, batch)
        assert scaled.unit == plain.unit == "logit_positions"
        torch.testing.assert_close(scaled.total, plain.total * 9.0)
        reference = _reference_kl(_logits_of(student), _logits_of(teacher), mask, 3.0)
        torch.testing.assert_close(plain.total.double(), reference, rtol=1e-5, atol=1e-6)


def test_a_strategy_given_the_wrong_side_names_what_it_needs():
    with pytest.raises(InvalidArgumentError, match="HeadStates"):
        ChunkedKD().values(Logits(torch.zeros(2, 3)), Logits(torch.zeros(2, 3)), None, 1.0, {})
    with pytest.raises(InvalidArgumentError, match="TopK"):
        TopKKD().values(Logits(torch.zeros(2, 3)), Logits(torch.zeros(2, 3)), None, 1.0, {})


def test_both_backends_pick_their_strategy_from_the_same_classes(tiny_bert_teacher, tiny_bert_student):
    objective = Objective()
    assert type(Distiller(tiny_bert_student, tiny_bert_teacher, objective).kd_strategy) is DenseKD
    multi = MultiTeacherDistiller(tiny_bert_student, [tiny_bert_teacher, tiny_bert_teacher], objective)
    assert type(multi.kd_strategy) is MixtureKD
    assert type(Distiller(tiny_bert_student, None, objective).cached_kd_strategy) is TopKKD
    cross = CrossTokenizerDistiller(tiny_bert_student, tiny_bert_teacher, objective, method="align")
    assert type(cross.kd_strategy) is AlignedKD
    cases = {
        (): DenseKD,
        (("chunked_loss", True),): ChunkedKD,
        (("cross_tokenizer", "uld"),): LMAlignedKD,
    }
    for options, expected in cases.items():
        args = DistillationArguments(output_dir="unused", report_to=[], **dict(options))
        assert type(lm_kd_strategy(args.objective(), args, cached=False)) is expected
    args = DistillationArguments(output_dir="unused", report_to=[])
    assert type(lm_kd_strategy(args.objective(), args, cached=True)) is TopKKD
