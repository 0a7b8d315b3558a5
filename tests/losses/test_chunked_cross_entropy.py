"""The chunked cross-entropy (gradients computed in the forward pass) against a float64 reference on full logits."""

from __future__ import annotations

import pytest
import torch

from kdistill.errors import InvalidArgumentError
from kdistill.losses.chunked import chunked_token_cross_entropy


def _inputs(n: int = 13, hidden: int = 8, vocab: int = 37, bias: bool = True, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, hidden, generator=generator).requires_grad_()
    weight = torch.randn(vocab, hidden, generator=generator).requires_grad_()
    b = torch.randn(vocab, generator=generator).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (n,), generator=generator)
    return rows, weight, b, targets


def _reference(rows, weight, bias, targets, scale: float = 1.0):
    leaves = [t.detach().double().requires_grad_() for t in (rows, weight) + ((bias,) if bias is not None else ())]
    logits = leaves[0] @ leaves[1].T + (leaves[2] if bias is not None else 0)
    loss = -torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum()
    (loss * scale).backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_the_float64_reference(chunk_size, bias):
    rows, weight, b, targets = _inputs(bias=bias)
    loss = chunked_token_cross_entropy(rows, weight, targets, b, chunk_size=chunk_size)
    (loss * 0.37).backward()  # an upstream gradient other than 1 is applied in backward
    expected, grads = _reference(rows, weight, b, targets, scale=0.37)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    got = [rows.grad, weight.grad] + ([b.grad] if bias else [])
    for mine, theirs in zip(got, grads, strict=True):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-6)


def test_only_the_inputs_that_need_gradients_get_them_and_no_rows_give_zero():
    rows, weight, b, targets = _inputs()
    weight.requires_grad_(False)
    loss = chunked_token_cross_entropy(rows, weight, targets, b, chunk_size=4)
    loss.backward()
    assert weight.grad is None and rows.grad is not None and b.grad is not None
    empty = chunked_token_cross_entropy(rows[:0], weight, targets[:0], b, chunk_size=4)
    assert float(empty) == 0.0
    with torch.no_grad():  # no gradients asked: the same value
        assert float(chunked_token_cross_entropy(rows, weight, targets, b, chunk_size=4)) == pytest.approx(float(loss))


def test_bfloat16_inputs_keep_their_dtype_and_float32_math():
    rows, weight, _, targets = _inputs(bias=False)
    rows16 = rows.detach().bfloat16().requires_grad_()
    weight16 = weight.detach().bfloat16().requires_grad_()
    loss = chunked_token_cross_entropy(rows16, weight16, targets, chunk_size=5)
    loss.backward()
    assert (
        loss.dtype == torch.float32 and rows16.grad.dtype == torch.bfloat16 and weight16.grad.dtype == torch.bfloat16
    )
    expected, grads = _reference(rows16.detach().float(), weight16.detach().float(), None, targets)
    assert float(loss) == pytest.approx(float(expected), rel=2e-2)
    torch.testing.assert_close(weight16.grad.double(), grads[1], rtol=5e-2, atol=5e-2)


def test_a_label_outside_the_head_is_named():
    rows, weight, b, targets = _inputs()
    targets[3] = 37
    with pytest.raises(InvalidArgumentError, match="label 37 is outside the 37 classes"):
        chunked_token_cross_entropy(rows, weight, targets, b)
