"""Feature losses against independent float64 references written here in NumPy with explicit loops.

The references follow the definitions literally (per position, per head, per channel pair) and share no code with
the library: NST in particular is checked against the kernel double sums, not the Gram-matrix form it uses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdistill.errors import InvalidArgumentError, KdistillError, ShapeMismatchError
from kdistill.losses import attention_kl, attention_mse, cosine, fsp, hidden_mse, nst, pkd

REDUCTIONS = ("mean", "sum", "none")
MASK_KINDS = ("no_mask", "partial", "all_masked")
LOSS_NAMES = ("hidden_mse", "cosine", "pkd", "attention_mse", "attention_kl", "attention_kl_scores", "nst", "fsp")

# ---------------------------------------------------------------- inputs


def _randn(seed: int, *shapes: tuple[int, ...], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=dtype) for shape in shapes]


def _probs(scores: torch.Tensor, zero_fraction: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Softmax rows; optionally some entries set to exactly 0 (not renormalized: the loss must cope)."""
    probs = torch.softmax(scores, dim=-1)
    if zero_fraction:
        generator = torch.Generator().manual_seed(seed)
        probs = torch.where(torch.rand(probs.shape, generator=generator) < zero_fraction, 0.0, probs)
    return probs


def _mask(kind: str, leading: tuple[int, ...], seed: int = 0) -> torch.Tensor | None:
    """None, all False, or random with example 0 fully real and example 1 fully masked (0/1 ints for odd seeds)."""
    if kind == "no_mask":
        return None
    if kind == "all_masked":
        return torch.zeros(leading, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(leading, generator=generator) < 0.6
    by_example = mask.view(leading[0], -1)
    by_example[0] = True
    if leading[0] > 1:
        by_example[1] = False
    return mask.long() if seed % 2 else mask


def _np_mask(mask: torch.Tensor | None, leading: tuple[int, ...]) -> np.ndarray:
    return np.ones(leading, dtype=bool) if mask is None else mask.bool().numpy()


def _assert_close(got: torch.Tensor, expected: np.ndarray | float, rtol: float = 1e-9) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    assert got.dtype == torch.float64
    assert tuple(got.shape) == expected.shape
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=rtol, atol=1e-12)


# ---------------------------------------------------------------- float64 references (NumPy, explicit loops)


def ref_hidden_mse(s: np.ndarray, t: np.ndarray, mask: np.ndarray) -> dict:
    hidden = s.shape[-1]
    none, total, counted = np.zeros(s.shape[:-1]), 0.0, 0
    for idx in np.ndindex(*s.shape[:-1]):
        if mask[idx]:
            squared = sum((s[idx][h] - t[idx][h]) ** 2 for h in range(hidden))
            none[idx], total, counted = squared / hidden, total + squared, counted + 1
    return {"none": none, "sum": none.sum(), "mean": total / (counted * hidden) if counted else 0.0}


def ref_cosine(s: np.ndarray, t: np.ndarray, mask: np.ndarray) -> dict:
    none, counted = np.zeros(s.shape[:-1]), 0
    for idx in np.ndindex(*s.shape[:-1]):
        if mask[idx]:
            a, b = s[idx], t[idx]
            none[idx] = 1.0 - sum(a * b) / (math.sqrt(sum(a * a)) * math.sqrt(sum(b * b)))
            counted += 1
    return {"none": none, "sum": none.sum(), "mean": none.sum() / counted if counted else 0.0}


def ref_pkd(s: np.ndarray, t: np.ndarray, mask: np.ndarray) -> dict:
    none, counted = np.zeros(s.shape[0]), 0
    for b in range(s.shape[0]):
        if mask[b, 0] if s.ndim == 3 else mask[b]:
            a, c = (s[b, 0], t[b, 0]) if s.ndim == 3 else (s[b], t[b])
            none[b] = sum((a / math.sqrt(sum(a * a)) - c / math.sqrt(sum(c * c))) ** 2)
            counted += 1
    return {"none": none, "sum": none.sum(), "mean": none.sum() / counted if counted else 0.0}


