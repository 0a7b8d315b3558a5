"""chunked_divergence against the plain path: the same divergence on logits materialized as ``h @ W.T (+ b)``.

The plain path is the reference here (the divergences themselves are checked against float64 NumPy references in
test_divergences.py). What is checked: values and gradients for every registered divergence, the reductions, biases,
temperature, divergence keyword arguments, self-distillation, low precision, edge cases, error messages, and that no
``(N, V)`` tensor is ever created.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kdistill.errors import InvalidArgumentError, ShapeMismatchError, UnknownNameError, VocabMismatchError
from kdistill.losses import LOSSES, chunked_divergence, forward_kl
from kdistill.losses import chunked as chunked_module

DIVERGENCES = LOSSES.names(kind="divergence")
EXTRA_KWARGS: dict[str, dict[str, float]] = {
    "skewed_forward_kl": {"skew": 0.3},
    "skewed_reverse_kl": {"skew": 0.2},
    "generalized_jsd": {"beta": 0.3},
}
LEADING_SHAPE = (3, 5)  # 15 positions
STUDENT_HIDDEN, TEACHER_HIDDEN, VOCAB = 12, 10, 37


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


def _case(
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    leading_shape: tuple[int, ...] = LEADING_SHAPE,
    student_vocab: int = VOCAB,
    teacher_vocab: int = VOCAB,
    bias: bool = False,
    student_grad: bool = True,
    teacher_grad: bool = False,
) -> dict[str, Any]:
    """Random hidden states and heads; logits of a few units so that the distributions are neither flat nor one-hot."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_(grad)

    case: dict[str, Any] = {
        "student_hidden": randn(*leading_shape, STUDENT_HIDDEN, grad=student_grad),
        "student_head_weight": randn(student_vocab, STUDENT_HIDDEN, scale=0.6, grad=student_grad),
        "teacher_hidden": randn(*leading_shape, TEACHER_HIDDEN, grad=teacher_grad),
        "teacher_head_weight": randn(teacher_vocab, TEACHER_HIDDEN, scale=0.6, grad=teacher_grad),
    }
    if bias:
        case["student_head_bias"] = randn(student_vocab, grad=student_grad)
        case["teacher_head_bias"] = randn(teacher_vocab, grad=teacher_grad)
    return case


