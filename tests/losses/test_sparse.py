"""Top-k (cached teacher) divergences against float64 NumPy references and against the dense divergences."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from kdistill.errors import InvalidArgumentError, KdistillError, ShapeMismatchError
from kdistill.losses import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skewed_forward_kl,
    skewed_reverse_kl,
    total_variation,
)
from kdistill.losses.sparse import sparse_divergence

# ---------------------------------------------------------------- float64 references (NumPy, per position)


def _softmax(row: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    x = row.astype(np.float64) / temperature
    x = x - np.max(x[np.isfinite(x)])
    e = np.exp(x)
    return e / e.sum()


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    total = 0.0
    for pi, qi in zip(p, q, strict=True):
        if pi > 0:
            total += math.inf if qi == 0 else pi * (math.log(pi) - math.log(qi))
    return total


def _div(name: str, p_s: np.ndarray, p_t: np.ndarray, **kw) -> float:
    """The divergence between two probability vectors, written with explicit probability-space mixtures."""
    if name == "forward_kl":
        return _kl(p_t, p_s)
    if name == "reverse_kl":
        return _kl(p_s, p_t)
    if name == "total_variation":
        return 0.5 * float(np.abs(p_t - p_s).sum())
    if name == "skewed_forward_kl":
        skew = kw["skew"]
        return _kl(p_t, skew * p_t + (1 - skew) * p_s)
    if name == "skewed_reverse_kl":
        skew = kw["skew"]
        return _kl(p_s, (1 - skew) * p_t + skew * p_s)
    beta = kw["beta"]
    m = beta * p_t + (1 - beta) * p_s
    return beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)


def ref_sparse(name, s_row, ids, logp, leftover, T, policy, **kw) -> float:
    """Per position: build the two distributions the policy defines, in probability space."""
    s_row = s_row.astype(np.float64)
    p_top = np.exp(logp.astype(np.float64))
    if policy == "renormalize":
        p_t = p_top / p_top.sum()
        p_s = _softmax(s_row[ids], T)
    else:
        vocab, k = s_row.shape[0], ids.shape[0]
        p_t = np.full(vocab, math.exp(leftover) / (vocab - k) if k < vocab else 0.0)
        p_t[ids] = p_top
        p_s = _softmax(s_row, T)
    return _div(name, p_s, p_t, **kw)


def reduce_ref(per: np.ndarray, m: np.ndarray, reduction: str):
    if reduction == "none":
        return per
    total = per[m].sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / m.sum() if m.sum() > 0 else 0.0
    return total / per.shape[0]


def make_cache(teacher_logits: torch.Tensor, k: int, temperature: float):
    """What a teacher-output cache stores: top-k ids, their log-probs at T, and log of the rest."""
    logp = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    top = logp.topk(k, dim=-1)
    rest = torch.log1p(-top.values.exp().sum(-1).clamp(max=1.0))
    if k == teacher_logits.shape[-1]:
        rest = torch.full_like(rest, float("-inf"))
    return top.indices, top.values.to(teacher_logits.dtype), rest.to(teacher_logits.dtype)


DENSE = {
    "forward_kl": (forward_kl, {}),
    "reverse_kl": (reverse_kl, {}),
    "generalized_jsd": (generalized_jsd, {"beta": 0.3}),
    "total_variation": (total_variation, {}),
    "skewed_forward_kl": (skewed_forward_kl, {"skew": 0.1}),
    "skewed_reverse_kl": (skewed_reverse_kl, {"skew": 0.2}),
}
POLICIES = ["renormalize", "uniform"]


# ---------------------------------------------------------------- k = V equals the dense divergence


@pytest.mark.parametrize("name", list(DENSE))
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_topk_equals_dense_divergence(name, policy, dtype):
    fn, kw = DENSE[name]
    gen = torch.Generator().manual_seed(1)
    student = (torch.randn(3, 4, 10, generator=gen) * 2).to(dtype)
    teacher = (torch.randn(3, 4, 10, generator=gen) * 2).to(dtype)
    mask = torch.rand(3, 4, generator=gen) > 0.3
    T = 1.7
    ids, logp, rest = make_cache(teacher, 10, T)
    got = sparse_divergence(
        student, ids, logp, rest, mask, divergence=name, temperature=T, leftover_policy=policy, **kw
    )
    want = fn(student, teacher, mask, temperature=T, **kw)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- k < V against the float64 reference


@pytest.mark.parametrize("name", list(DENSE))
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_topk_matches_float64_reference(name, policy, reduction):
    _, kw = DENSE[name]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}{policy}{reduction}".encode()))
    V, k, T = 13, 4, 1.5
    student = torch.randn(2, 5, V, generator=gen) * 2
    teacher = torch.randn(2, 5, V, generator=gen) * 2
    mask = torch.rand(2, 5, generator=gen) > 0.4
    mask[0, 0] = True
    ids, logp, rest = make_cache(teacher, k, T)
    got = sparse_divergence(
        student, ids, logp, rest, mask, divergence=name, temperature=T, leftover_policy=policy,
        reduction=reduction, chunk_rows=3, **kw,
    )  # fmt: skip
    s, i, lp, lo, m = student.numpy(), ids.numpy(), logp.numpy(), rest.numpy(), mask.numpy()
    per = np.zeros((2, 5))
    for idx in np.ndindex(2, 5):
        if m[idx]:
            per[idx] = ref_sparse(name, s[idx], i[idx], lp[idx], float(lo[idx]), T, policy, **kw)
    assert got.dtype == torch.float32
    assert got.shape == ((2, 5) if reduction == "none" else ())
    np.testing.assert_allclose(got.double().numpy(), reduce_ref(per, m, reduction), rtol=1e-5, atol=1e-6)


def test_uniform_and_renormalize_differ_when_mass_is_left_over():
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(6, 20, generator=gen), torch.randn(6, 20, generator=gen)
    ids, logp, rest = make_cache(teacher, 5, 1.0)
    a = sparse_divergence(student, ids, logp, rest, leftover_policy="renormalize")
    b = sparse_divergence(student, ids, logp, rest, leftover_policy="uniform")
    assert not torch.allclose(a, b)


def test_per_position_temperature_and_all_masked():
    gen = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    temps = torch.rand(2, 3, generator=gen) + 0.5
    logp_full = torch.log_softmax(teacher / temps[..., None], dim=-1)
    ids = torch.arange(8).expand(2, 3, 8)
    got = sparse_divergence(student, ids, logp_full, None, temperature=temps, leftover_policy="uniform")
    torch.testing.assert_close(got, forward_kl(student, teacher, temperature=temps))
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert sparse_divergence(student, ids, logp_full, mask=none).item() == 0.0


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd", "skewed_forward_kl"])
@pytest.mark.parametrize("policy", POLICIES)
def test_gradcheck(name, policy):
    _, kw = DENSE[name]
    gen = torch.Generator().manual_seed(7)
    student = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)
    ids, logp, rest = make_cache(teacher, 3, 1.3)
    mask = torch.tensor([[True, False, True], [True, True, False]])

    def f(s):
        return sparse_divergence(
            s, ids, logp, rest, mask, divergence=name, temperature=1.3, leftover_policy=policy, **kw
        )

    assert torch.autograd.gradcheck(f, (student,))


def test_masked_garbage_gets_no_gradient():
    student = torch.randn(2, 5, requires_grad=True)
    ids = torch.tensor([[0, 1], [7, 9]])  # the second row's ids are invalid, but it is masked out
    logp = torch.log(torch.tensor([[0.5, 0.3], [0.5, 0.3]]))
    rest = torch.log(torch.tensor([0.2, 0.2]))
    mask = torch.tensor([True, False])
    loss = sparse_divergence(student, ids, logp, rest, mask, leftover_policy="uniform")
    loss.backward()
    assert torch.isfinite(loss) and student.grad[1].abs().sum() == 0


# ---------------------------------------------------------------- errors


def test_errors_name_shapes_ids_and_policies():
    s = torch.randn(2, 3, 5)
    ids = torch.zeros(2, 3, 2, dtype=torch.long)
    ids[..., 1] = 1
    lp = torch.full((2, 3, 2), -1.0)
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3, 5\).*\(2, 4, 2\)"):
        sparse_divergence(s, torch.zeros(2, 4, 2, dtype=torch.long), torch.zeros(2, 4, 2))
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3, 2\).*\(2, 3, 3\)"):
        sparse_divergence(s, ids, torch.zeros(2, 3, 3))
    with pytest.raises(ShapeMismatchError, match=r"\(2, 2\)"):
        sparse_divergence(s, ids, lp, torch.zeros(2, 2), leftover_policy="uniform")
    bad = ids.clone()
    bad[1, 2, 0] = 5
    with pytest.raises(InvalidArgumentError, match=r"id 5.*V=5"):
        sparse_divergence(s, bad, lp)
    bad[1, 2, 0] = -1
    with pytest.raises(InvalidArgumentError, match=r"id -1"):
        sparse_divergence(s, bad, lp)
    with pytest.raises(InvalidArgumentError, match=r"'renormalize', 'uniform'"):
        sparse_divergence(s, ids, lp, leftover_policy="spread")
    with pytest.raises(InvalidArgumentError, match=r"forward_kl"):
        sparse_divergence(s, ids, lp, divergence="nope")
    with pytest.raises(InvalidArgumentError, match=r"leftover"):
        sparse_divergence(s, ids, lp, leftover_policy="uniform")
    dup = ids.clone()
    dup[0, 0] = torch.tensor([3, 3])
    with pytest.raises(KdistillError, match=r"repeats id 3"):
        sparse_divergence(s, dup, lp)