def ref_attention_mse(s: np.ndarray, t: np.ndarray, mask: np.ndarray, average_heads: bool = False) -> dict:
    if average_heads:
        s, t = s.mean(axis=1, keepdims=True), t.mean(axis=1, keepdims=True)
    batch, heads, length, _ = s.shape
    none, total, pairs = np.zeros((batch, length, length)), 0.0, 0
    for b in range(batch):
        for q in range(length):
            for k in range(length):
                if mask[b, q] and mask[b, k]:
                    squared = sum((s[b, h, q, k] - t[b, h, q, k]) ** 2 for h in range(heads))
                    none[b, q, k], total, pairs = squared / heads, total + squared, pairs + 1
    return {"none": none, "sum": none.sum(), "mean": total / (heads * pairs) if pairs else 0.0}


def _row_distribution(values: np.ndarray, from_scores: bool) -> np.ndarray:
    if from_scores:
        exps = np.array([math.exp(v - max(values)) for v in values])
        return exps / exps.sum()
    return values / values.sum()


def ref_attention_kl(
    s: np.ndarray, t: np.ndarray, mask: np.ndarray, from_scores: bool = False, average_heads: bool = False
) -> dict:
    if average_heads:
        s, t = s.mean(axis=1, keepdims=True), t.mean(axis=1, keepdims=True)
    batch, heads, length, _ = s.shape
    none, rows = np.zeros((batch, length)), 0
    for b in range(batch):
        keys = [k for k in range(length) if mask[b, k]]
        for q in range(length):
            if not mask[b, q]:
                continue
            kls = []
            for h in range(heads):
                p_t = _row_distribution(t[b, h, q, keys], from_scores)
                p_s = _row_distribution(s[b, h, q, keys], from_scores)
                kls.append(
                    sum(
                        pt * (math.log(pt) - math.log(max(ps, 1e-12)))
                        for pt, ps in zip(p_t, p_s, strict=True)
                        if pt > 0
                    )
                )
            none[b, q], rows = sum(kls) / heads, rows + 1
    return {"none": none, "sum": none.sum(), "mean": none.sum() / rows if rows else 0.0}


def ref_nst(s: np.ndarray, t: np.ndarray, mask: np.ndarray) -> dict:
    """MMD² with k(x, y) = (x·y)² as the three kernel double sums over channel pairs."""
    none, counted = np.zeros(s.shape[0]), 0
    for b in range(s.shape[0]):
        positions = [p for p in range(s.shape[1]) if mask[b, p]]
        if not positions:
            continue
        student = [s[b, positions, i] / math.sqrt(sum(s[b, positions, i] ** 2)) for i in range(s.shape[2])]
        teacher = [t[b, positions, j] / math.sqrt(sum(t[b, positions, j] ** 2)) for j in range(t.shape[2])]

        def kernel_mean(xs: list, ys: list) -> float:
            return sum(sum(x * y) ** 2 for x in xs for y in ys) / (len(xs) * len(ys))

        none[b] = kernel_mean(student, student) + kernel_mean(teacher, teacher) - 2 * kernel_mean(student, teacher)
        counted += 1
    return {"none": none, "sum": none.sum(), "mean": none.sum() / counted if counted else 0.0}


def ref_fsp(s1: np.ndarray, s2: np.ndarray, t1: np.ndarray, t2: np.ndarray, mask: np.ndarray) -> dict:
    batch, length, h1 = s1.shape
    h2 = s2.shape[2]
    none, counted = np.zeros(batch), 0
    for b in range(batch):
        positions = [p for p in range(length) if mask[b, p]]
        if not positions:
            continue
        squared = 0.0
        for i in range(h1):
            for j in range(h2):
                g_s = sum(s1[b, p, i] * s2[b, p, j] for p in positions) / len(positions)
                g_t = sum(t1[b, p, i] * t2[b, p, j] for p in positions) / len(positions)
                squared += (g_s - g_t) ** 2
        none[b], counted = squared / (h1 * h2), counted + 1
    return {"none": none, "sum": none.sum(), "mean": none.sum() / counted if counted else 0.0}