def _mask(leading_shape: tuple[int, ...] = LEADING_SHAPE, seed: int = 1) -> torch.Tensor:
    """About 70% counted, row 1 fully uncounted, and at least one counted position."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(leading_shape, generator=gen) < 0.7
    mask[1] = False
    mask[0, 0] = True
    return mask


def _plain(case: dict[str, Any], mask: torch.Tensor | None, divergence: str | Callable, **kwargs: Any) -> torch.Tensor:
    """The reference: full logits materialized, then the same divergence."""
    student_logits = case["student_hidden"] @ case["student_head_weight"].T
    teacher_logits = case["teacher_hidden"] @ case["teacher_head_weight"].T
    if "student_head_bias" in case:
        student_logits = student_logits + case["student_head_bias"]
        teacher_logits = teacher_logits + case["teacher_head_bias"]
    fn = LOSSES.get(divergence) if isinstance(divergence, str) else divergence
    return fn(student_logits, teacher_logits, mask, **kwargs)


def _chunked(
    case: dict[str, Any], mask: torch.Tensor | None, divergence: str | Callable, **kwargs: Any
) -> torch.Tensor:
    return chunked_divergence(**case, mask=mask, divergence=divergence, **kwargs)


def _grads(loss: torch.Tensor, case: dict[str, Any], names: list[str]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [case[name] for name in names]))


def _assert_same_as_plain(
    case: dict[str, Any],
    mask: torch.Tensor | None,
    divergence: str | Callable,
    names: list[str],
    *,
    chunk_size: int,
    grad_scale: float = 1.0,
    **kwargs: Any,
) -> None:
    expected = _plain(case, mask, divergence, **kwargs)
    actual = _chunked(case, mask, divergence, chunk_size=chunk_size, **kwargs)
    assert actual.dtype == expected.dtype
    _close(actual, expected)
    expected_grads = _grads(expected * grad_scale, case, names)
    actual_grads = _grads(actual * grad_scale, case, names)
    for name, got, want in zip(names, actual_grads, expected_grads, strict=True):
        assert got.shape == case[name].shape and got.dtype == case[name].dtype, name
        assert want.abs().max() > 0, f"the reference gradient w.r.t. {name} is 0: the check would be vacuous"
        _close(got, want)


# ---------------------------------------------------------------- equality with the plain path


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_matches_plain_path(divergence: str, chunk_size: int) -> None:
    kwargs = {"temperature": 1.7, "chunk_size": chunk_size, **EXTRA_KWARGS.get(divergence, {})}
    names = ["student_hidden", "student_head_weight"]
    _assert_same_as_plain(_case(seed=3), _mask(), divergence, names, **kwargs)


@pytest.mark.parametrize("divergence", ["forward_kl", "generalized_jsd", "logit_mse"])
def test_chunks_sliced_for_the_divergence_match_plain_path(divergence: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # On CPU a chunk is cut into slices whose float32 (rows, V) tensors fit _CPU_SLICE_BYTES; make that 3 rows, so
    # chunks of 8 rows become slices of 3, 3 and 2, with the teacher padded to the larger vocabulary.
    teacher_vocab = VOCAB + 5
    monkeypatch.setattr(chunked_module, "_CPU_SLICE_BYTES", 3 * teacher_vocab * 4)
    calls: list[int] = []

    def counted(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask=None, **kwargs: Any) -> torch.Tensor:
        calls.append(student_logits.shape[0])
        return LOSSES.get(divergence)(student_logits, teacher_logits, mask, **kwargs)

    case = _case(seed=20, teacher_vocab=teacher_vocab, bias=True, teacher_grad=True)
    mask = _mask()
    _assert_same_as_plain(case, mask, counted, list(case), chunk_size=8, vocab_policy="pad", temperature=1.2)
    n_counted = int(mask.sum())
    expected_slices = [
        len(range(first, min(first + 3, stop)))
        for start in range(0, n_counted, 8)
        for stop in [min(start + 8, n_counted)]
        for first in range(start, stop, 3)
    ]
    assert calls[1:] == expected_slices  # calls[0] is the plain path's


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean"])
def test_reductions_with_biases_and_grad_output(reduction: str) -> None:
    case = _case(seed=4, bias=True)
    names = ["student_hidden", "student_head_weight", "student_head_bias"]
    _assert_same_as_plain(
        case, _mask(), "generalized_jsd", names, grad_scale=3.7, reduction=reduction, beta=0.6, chunk_size=4
    )


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_self_distillation_gradients_reach_the_teacher(divergence: str) -> None:
    case = _case(seed=5, bias=True, teacher_grad=True)
    names = list(case)  # every hidden state, weight and bias, student's and teacher's
    _assert_same_as_plain(case, _mask(), divergence, names, chunk_size=3, temperature=2.0)


def test_only_the_teacher_requires_grad() -> None:
    case = _case(seed=6, student_grad=False, teacher_grad=True)
    _assert_same_as_plain(case, _mask(), "reverse_kl", ["teacher_hidden", "teacher_head_weight"], chunk_size=2)


@pytest.mark.parametrize("divergence", ["forward_kl", "skewed_reverse_kl"])
def test_per_position_temperatures_match_plain_path(divergence: str) -> None:
    gen = torch.Generator().manual_seed(21)
    temperature = 0.5 + 2.0 * torch.rand(LEADING_SHAPE, generator=gen)  # (...), as the flsw/cwsm schedules give
    names = ["student_hidden", "student_head_weight"]
    _assert_same_as_plain(_case(seed=21), _mask(), divergence, names, chunk_size=4, temperature=temperature)
    _assert_same_as_plain(_case(seed=22), None, divergence, names, chunk_size=4, temperature=torch.tensor(1.6))


def test_temperature_tensor_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ShapeMismatchError, match=r"temperature tensor has shape \(5,\)"):
        _chunked(_case(), None, "forward_kl", temperature=torch.ones(5))


@pytest.mark.parametrize("vocab_policy", ["truncate", "pad"])
def test_vocab_policies_match_plain_path(vocab_policy: str) -> None:
    case = _case(seed=7, student_vocab=VOCAB, teacher_vocab=VOCAB + 6)
    names = ["student_hidden", "student_head_weight"]
    _assert_same_as_plain(case, _mask(), "forward_kl", names, vocab_policy=vocab_policy, chunk_size=4)


def test_no_mask_and_more_leading_dims() -> None:
    case = _case(seed=8, leading_shape=(2, 3, 4))
    names = ["student_hidden", "student_head_weight"]
    _assert_same_as_plain(case, None, "skewed_reverse_kl", names, reduction="batchmean", chunk_size=5)


def test_single_position_without_leading_dims() -> None:
    case = _case(seed=9, leading_shape=())
    _assert_same_as_plain(case, None, "forward_kl", ["student_hidden", "student_head_weight"], chunk_size=2)


def test_evaluation_without_grad_matches_plain_value() -> None:
    case = _case(seed=10, bias=True)
    expected = _plain(case, _mask(), "total_variation")
    with torch.no_grad():
        actual = _chunked(case, _mask(), "total_variation", chunk_size=4)
    assert not actual.requires_grad
    _close(actual, expected.detach())
    frozen = {name: tensor.detach() for name, tensor in case.items()}  # grad mode on, nothing requires grad
    _close(_chunked(frozen, _mask(), "total_variation", chunk_size=4), expected.detach())


def test_callable_divergence_is_called_per_chunk_with_sum_and_no_mask() -> None:
    calls: list[tuple[int, Any, str]] = []

    def my_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask=None, **kwargs: Any):
        calls.append((student_logits.shape[0], mask, kwargs.get("reduction", "mean")))
        return forward_kl(student_logits, teacher_logits, mask, **kwargs)

    case, mask = _case(seed=11), _mask()
    _assert_same_as_plain(case, mask, my_divergence, ["student_hidden", "student_head_weight"], chunk_size=4)
    chunked_calls = calls[1:]  # the first call is the plain path's
    n_counted = int(mask.sum())
    assert [rows for rows, _, _ in chunked_calls] == [min(4, n_counted - start) for start in range(0, n_counted, 4)]
    assert all(m is None and reduction == "sum" for _, m, reduction in chunked_calls)


def test_repeated_backward_with_retained_graph_gives_the_same_gradients() -> None:
    case = _case(seed=12)
    loss = _chunked(case, _mask(), "forward_kl", chunk_size=3)
    loss.backward(retain_graph=True)
    first = case["student_head_weight"].grad.clone()
    case["student_head_weight"].grad.mul_(100.0)  # an optimizer scaling .grad in place must not reach the saved one
    case["student_head_weight"].grad = None
    loss.backward()
    _close(case["student_head_weight"].grad, first)


def test_loss_independent_of_student_gives_zero_gradients() -> None:
    case = _case(seed=13)
    loss = _chunked(case, _mask(), "skewed_forward_kl", skew=1.0, chunk_size=3)  # KL(p_T‖p_T) = 0
    grad_hidden, grad_weight = _grads(loss, case, ["student_hidden", "student_head_weight"])
    assert loss.item() == 0.0
    assert not grad_hidden.any() and not grad_weight.any()


def test_float64_gradcheck() -> None:
    case = _case(
        seed=14,
        dtype=torch.float64,
        leading_shape=(2, 3),
        student_vocab=7,
        teacher_vocab=7,
        bias=True,
        teacher_grad=True,
    )
    mask = torch.tensor([[True, False, True], [True, True, False]])
    names = list(case)

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        inputs = dict(zip(names, tensors, strict=True))
        return chunked_divergence(**inputs, mask=mask, divergence="generalized_jsd", chunk_size=2, temperature=1.3)

    assert fn(*case.values()).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, tuple(case.values()), atol=1e-8, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_close_to_plain_path_and_returns_float32(dtype: torch.dtype) -> None:
    case = _case(seed=15, dtype=dtype, bias=True)
    names = ["student_hidden", "student_head_weight", "student_head_bias"]
    expected = _plain(case, _mask(), "forward_kl", temperature=1.5)
    actual = _chunked(case, _mask(), "forward_kl", temperature=1.5, chunk_size=4)
    assert actual.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-3)
    for name, got, want in zip(names, _grads(actual, case, names), _grads(expected, case, names), strict=True):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-3)


# ---------------------------------------------------------------- edge cases and errors


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean"])
def test_all_masked_gives_zero_and_zero_gradients(reduction: str) -> None:
    case = _case(seed=16, bias=True)
    mask = torch.zeros(LEADING_SHAPE, dtype=torch.bool)
    loss = _chunked(case, mask, "generalized_jsd", reduction=reduction, chunk_size=4)
    names = ["student_hidden", "student_head_weight", "student_head_bias"]
    grads = _grads(loss, case, names)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    for name, grad in zip(names, grads, strict=True):
        assert grad.shape == case[name].shape and torch.isfinite(grad).all() and not grad.any(), name


def test_reduction_none_is_refused_with_an_alternative() -> None:
    with pytest.raises(InvalidArgumentError, match=r"reduction='none' is not supported.*use 'mean', 'sum'"):
        _chunked(_case(), None, "forward_kl", reduction="none")


def test_hidden_size_mismatch_names_both_sizes() -> None:
    case = _case()
    case["student_head_weight"] = torch.randn(VOCAB, STUDENT_HIDDEN + 4)
    expected = rf"student_hidden has size {STUDENT_HIDDEN} .* student_head_weight is \({VOCAB}, {STUDENT_HIDDEN + 4}\)"
    with pytest.raises(ShapeMismatchError, match=expected):
        _chunked(case, None, "forward_kl")
    case = _case()
    case["teacher_head_weight"] = torch.randn(VOCAB, 3)
    with pytest.raises(ShapeMismatchError, match=rf"teacher_hidden has size {TEACHER_HIDDEN} .*\({VOCAB}, 3\)"):
        _chunked(case, None, "forward_kl")


def test_leading_shape_and_bias_mismatches_name_the_shapes() -> None:
    case = _case()
    case["teacher_hidden"] = torch.randn(3, 4, TEACHER_HIDDEN)
    with pytest.raises(ShapeMismatchError, match=r"\(3, 5, 12\) and teacher_hidden \(3, 4, 10\)"):
        _chunked(case, None, "forward_kl")
    case = _case(bias=True)
    case["student_head_bias"] = torch.randn(VOCAB + 1)
    with pytest.raises(ShapeMismatchError, match=rf"student_head_bias has shape \({VOCAB + 1},\).*\({VOCAB},\)"):
        _chunked(case, None, "forward_kl")
    with pytest.raises(ShapeMismatchError, match="mask has shape"):
        _chunked(_case(), torch.ones(3, 4, dtype=torch.bool), "forward_kl")


def test_vocab_mismatch_names_both_sizes_before_any_computation() -> None:
    class Refuse(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith(("mm", "addmm", "linear", "matmul")):
                raise AssertionError(f"computed {func} before validating")
            return func(*args, **(kwargs or {}))

    case = _case(student_vocab=VOCAB, teacher_vocab=VOCAB + 3)
    with Refuse(), pytest.raises(VocabMismatchError, match=rf"{VOCAB} entries.*{VOCAB + 3}"):
        _chunked(case, None, "forward_kl")


@pytest.mark.parametrize("chunk_size", [0, -2, 2.5, True, "8"])
def test_bad_chunk_size_is_refused(chunk_size: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="chunk_size must be a positive int"):
        _chunked(_case(), None, "forward_kl", chunk_size=chunk_size)


def test_names_are_resolved_through_the_registry() -> None:
    case, mask = _case(seed=17), _mask()
    _close(_chunked(case, mask, "kl", chunk_size=4), _chunked(case, mask, "forward_kl", chunk_size=4))  # alias
    with pytest.raises(UnknownNameError, match="forward_kl"):
        _chunked(case, mask, "forward_kll")
    with pytest.raises(InvalidArgumentError, match="not a divergence"):
        _chunked(case, mask, "token_cross_entropy")


def test_divergence_arguments_are_validated_by_the_divergence() -> None:
    with pytest.raises(InvalidArgumentError, match="skew"):
        _chunked(_case(), _mask(), "skewed_forward_kl", skew=1.5)
    with pytest.raises(InvalidArgumentError, match="temperature"):
        _chunked(_case(), _mask(), "forward_kl", temperature=0.0)


# ---------------------------------------------------------------- memory: the (N, V) logits never exist


class _LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any operation produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


class _LargestSaved:
    """Records the element count of the largest tensor saved for backward (through saved_tensors_hooks)."""

    def __init__(self) -> None:
        self.largest = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.largest = max(self.largest, tensor.numel())
        return tensor


def _forward_backward(run: Callable[[], torch.Tensor], case: dict[str, Any]) -> tuple[int, int]:
    created, saved = _LargestOutput(), _LargestSaved()
    with created, saved.hooks:
        loss = run()
        torch.autograd.grad(loss, [case["student_hidden"], case["student_head_weight"]])
    return created.largest, saved.largest


@pytest.mark.parametrize("divergence", ["forward_kl", "generalized_jsd"])
def test_no_tensor_of_n_by_v_elements_is_ever_created(divergence: str) -> None:
    leading_shape, vocab, chunk = (4, 64), 300, 16  # N·V = 76800; chunk·V = 4800; V·H = 3600; N·H = 3072
    case = _case(seed=18, leading_shape=leading_shape, student_vocab=vocab, teacher_vocab=vocab)
    n_by_v = math.prod(leading_shape) * vocab

    plain_created, plain_saved = _forward_backward(lambda: _plain(case, None, divergence), case)
    assert plain_created >= n_by_v and plain_saved >= n_by_v  # the detectors see the plain path's logits

    created, saved = _forward_backward(lambda: _chunked(case, None, divergence, chunk_size=chunk), case)
    bound = max(chunk * vocab, vocab * STUDENT_HIDDEN, math.prod(leading_shape) * STUDENT_HIDDEN)
    assert created <= bound < n_by_v
    assert saved <= bound


def test_uncounted_positions_never_reach_the_head() -> None:
    leading_shape, vocab = (4, 64), 300
    case = _case(seed=19, leading_shape=leading_shape, student_vocab=vocab, teacher_vocab=vocab)
    mask = torch.zeros(leading_shape, dtype=torch.bool)
    mask[:, :5] = True  # 20 of 256 positions count
    created, _ = _forward_backward(lambda: _chunked(case, mask, "forward_kl", chunk_size=10_000), case)
    assert created <= max(int(mask.sum()) * vocab, vocab * STUDENT_HIDDEN, math.prod(leading_shape) * STUDENT_HIDDEN)
