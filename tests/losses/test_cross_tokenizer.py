"""Cross-tokenizer distillation: ULD against a float64 NumPy reference, offset alignment on hand-written spans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdistill.errors import InvalidArgumentError, ShapeMismatchError, VocabMismatchError
from kdistill.losses import forward_kl
from kdistill.losses.cross_tokenizer import (
    align_by_offsets,
    aligned_distillation_loss,
    aligned_distillation_loss_batch,
    uld_loss,
)

# ---------------------------------------------------------------- float64 reference


def _softmax(row: np.ndarray, temperature: float) -> np.ndarray:
    x = row.astype(np.float64) / temperature
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_uld(s_row: np.ndarray, t_row: np.ndarray, temperature: float) -> float:
    p = sorted(_softmax(s_row, temperature), reverse=True)
    q = sorted(_softmax(t_row, temperature), reverse=True)
    size = max(len(p), len(q))
    p += [0.0] * (size - len(p))
    q += [0.0] * (size - len(q))
    return float(sum(abs(a - b) for a, b in zip(p, q, strict=True)))


def ref_uld_loss(s, t, ms, mt, temperature, reduction):
    s, t = s.detach().double().numpy(), t.detach().double().numpy()
    per = np.zeros(s.shape[:2])
    for b in range(s.shape[0]):
        s_pos, t_pos = np.flatnonzero(ms[b]), np.flatnonzero(mt[b])
        for i, j in zip(s_pos, t_pos, strict=False):  # zip stops at the shorter count
            per[b, i] = ref_uld(s[b, i], t[b, j], temperature)
    n_pairs = sum(min(ms[b].sum(), mt[b].sum()) for b in range(s.shape[0]))
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if reduction == "mean":
        return per.sum() / max(n_pairs, 1)
    return per.sum() / s.shape[0]


# ---------------------------------------------------------------- uld_loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_matches_float64_reference(reduction, temperature):
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(3, 6, 9, generator=gen) * 2
    teacher = torch.randn(3, 5, 14, generator=gen) * 2
    ms = torch.rand(3, 6, generator=gen) > 0.3
    mt = torch.rand(3, 5, generator=gen) > 0.3
    ms[2] = False  # a row with nothing counted on the student side
    got = uld_loss(student, teacher, ms, mt, temperature=temperature, reduction=reduction)
    want = ref_uld_loss(student, teacher, ms.numpy(), mt.numpy(), temperature, reduction)
    assert got.dtype == torch.float32
    assert got.shape == ((3, 6) if reduction == "none" else ())
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_uld_single_sequence_float64_and_no_masks():
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    teacher = torch.randn(7, 8, generator=gen, dtype=torch.float64)
    got = uld_loss(student, teacher)
    assert got.dtype == torch.float64
    ones_s, ones_t = np.ones((1, 4), bool), np.ones((1, 7), bool)
    want = ref_uld_loss(student[None], teacher[None], ones_s, ones_t, 1.0, "mean")
    np.testing.assert_allclose(got.item(), want, rtol=1e-12)
    assert uld_loss(student, teacher, reduction="none").shape == (4,)


def test_uld_gradient_reaches_student_only():
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = uld_loss(student, teacher)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert torch.autograd.gradcheck(lambda s: uld_loss(s, teacher.detach()), (student.detach().requires_grad_(),))


def test_uld_is_zero_for_permuted_vocabulary():
    gen = torch.Generator().manual_seed(6)
    teacher = torch.randn(2, 5, 10, generator=gen)
    student = teacher[..., torch.randperm(10, generator=gen)]
    assert uld_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-7)
    # a larger vocabulary whose extra ids have no mass is still the same distribution up to permutation
    padded = torch.cat([student, torch.full((2, 5, 3), float("-inf"))], dim=-1)
    assert uld_loss(padded, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_uld_errors():
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3, 4\).*\(3, 3, 4\)"):
        uld_loss(torch.randn(2, 3, 4), torch.randn(3, 3, 4))
    with pytest.raises(ShapeMismatchError, match=r"\(3, 4\).*\(2, 3, 4\)"):
        uld_loss(torch.randn(3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ShapeMismatchError, match=r"\(2, 4\)"):
        uld_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(InvalidArgumentError, match="reduction"):
        uld_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 5), reduction="avg")


# ---------------------------------------------------------------- align_by_offsets

HELLO_STUDENT = [(0, 0), (0, 5), (5, 6), (6, 12), (12, 13)]  # <s> "Hello" "," " world" "!"
HELLO_TEACHER = [(0, 3), (3, 5), (5, 6), (7, 12), (12, 13), (0, 0)]  # "Hel" "lo" "," "world" "!" </s>

ALIGN_CASES = {
    "one_to_one": ([(0, 3), (3, 4), (4, 8)], [(0, 3), (3, 4), (4, 8)], [([0], [0]), ([1], [1]), ([2], [2])]),
    "two_to_one": ([(0, 3), (3, 8)], [(0, 8)], [([0, 1], [0])]),  # "New" " York" vs "New York"
    "one_to_three": ([(0, 12)], [(0, 2), (2, 8), (8, 12)], [([0], [0, 1, 2])]),  # "unbelievable"
    "punctuation_and_specials": (HELLO_STUDENT, HELLO_TEACHER, [([1], [0, 1]), ([2], [2]), ([3], [3]), ([4], [4])]),
    "crossing_boundaries": ([(0, 3), (3, 6), (6, 7)], [(0, 2), (2, 6), (6, 7)], [([0, 1], [0, 1]), ([2], [2])]),
    "byte_pieces_share_a_span": ([(0, 1), (0, 1), (1, 2)], [(0, 1), (1, 2)], [([0, 1], [0]), ([2], [1])]),
    "trailing_extra_token": ([(0, 2), (2, 3)], [(0, 2)], [([0, 1], [0])]),
    "only_specials": ([(0, 0)], [(0, 0), (0, 2)], []),
}


@pytest.mark.parametrize("case", list(ALIGN_CASES))
def test_align_by_offsets(case):
    student, teacher, want = ALIGN_CASES[case]
    groups = align_by_offsets(student, teacher)
    assert groups == want
    for side, offsets in ((0, student), (1, teacher)):
        counted = [i for i, (a, b) in enumerate(offsets) if b > a]
        flat = [i for g in groups for i in g[side]]
        assert flat == (counted if groups else [])  # each counted token once, in order
        assert all(g[side] for g in groups)


def test_align_accepts_tensors_and_rejects_bad_spans():
    groups = align_by_offsets(torch.tensor(HELLO_STUDENT), torch.tensor(HELLO_TEACHER))
    assert groups == ALIGN_CASES["punctuation_and_specials"][2]
    with pytest.raises(InvalidArgumentError, match=r"student_offsets\[1\] is \(5, 3\)"):
        align_by_offsets([(0, 2), (5, 3)], [(0, 2)])
    with pytest.raises(InvalidArgumentError, match=r"teacher_offsets\[1\]"):
        align_by_offsets([(0, 5)], [(0, 5), (1, 3)])
    with pytest.raises(ShapeMismatchError, match="pair"):
        align_by_offsets([(0, 1, 2)], [(0, 1)])


# ---------------------------------------------------------------- aligned_distillation_loss


def test_aligned_loss_equals_hand_computed_reference():
    gen = torch.Generator().manual_seed(8)
    student = torch.randn(5, 7, generator=gen)
    teacher = torch.randn(6, 11, generator=gen)
    # groups ([1],[0,1]), ([2],[2]), ([3],[3]), ([4],[4]) -> last tokens (1,1), (2,2), (3,3), (4,4)
    pairs = [(1, 1), (2, 2), (3, 3), (4, 4)]
    s, t = student.double().numpy(), teacher.double().numpy()
    per = np.array([ref_uld(s[i], t[j], 1.5) for i, j in pairs])
    got = aligned_distillation_loss(student, teacher, HELLO_STUDENT, HELLO_TEACHER, temperature=1.5, reduction="none")
    np.testing.assert_allclose(got.numpy(), per, rtol=1e-5, atol=1e-6)
    mean = aligned_distillation_loss(student, teacher, HELLO_STUDENT, HELLO_TEACHER, temperature=1.5)
    np.testing.assert_allclose(mean.item(), per.mean(), rtol=1e-5)
    total = aligned_distillation_loss(student, teacher, HELLO_STUDENT, HELLO_TEACHER, temperature=1.5, reduction="sum")
    np.testing.assert_allclose(total.item(), per.sum(), rtol=1e-5)


def test_identical_tokenization_with_forward_kl_equals_dense_forward_kl():
    gen = torch.Generator().manual_seed(9)
    student = torch.randn(5, 10, generator=gen, dtype=torch.float64)
    teacher = torch.randn(5, 10, generator=gen, dtype=torch.float64)
    got = aligned_distillation_loss(student, teacher, HELLO_STUDENT, HELLO_STUDENT, method="forward_kl", temperature=2)
    counted = torch.tensor([False, True, True, True, True])
    want = forward_kl(student, teacher, counted, temperature=2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    jsd = aligned_distillation_loss(student, teacher, HELLO_STUDENT, HELLO_STUDENT, method="jsd", beta=0.3)
    assert jsd.item() > 0


def test_aligned_loss_errors():
    s, t = torch.randn(5, 7), torch.randn(6, 11)
    with pytest.raises(VocabMismatchError, match=r"7.*11.*uld"):
        aligned_distillation_loss(s, t, HELLO_STUDENT, HELLO_TEACHER, method="forward_kl")
    with pytest.raises(InvalidArgumentError, match=r"'hidden_mse'.*forward_kl"):
        aligned_distillation_loss(s, t, HELLO_STUDENT, HELLO_TEACHER, method="hidden_mse")
    with pytest.raises(ShapeMismatchError, match=r"4 spans.*\(5, 7\)"):
        aligned_distillation_loss(s, t, HELLO_STUDENT[:4], HELLO_TEACHER)


def test_batch_helper_matches_rows():
    gen = torch.Generator().manual_seed(10)
    student = torch.randn(2, 6, 7, generator=gen)
    teacher = torch.randn(2, 6, 11, generator=gen)
    s_offsets = [HELLO_STUDENT, [(0, 3), (3, 8)]]  # second row right-padded
    t_offsets = [HELLO_TEACHER, [(0, 8)]]
    rows = [
        aligned_distillation_loss(student[0, :5], teacher[0], s_offsets[0], t_offsets[0], reduction="sum"),
        aligned_distillation_loss(student[1, :2], teacher[1, :1], s_offsets[1], t_offsets[1], reduction="sum"),
    ]
    total = rows[0] + rows[1]
    got_sum = aligned_distillation_loss_batch(student, teacher, s_offsets, t_offsets, reduction="sum")
    got_mean = aligned_distillation_loss_batch(student, teacher, s_offsets, t_offsets)
    got_bm = aligned_distillation_loss_batch(student, teacher, s_offsets, t_offsets, reduction="batchmean")
    torch.testing.assert_close(got_sum, total)
    torch.testing.assert_close(got_mean, total / 5)  # 4 groups + 1 group
    torch.testing.assert_close(got_bm, total / 2)
    with pytest.raises(InvalidArgumentError, match="reduction"):
        aligned_distillation_loss_batch(student, teacher, s_offsets, t_offsets, reduction="none")


def test_sgd_on_uld_halves_the_loss_across_vocabularies():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(5, 7, generator=gen).requires_grad_(True)
    teacher = torch.randn(6, 11, generator=gen) * 3
    optimizer = torch.optim.SGD([student], lr=1.0)
    losses = []
    for _ in range(50):
        loss = aligned_distillation_loss(student, teacher, HELLO_STUDENT, HELLO_TEACHER, method="uld")
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]