# ---------------------------------------------------------------- against the references


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("loss, ref", [(hidden_mse, ref_hidden_mse), (cosine, ref_cosine)])
@pytest.mark.parametrize("shape", [(3, 5, 4), (6, 3), (2, 3, 4, 5)])
def test_position_losses_match_reference(loss, ref, shape, mask_kind, reduction):
    student, teacher = _randn(len(shape), shape, shape)
    mask = _mask(mask_kind, shape[:-1], seed=len(shape))
    expected = ref(student.numpy(), teacher.numpy(), _np_mask(mask, shape[:-1]))
    _assert_close(loss(student, teacher, mask, reduction=reduction), expected[reduction])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shape", [(4, 5, 6), (5, 3)])
def test_pkd_matches_reference(shape, mask_kind, reduction):
    student, teacher = _randn(1, shape, shape)
    mask = _mask(mask_kind, shape[:-1], seed=3)
    expected = ref_pkd(student.numpy(), teacher.numpy(), _np_mask(mask, shape[:-1]))
    _assert_close(pkd(student, teacher, mask, reduction=reduction), expected[reduction])


def test_pkd_reads_only_position_zero():
    student, teacher = _randn(2, (3, 4, 5), (3, 4, 5))
    changed = student.clone()
    changed[:, 1:] = 7.0
    torch.testing.assert_close(pkd(changed, teacher), pkd(student, teacher), rtol=0, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("heads, average_heads", [((3, 3), False), ((2, 3), True)])
def test_attention_mse_matches_reference(heads, average_heads, mask_kind, reduction):
    batch, length = 3, 5
    scores_s, scores_t = _randn(4, (batch, heads[0], length, length), (batch, heads[1], length, length))
    student, teacher = _probs(scores_s), _probs(2 * scores_t)
    mask = _mask(mask_kind, (batch, length), seed=5)
    expected = ref_attention_mse(student.numpy(), teacher.numpy(), _np_mask(mask, (batch, length)), average_heads)
    got = attention_mse(student, teacher, mask, reduction=reduction, average_heads=average_heads)
    _assert_close(got, expected[reduction])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("from_scores", [False, True])
@pytest.mark.parametrize("heads, average_heads", [((2, 2), False), ((3, 2), True)])
def test_attention_kl_matches_reference(heads, average_heads, from_scores, mask_kind, reduction):
    batch, length = 3, 5
    student, teacher = _randn(6, (batch, heads[0], length, length), (batch, heads[1], length, length))
    if not from_scores:  # probabilities with exact zeros on both sides
        student, teacher = _probs(student, 0.15, seed=1), _probs(2 * teacher, 0.15, seed=2)
    mask = _mask(mask_kind, (batch, length), seed=7)
    expected = ref_attention_kl(
        student.numpy(), teacher.numpy(), _np_mask(mask, (batch, length)), from_scores, average_heads
    )
    got = attention_kl(
        student, teacher, mask, reduction=reduction, from_scores=from_scores, average_heads=average_heads
    )
    _assert_close(got, expected[reduction])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("batch, length, student_size, teacher_size", [(3, 5, 4, 4), (3, 4, 3, 6), (4, 6, 7, 2)])
def test_nst_gram_form_matches_kernel_double_sums(batch, length, student_size, teacher_size, mask_kind, reduction):
    student, teacher = _randn(8, (batch, length, student_size), (batch, length, teacher_size))
    mask = _mask(mask_kind, (batch, length), seed=batch)
    expected = ref_nst(student.numpy(), teacher.numpy(), _np_mask(mask, (batch, length)))
    _assert_close(nst(student, teacher, mask, reduction=reduction), expected[reduction])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("batch, length, first_size, second_size", [(3, 5, 4, 3), (2, 4, 2, 5)])
def test_fsp_matches_reference(batch, length, first_size, second_size, mask_kind, reduction):
    first, second = (batch, length, first_size), (batch, length, second_size)
    tensors = _randn(9, first, second, first, second)
    mask = _mask(mask_kind, (batch, length), seed=batch + 1)
    expected = ref_fsp(*(x.numpy() for x in tensors), _np_mask(mask, (batch, length)))
    _assert_close(fsp(*tensors, mask, reduction=reduction), expected[reduction])


# ---------------------------------------------------------------- every loss through one calling convention


def _make_inputs(name: str, batch: int, length: int, hidden: int, seed: int, dtype=torch.float64):
    """(student tensors, teacher tensors) for ``name``: leaves of the given dtype."""
    if name in ("hidden_mse", "cosine", "pkd"):
        student, teacher = _randn(seed, (batch, length, hidden), (batch, length, hidden))
        return (student.to(dtype),), (teacher.to(dtype),)
    if name == "nst":
        student, teacher = _randn(seed, (batch, length, hidden), (batch, length, hidden + 1))
        return (student.to(dtype),), (teacher.to(dtype),)
    if name == "fsp":
        shapes = [(batch, length, hidden), (batch, length, hidden + 1)] * 2
        s1, s2, t1, t2 = (x.to(dtype) for x in _randn(seed, *shapes))
        return (s1, s2), (t1, t2)
    student, teacher = _randn(seed, (batch, 2, length, length), (batch, 2, length, length))
    if name != "attention_kl_scores":
        student, teacher = _probs(student), _probs(teacher)
    return (student.to(dtype),), (teacher.to(dtype),)


def _call(name: str, student: tuple, teacher: tuple, mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
    if name == "fsp":
        return fsp(*student, *teacher, mask, **kwargs)
    if name == "attention_kl_scores":
        return attention_kl(*student, *teacher, mask, from_scores=True, **kwargs)
    loss = {
        "hidden_mse": hidden_mse,
        "cosine": cosine,
        "pkd": pkd,
        "attention_mse": attention_mse,
        "attention_kl": attention_kl,
        "nst": nst,
    }[name]
    return loss(*student, *teacher, mask, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_low_precision_input_computes_in_float32(name, dtype):
    student, teacher = _make_inputs(name, 3, 6, 8, seed=11, dtype=dtype)
    mask = _mask("partial", (3, 6), seed=2)
    got = _call(name, student, teacher, mask)
    assert got.dtype == torch.float32
    same_values = _call(name, tuple(x.float() for x in student), tuple(x.float() for x in teacher), mask)
    torch.testing.assert_close(got, same_values, rtol=1e-6, atol=1e-7)
    student32, teacher32 = _make_inputs(name, 3, 6, 8, seed=11, dtype=torch.float32)
    torch.testing.assert_close(got, _call(name, student32, teacher32, mask), rtol=5e-2, atol=1e-3)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradcheck(name):
    student, teacher = _make_inputs(name, 2, 3, 3, seed=12)
    inputs = tuple(x.requires_grad_() for x in (*student, *teacher))
    mask = _mask("partial", (2, 3), seed=4)
    mask[1, :2] = True  # example 1 partly real, so every code path carries gradient

    def loss_of(*xs):
        return _call(name, xs[: len(student)], xs[len(student) :], mask)

    assert torch.autograd.gradcheck(loss_of, inputs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_fully_masked_batch_gives_zero_with_zero_gradients(name, reduction):
    student, teacher = _make_inputs(name, 2, 4, 3, seed=13, dtype=torch.float32)
    student = tuple(x.requires_grad_() for x in student)
    value = _call(name, student, teacher, torch.zeros(2, 4, dtype=torch.long), reduction=reduction)
    assert torch.all(value == 0)
    value.sum().backward()
    for x in student:
        assert torch.all(x.grad == 0)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(LOSS_NAMES),
    batch=st.integers(1, 3),
    length=st.integers(1, 5),
    hidden=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    masked=st.booleans(),
)
def test_nonnegative_and_zero_when_student_equals_teacher(name, batch, length, hidden, seed, masked):
    student, teacher = _make_inputs(name, batch, length, hidden, seed)
    mask = _mask("partial" if masked else "no_mask", (batch, length), seed)
    value = _call(name, student, teacher, mask)
    assert torch.isfinite(value) and value >= -1e-12
    assert abs(float(_call(name, student, student, mask))) < 1e-10


def test_int_and_bool_masks_agree():
    student, teacher = _randn(14, (3, 5, 4), (3, 5, 4))
    mask = _mask("partial", (3, 5), seed=0).bool()
    for loss in (hidden_mse, cosine, pkd, nst):
        torch.testing.assert_close(loss(student, teacher, mask.int()), loss(student, teacher, mask))


def test_zero_vectors_and_zero_probabilities_stay_finite():
    student, teacher = _randn(15, (2, 3, 4), (2, 3, 4))
    student[0] = 0.0
    student.requires_grad_()
    for loss in (cosine, pkd, nst):
        value = loss(student, teacher)
        (grad,) = torch.autograd.grad(value, student)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert float(cosine(student.detach(), teacher, reduction="none")[0].max()) == pytest.approx(1.0)
    teacher_probs = torch.tensor([[[[0.5, 0.5, 0.0]] * 3]], dtype=torch.float64)  # (1, 1, 3, 3)
    student_probs = torch.tensor([[[[1.0, 0.0, 0.0]] * 3]], dtype=torch.float64, requires_grad=True)
    value = attention_kl(student_probs, teacher_probs)
    (grad,) = torch.autograd.grad(value, student_probs)
    assert torch.isfinite(grad).all()
    assert value.item() == pytest.approx(0.5 * math.log(0.5) + 0.5 * (math.log(0.5) - math.log(1e-12)))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("loss", [hidden_mse, cosine, pkd])
def test_hidden_size_mismatch_names_both_sizes_and_the_projection(loss):
    student, teacher = _randn(0, (2, 5, 8), (2, 5, 16))
    with pytest.raises(ShapeMismatchError, match=r"hidden size 8 .*hidden size 16.*projection: linear"):
        loss(student, teacher)


def test_nst_allows_different_hidden_sizes_but_not_lengths():
    student, teacher = _randn(0, (2, 5, 8), (2, 5, 16))
    assert nst(student, teacher) > 0
    with pytest.raises(ShapeMismatchError, match=r"\(2, 5, 8\).*\(2, 6, 16\)"):
        nst(student, torch.randn(2, 6, 16))


def test_fsp_matrix_mismatch_names_both_pairs():
    s1, s2, t1, t2 = _randn(0, (2, 5, 4), (2, 5, 5), (2, 5, 4), (2, 5, 6))
    with pytest.raises(ShapeMismatchError, match=r"4x5.*4x6.*projection"):
        fsp(s1, s2, t1, t2)
    with pytest.raises(ShapeMismatchError, match="student_second"):
        fsp(s1, s2[:, :3], t1, t2)


def test_head_mismatch_names_both_counts():
    student, teacher = _randn(0, (2, 3, 4, 4), (2, 4, 4, 4))
    for loss in (attention_mse, attention_kl):
        with pytest.raises(ShapeMismatchError, match=r"3 heads .*has 4.*average_heads=True"):
            loss(student, teacher)


def _ones(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.ones(shape, dtype=dtype)


@pytest.mark.parametrize(
    "loss, args, kwargs, error, message",
    [
        (hidden_mse, (_ones(2, 5, 4), _ones(2, 5, 4), _ones(2, 4).bool()), {}, ShapeMismatchError, r"\(2, 4\)"),
        (nst, (_ones(2, 5, 4), _ones(2, 5, 3), _ones(5, 2, dtype=torch.long)), {}, ShapeMismatchError, r"\(5, 2\)"),
        (attention_kl, (_ones(2, 1, 3, 3), _ones(2, 1, 3, 3), _ones(2).bool()), {}, ShapeMismatchError, "mask"),
        (cosine, (_ones(2, 4), _ones(2, 4), _ones(2) * 0.5), {}, InvalidArgumentError, "attention_mask"),
        (cosine, (_ones(2, 5, 4), _ones(2, 6, 4)), {}, ShapeMismatchError, r"\(2, 6, 4\)"),
        (hidden_mse, (_ones(2, 4), _ones(2, 4)), {"reduction": "batchmean"}, InvalidArgumentError, "reduction"),
        (hidden_mse, (_ones(2, 4, dtype=torch.long), _ones(2, 4)), {}, InvalidArgumentError, "student_hidden"),
        (pkd, ([[1.0]], _ones(2, 4)), {}, InvalidArgumentError, "student_hidden"),
        (pkd, (_ones(2, 3, 4, 5), _ones(2, 3, 4, 5)), {}, ShapeMismatchError, "2 or 3 dimensions"),
        (attention_mse, (_ones(2, 1, 3, 4), _ones(2, 1, 3, 4)), {}, ShapeMismatchError, "heads, T, T"),
        (attention_mse, (_ones(2, 1, 3, 3), _ones(2, 1, 4, 4)), {}, ShapeMismatchError, "sequence length"),
        (attention_mse, (_ones(1, 1, 2, 2), _ones(1, 1, 2, 2)), {"average_heads": 1}, InvalidArgumentError, "average"),
        (attention_kl, (_ones(1, 1, 2, 2),) * 2, {"from_scores": 1}, InvalidArgumentError, "from_scores"),
        (fsp, (_ones(2, 3, 4), _ones(2, 3, 4), _ones(2, 3, 4), _ones(2, 3)), {}, ShapeMismatchError, "teacher_second"),
    ],
)
def test_bad_input_raises_kdistill_errors(loss, args, kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        loss(*args, **kwargs)
    assert isinstance(info.value, KdistillError)


# ---------------------------------------------------------------- training sanity


class _TinyModel(torch.nn.Module):
    """Linear layers giving the features ``name`` compares: hidden states ``(B, T, H)``, two layers for fsp, or
    attention ``(B, 2, T, T)`` (scores for attention_kl_scores, probabilities otherwise)."""

    def __init__(self, name: str, in_size: int, hidden: int, length: int) -> None:
        super().__init__()
        self.name, self.length = name, length
        self.first = torch.nn.Linear(in_size, 2 * length if name.startswith("attention") else hidden)
        self.second = torch.nn.Linear(hidden, 3)  # fsp's second layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.first(x)
        if self.name.startswith("attention"):
            scores = out.view(x.shape[0], self.length, 2, self.length).transpose(1, 2)  # (B, heads, T, T)
            return (scores,) if self.name == "attention_kl_scores" else (torch.softmax(3 * scores, dim=-1),)
        hidden = torch.tanh(out)  # (B, T, H)
        return (hidden, self.second(hidden)) if self.name == "fsp" else (hidden,)


@pytest.mark.parametrize(
    "name, learning_rate",
    [
        ("hidden_mse", 0.5),
        ("cosine", 2.0),
        ("pkd", 2.0),
        ("nst", 20.0),
        ("fsp", 3.0),
        ("attention_mse", 20.0),
        ("attention_kl", 0.5),
        ("attention_kl_scores", 2.0),
    ],
)
def test_training_a_linear_student_reduces_the_loss(name, learning_rate):
    torch.manual_seed(0)
    batch, length, in_size = 4, 6, 5
    inputs = torch.randn(batch, length, in_size)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    student_model = _TinyModel(name, in_size, 8, length)
    teacher_model = _TinyModel(name, in_size, 12 if name == "nst" else 8, length)  # nst matches across sizes
    with torch.no_grad():
        teacher = teacher_model(inputs)
    optimizer = torch.optim.SGD(student_model.parameters(), lr=learning_rate)
    losses = []
    for _ in range(50):
        loss = _call(name, student_model(inputs), teacher, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
