"""Logit divergences against independent float64 references written here in NumPy.

The references work in probability space with explicit formulas (mixtures as β·p + (1−β)·q, not logsumexp), so
they share no code path with the library's log-space implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdistill.errors import InvalidArgumentError, KdistillError, ShapeMismatchError, VocabMismatchError
from kdistill.losses import (
    forward_kl,
    generalized_jsd,
    logit_mse,
    reverse_kl,
    skewed_forward_kl,
    skewed_reverse_kl,
    soft_cross_entropy,
    token_cross_entropy,
    total_variation,
)

# ---------------------------------------------------------------- float64 references (NumPy, per position)


def _softmax(row: np.ndarray, temperature: float) -> np.ndarray:
    x = row.astype(np.float64) / temperature
    x = x - np.max(x[np.isfinite(x)])
    e = np.exp(x)  # exp(-inf) = 0
    return e / e.sum()


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    total = 0.0
    for pi, qi in zip(p, q, strict=True):
        if pi > 0:
            total += math.inf if qi == 0 else pi * (math.log(pi) - math.log(qi))
    return total


def ref_forward_kl(s, t, T, **_):
    return _kl(_softmax(t, T), _softmax(s, T))


def ref_reverse_kl(s, t, T, **_):
    return _kl(_softmax(s, T), _softmax(t, T))


def ref_skewed_forward_kl(s, t, T, skew=0.1):
    p_t, p_s = _softmax(t, T), _softmax(s, T)
    return _kl(p_t, skew * p_t + (1 - skew) * p_s)


def ref_skewed_reverse_kl(s, t, T, skew=0.1):
    p_t, p_s = _softmax(t, T), _softmax(s, T)
    return _kl(p_s, (1 - skew) * p_t + skew * p_s)


def ref_generalized_jsd(s, t, T, beta=0.5):
    p_t, p_s = _softmax(t, T), _softmax(s, T)
    if beta == 0:
        return _kl(p_t, p_s)
    if beta == 1:
        return _kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)


def ref_total_variation(s, t, T, **_):
    return 0.5 * float(np.abs(_softmax(t, T) - _softmax(s, T)).sum())


def ref_soft_cross_entropy(s, t, T, **_):
    p_t, p_s = _softmax(t, T), _softmax(s, T)
    return -sum(pt * math.log(ps) for pt, ps in zip(p_t, p_s, strict=True) if pt > 0)


def ref_logit_mse(s, t, T, **_):
    keep = np.isfinite(s) & np.isfinite(t)
    d = (s[keep].astype(np.float64) - t[keep].astype(np.float64)) / T
    return float((d**2).mean()) if keep.any() else 0.0


CASES = {
    "forward_kl": (forward_kl, ref_forward_kl, {}),
    "reverse_kl": (reverse_kl, ref_reverse_kl, {}),
    "skewed_forward_kl": (skewed_forward_kl, ref_skewed_forward_kl, {"skew": 0.1}),
    "skewed_reverse_kl": (skewed_reverse_kl, ref_skewed_reverse_kl, {"skew": 0.3}),
    "generalized_jsd": (generalized_jsd, ref_generalized_jsd, {"beta": 0.5}),
    "generalized_jsd_b02": (generalized_jsd, ref_generalized_jsd, {"beta": 0.2}),
    "total_variation": (total_variation, ref_total_variation, {}),
    "soft_cross_entropy": (soft_cross_entropy, ref_soft_cross_entropy, {}),
    "logit_mse": (logit_mse, ref_logit_mse, {}),
}
DIVERGENCES = [forward_kl, reverse_kl, skewed_forward_kl, skewed_reverse_kl, generalized_jsd, total_variation,
               soft_cross_entropy, logit_mse]  # fmt: skip


def reference(ref_fn, student, teacher, mask, temperature, reduction, **kwargs):
    """Apply a per-position reference over the leading shape, then the reduction."""
    s = student.detach().double().numpy()
    t = teacher.detach().double().numpy()
    lead = s.shape[:-1]
    m = np.ones(lead, dtype=bool) if mask is None else mask.numpy()
    per = np.zeros(lead, dtype=np.float64)
    for idx in np.ndindex(*lead):
        if m[idx]:
            per[idx] = ref_fn(s[idx], t[idx], temperature, **kwargs)
    if reduction == "none":
        return per
    total = per[m].sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / m.sum() if m.sum() > 0 else 0.0
    return total / (lead[0] if lead else 1)  # batchmean


def make_mask(kind: str, lead: tuple[int, ...], gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all_masked":
        return torch.zeros(lead, dtype=torch.bool)
    mask = torch.rand(lead, generator=gen) > 0.4
    if len(lead) >= 2:
        mask[0] = False  # a whole row that counts nowhere
    return mask


# ---------------------------------------------------------------- value tests


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shape", [(9,), (3, 11), (2, 4, 17)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("mask_kind", ["none", "random", "all_masked"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_matches_float64_reference(name, shape, temperature, mask_kind, reduction):
    fn, ref_fn, kwargs = CASES[name]
    gen = torch.Generator().manual_seed(hash((name, shape, temperature, mask_kind, reduction)) % 2**31)
    student = torch.randn(shape, generator=gen) * 3
    teacher = torch.randn(shape, generator=gen) * 3
    mask = make_mask(mask_kind, shape[:-1], gen)
    got = fn(student, teacher, mask, temperature=temperature, reduction=reduction, **kwargs)
    want = reference(ref_fn, student, teacher, mask, temperature, reduction, **kwargs)
    assert got.dtype == torch.float32
    assert got.shape == (shape[:-1] if reduction == "none" else ())
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_float64_input_is_computed_in_float64(name):
    fn, ref_fn, kwargs = CASES[name]
    gen = torch.Generator().manual_seed(3)
    student, teacher = (
        torch.randn(4, 6, 13, generator=gen, dtype=torch.float64),
        torch.randn(4, 6, 13, generator=gen, dtype=torch.float64),
    )
    got = fn(student, teacher, temperature=1.7, **kwargs)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(
        got.item(), reference(ref_fn, student, teacher, None, 1.7, "mean", **kwargs), rtol=1e-12
    )


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_gives_float32_output(name, dtype):
    fn, ref_fn, kwargs = CASES[name]
    gen = torch.Generator().manual_seed(5)
    student = (torch.randn(3, 5, 29, generator=gen) * 2).to(dtype)
    teacher = (torch.randn(3, 5, 29, generator=gen) * 2).to(dtype)
    mask = torch.rand(3, 5, generator=gen) > 0.3
    got = fn(student, teacher, mask, temperature=2.0, **kwargs)
    assert got.dtype == torch.float32
    # the reference sees the same (exactly representable) low-precision values, so float32 math matches closely
    want = reference(ref_fn, student.float(), teacher.float(), mask, 2.0, "mean", **kwargs)
    np.testing.assert_allclose(got.item(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_neg_inf_vocab_columns_give_finite_values_and_gradients(name):
    """Padded vocabulary rows set to -inf in both models (Qwen-style) are harmless."""
    fn, ref_fn, kwargs = CASES[name]
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(2, 3, 12, generator=gen)
    teacher = torch.randn(2, 3, 12, generator=gen)
    student[..., -3:] = float("-inf")
    teacher[..., -3:] = float("-inf")
    student.requires_grad_(True)
    got = fn(student, teacher, temperature=1.3, **kwargs)
    want = reference(ref_fn, student, teacher, None, 1.3, "mean", **kwargs)
    np.testing.assert_allclose(got.item(), want, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got, student)
    assert torch.isfinite(grad).all()
    assert (grad[..., -3:] == 0).all()


@pytest.mark.parametrize("fn", [forward_kl, soft_cross_entropy, skewed_forward_kl, generalized_jsd, total_variation])
def test_neg_inf_in_teacher_only_is_finite_where_the_divergence_is(fn):
    """A teacher that rules tokens out (p_T = 0) leaves every teacher-weighted divergence finite."""
    gen = torch.Generator().manual_seed(12)
    student = torch.randn(4, 10, generator=gen, requires_grad=True)
    teacher = torch.randn(4, 10, generator=gen)
    teacher[:, :4] = float("-inf")
    value = fn(student, teacher)
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


@pytest.mark.parametrize("fn", DIVERGENCES)
def test_masked_positions_hold_garbage_without_harm(fn):
    """Uncounted positions may hold NaN/inf (e.g. uninitialised padding): they must not leak into value or grad."""
    gen = torch.Generator().manual_seed(13)
    student = torch.randn(2, 5, 8, generator=gen)
    teacher = torch.randn(2, 5, 8, generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    student[1, 3:] = float("nan")
    teacher[1, 3:] = float("inf")
    student.requires_grad_(True)
    value = fn(student, teacher, mask)
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert (grad[1, 3:] == 0).all()


@pytest.mark.parametrize("fn", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_all_masked_is_zero_with_zero_gradient(fn, reduction):
    student = torch.randn(3, 4, 6, requires_grad=True)
    teacher = torch.randn(3, 4, 6)
    value = fn(student, teacher, torch.zeros(3, 4, dtype=torch.bool), reduction=reduction)
    assert not torch.isnan(value).any() and (value == 0).all()
    (grad,) = torch.autograd.grad(value.sum(), student)
    assert (grad == 0).all()


# ---------------------------------------------------------------- β and skew end points


@pytest.mark.parametrize("beta", [0.0, 1e-3, 0.25, 0.5, 0.9, 1.0])
def test_generalized_jsd_beta_range_matches_reference(beta):
    gen = torch.Generator().manual_seed(21)
    student, teacher = torch.randn(6, 15, generator=gen) * 2, torch.randn(6, 15, generator=gen) * 2
    got = generalized_jsd(student, teacher, beta=beta)
    want = reference(ref_generalized_jsd, student, teacher, None, 1.0, "mean", beta=beta)
    np.testing.assert_allclose(got.item(), want, rtol=1e-5, atol=1e-7)


def test_generalized_jsd_end_points_are_forward_and_reverse_kl():
    gen = torch.Generator().manual_seed(22)
    student, teacher = torch.randn(6, 15, generator=gen), torch.randn(6, 15, generator=gen)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.0), forward_kl(student, teacher))
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=1.0), reverse_kl(student, teacher))
    # and the mixed form is discontinuous at the ends: it shrinks toward 0 there
    assert generalized_jsd(student, teacher, beta=1e-4) < 0.01 * forward_kl(student, teacher)


@pytest.mark.parametrize("skew", [0.0, 0.05, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("which", ["forward", "reverse"])
def test_skew_range_matches_reference(skew, which):
    gen = torch.Generator().manual_seed(23)
    student, teacher = torch.randn(5, 9, generator=gen) * 2, torch.randn(5, 9, generator=gen) * 2
    fn, ref_fn = (
        (skewed_forward_kl, ref_skewed_forward_kl)
        if which == "forward"
        else (skewed_reverse_kl, ref_skewed_reverse_kl)
    )
    got = fn(student, teacher, skew=skew)
    want = reference(ref_fn, student, teacher, None, 1.0, "mean", skew=skew)
    np.testing.assert_allclose(got.item(), want, rtol=1e-5, atol=1e-7)
    if skew == 0.0:
        plain = forward_kl if which == "forward" else reverse_kl
        torch.testing.assert_close(got, plain(student, teacher))
    if skew == 1.0:
        assert got.item() == 0.0


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_float64(name):
    fn, _, kwargs = CASES[name]
    gen = torch.Generator().manual_seed(31)
    student = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.autograd.gradcheck(
        lambda s, t: fn(s, t, mask, temperature=1.5, **kwargs), (student, teacher), eps=1e-6, atol=1e-5
    )


def test_soft_cross_entropy_has_forward_kl_gradient():
    gen = torch.Generator().manual_seed(32)
    student = torch.randn(4, 7, generator=gen, requires_grad=True)
    teacher = torch.randn(4, 7, generator=gen)
    (g_ce,) = torch.autograd.grad(soft_cross_entropy(student, teacher, temperature=2.0), student)
    (g_kl,) = torch.autograd.grad(forward_kl(student, teacher, temperature=2.0), student)
    torch.testing.assert_close(g_ce, g_kl)


# ---------------------------------------------------------------- vocabulary policies


def test_vocab_mismatch_error_names_both_sizes():
    with pytest.raises(VocabMismatchError, match=r"student vocabulary has 10 .* teacher vocabulary has 12"):
        forward_kl(torch.randn(3, 10), torch.randn(3, 12))


@pytest.mark.parametrize("fn", DIVERGENCES)
def test_vocab_truncate_uses_shared_ids(fn):
    gen = torch.Generator().manual_seed(41)
    student, teacher = torch.randn(3, 10, generator=gen), torch.randn(3, 12, generator=gen)
    torch.testing.assert_close(
        fn(student, teacher, vocab_policy="truncate"), fn(student, teacher[:, :10], vocab_policy="error")
    )
    torch.testing.assert_close(
        fn(teacher, student, vocab_policy="truncate"), fn(teacher[:, :10], student, vocab_policy="error")
    )


def test_vocab_pad_extends_with_row_minimum():
    gen = torch.Generator().manual_seed(42)
    student, teacher = torch.randn(3, 10, generator=gen), torch.randn(3, 12, generator=gen)
    got = forward_kl(student, teacher, vocab_policy="pad", temperature=2.0)
    s = student.double().numpy()
    s_padded = np.concatenate([s, np.repeat(s.min(axis=1, keepdims=True), 2, axis=1)], axis=1)
    want = np.mean([ref_forward_kl(s_padded[i], teacher[i].double().numpy(), 2.0) for i in range(3)])
    np.testing.assert_allclose(got.item(), want, rtol=1e-5)
    assert torch.isfinite(reverse_kl(student, teacher, vocab_policy="pad"))


# ---------------------------------------------------------------- properties


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def logit_pairs(draw):
    rows = draw(st.integers(1, 4))
    vocab = draw(st.integers(2, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale, torch.randn(rows, vocab, generator=gen) * scale


NONNEGATIVE = [
    (forward_kl, {}),
    (reverse_kl, {}),
    (skewed_forward_kl, {"skew": 0.1}),
    (skewed_reverse_kl, {"skew": 0.1}),
    (generalized_jsd, {"beta": 0.5}),
    (generalized_jsd, {"beta": 0.9}),
    (total_variation, {}),
    (logit_mse, {}),
]


@settings(max_examples=60, deadline=None)
@given(pair=logit_pairs(), temperature=st.sampled_from([0.5, 1.0, 4.0]))
def test_divergences_are_nonnegative_and_zero_on_identical_inputs(pair, temperature):
    student, teacher = pair
    for fn, kwargs in NONNEGATIVE:
        value = fn(student, teacher, temperature=temperature, **kwargs)
        assert value.item() >= -1e-6, fn.__name__
        same = fn(teacher, teacher.clone(), temperature=temperature, **kwargs)
        assert abs(same.item()) <= 1e-5, fn.__name__
    assert soft_cross_entropy(student, teacher, temperature=temperature).item() >= -1e-6


@settings(max_examples=60, deadline=None)
@given(pair=logit_pairs())
def test_jsd_is_symmetric_at_half_and_bounded_by_log2(pair):
    student, teacher = pair
    ab = generalized_jsd(student, teacher, beta=0.5)
    ba = generalized_jsd(teacher, student, beta=0.5)
    torch.testing.assert_close(ab, ba, rtol=1e-5, atol=1e-6)
    assert ab.item() <= math.log(2) + 1e-6


@settings(max_examples=60, deadline=None)
@given(pair=logit_pairs())
def test_total_variation_is_at_most_one(pair):
    student, teacher = pair
    assert total_variation(student, teacher, reduction="none").max().item() <= 1.0 + 1e-6


# ---------------------------------------------------------------- hard labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_token_cross_entropy_matches_reference(reduction):
    gen = torch.Generator().manual_seed(51)
    logits = torch.randn(3, 5, 7, generator=gen) * 2
    labels = torch.randint(0, 7, (3, 5), generator=gen)
    labels[0, :2] = -100
    labels[2] = -100
    got = token_cross_entropy(logits, labels, reduction=reduction)
    per = np.zeros((3, 5))
    counted = labels.numpy() != -100
    for i, j in np.ndindex(3, 5):
        if counted[i, j]:
            row = logits[i, j].double().numpy()
            per[i, j] = -(row[labels[i, j]] - np.log(np.exp(row).sum()))
    want = {
        "none": per,
        "sum": per.sum(),
        "mean": per.sum() / counted.sum(),
        "batchmean": per.sum() / 3,
    }[reduction]
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)
    reference_ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), reduction="sum")
    np.testing.assert_allclose(per.sum(), reference_ce.item(), rtol=1e-5)


def test_token_cross_entropy_rejects_labels_outside_the_classes():
    with pytest.raises(InvalidArgumentError, match=r"label 9 is outside the 7 classes"):
        token_cross_entropy(torch.randn(4, 7), torch.tensor([1, 9, 2, -100]))
    with pytest.raises(ShapeMismatchError, match=r"labels have shape \(3,\)"):
        token_cross_entropy(torch.randn(4, 7), torch.tensor([1, 2, 3]))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda: forward_kl(torch.randn(3, 5), torch.randn(4, 5)), ShapeMismatchError, r"\(3, 5\).*\(4, 5\)"),
        (lambda: forward_kl(torch.randn(3, 5), torch.randn(3, 5), torch.ones(4, dtype=torch.bool)),
         ShapeMismatchError, r"mask has shape \(4,\).*\(3,\)"),
        (lambda: forward_kl(torch.randn(3, 5), torch.randn(3, 5), torch.ones(3)), InvalidArgumentError, "bool"),
        (lambda: forward_kl(torch.randn(3, 5), torch.randn(3, 5), temperature=0), InvalidArgumentError,
         "temperature must be a finite number > 0, got 0"),
        (lambda: forward_kl(torch.randn(3, 5), torch.randn(3, 5), temperature=-2.0), InvalidArgumentError, "-2.0"),
        (lambda: forward_kl(torch.randn(3, 5), torch.randn(3, 5), reduction="avg"), InvalidArgumentError, "'avg'"),
        (lambda: generalized_jsd(torch.randn(3, 5), torch.randn(3, 5), beta=1.5), InvalidArgumentError, "beta"),
        (lambda: skewed_forward_kl(torch.randn(3, 5), torch.randn(3, 5), skew=-0.1), InvalidArgumentError, "skew"),
        (lambda: forward_kl(torch.randn(3, 5), torch.randn(3, 5), vocab_policy="drop"), InvalidArgumentError,
         "vocab_policy"),
        (lambda: forward_kl(torch.randint(0, 3, (3, 5)), torch.randn(3, 5)), InvalidArgumentError, "floating point"),
        (lambda: forward_kl([1.0, 2.0], torch.randn(2)), InvalidArgumentError, "student_logits must be a tensor"),
    ],
)  # fmt: skip
def test_bad_input_gets_a_clear_error(call, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        call()
    assert isinstance(info.value, KdistillError)


@pytest.mark.parametrize("name", list(CASES))
def test_per_position_temperature_tensor(name):
    """flsw/cwsm give one temperature per position; each position must use its own."""
    fn, ref_fn, kwargs = CASES[name]
    gen = torch.Generator().manual_seed(61)
    student, teacher = torch.randn(3, 4, 9, generator=gen) * 2, torch.randn(3, 4, 9, generator=gen) * 2
    temperature = torch.rand(3, 4, generator=gen) * 3 + 0.5
    mask = torch.rand(3, 4, generator=gen) > 0.3
    got = fn(student, teacher, mask, temperature=temperature, reduction="none", **kwargs)
    for idx in np.ndindex(3, 4):
        want = ref_fn(student[idx].double().numpy(), teacher[idx].double().numpy(), temperature[idx].item(), **kwargs)
        np.testing.assert_allclose(got[idx].item(), want if mask[idx] else 0.0, rtol=1e-5, atol=1e-6)
    with pytest.raises(ShapeMismatchError, match=r"temperature tensor has shape \(4,\)"):
        fn(student, teacher, temperature=torch.ones(4), **kwargs)
    with pytest.raises(InvalidArgumentError, match="temperature tensor must hold"):
        fn(student, teacher, temperature=torch.zeros(3, 4), **kwargs)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation", "kd_ce"])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_a_counted_row_of_all_minus_inf_is_an_error_naming_it(name: str, side: str) -> None:
    from kdistill.losses import LOSSES

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 4, 6, generator=generator), torch.randn(2, 4, 6, generator=generator)
    (student if side == "student" else teacher)[1, 2] = float("-inf")
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(InvalidArgumentError, match=rf"{side}_logits at position \(1, 2\) .* are -inf everywhere"):
        LOSSES.get(name)(student, teacher, mask)
    mask[1, 2] = False  # masked out, the row is not counted: a finite loss
    assert torch.isfinite(LOSSES.get(name)(student, teacher, mask))
