from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kdistill.errors import InvalidArgumentError, KdistillError, UnknownNameError
from kdistill.losses import LOSSES, forward_kl, get_loss, register_loss, soft_cross_entropy
from kdistill.registry import Registry


def test_builtin_names_and_aliases_resolve():
    assert get_loss("forward_kl") is forward_kl
    assert get_loss("kd_ce") is soft_cross_entropy
    assert get_loss(forward_kl) is forward_kl
    assert set(LOSSES.names(kind="divergence")) == {
        "forward_kl", "reverse_kl", "skewed_forward_kl", "skewed_reverse_kl", "generalized_jsd",
        "total_variation", "soft_cross_entropy", "logit_mse",
    }  # fmt: skip
    assert set(LOSSES.names(kind="feature")) == {
        "hidden_mse", "cosine", "pkd", "attention_mse", "attention_kl", "nst", "fsp",
    }  # fmt: skip


def test_unknown_name_lists_known_names_and_suggests_the_closest():
    with pytest.raises(UnknownNameError) as info:
        get_loss("foward_kl")
    message = str(info.value)
    assert "unknown loss 'foward_kl'" in message
    assert "did you mean 'forward_kl'" in message
    assert "reverse_kl" in message and "kd_ce" in message
    assert isinstance(info.value, KdistillError)


def test_registering_a_user_divergence_is_one_call():
    def half_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", **kwargs):
        return 0.5 * forward_kl(student_logits, teacher_logits, mask, temperature=temperature, reduction=reduction)

    register_loss("half_kl_test", half_kl)
    try:
        s, t = torch.randn(3, 5), torch.randn(3, 5)
        torch.testing.assert_close(get_loss("half_kl_test")(s, t), 0.5 * forward_kl(s, t))
        assert "half_kl_test" in LOSSES.names(kind="divergence")
        with pytest.raises(InvalidArgumentError, match="already registered"):
            register_loss("half_kl_test", half_kl)
        register_loss("half_kl_test", forward_kl, overwrite=True)
        assert get_loss("half_kl_test") is forward_kl
    finally:
        LOSSES._drop("half_kl_test")
    assert "half_kl_test" not in LOSSES


def test_decorator_form_and_alias_collisions():
    registry: Registry = Registry("schedule")

    @registry.register("constant", aliases=("const",))
    def constant(step: int) -> float:
        return 1.0

    assert registry.get("const") is constant
    with pytest.raises(InvalidArgumentError, match="'const' is already registered"):
        registry.register("other", lambda step: 0.0, aliases=("const",))
    with pytest.raises(UnknownNameError, match="unknown schedule 'linear'; known: const, constant"):
        registry.get("linear")


def test_losses_import_neither_transformers_nor_accelerate():
    code = "import sys, kdistill.losses; print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
