"""Linear CKA against a NumPy HSIC reference and its invariances; layer CKA against hidden states the models report."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import make_batch, make_tiny_bert, make_tiny_lstm
from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.eval.cka import layer_cka, linear_cka
from kdistill.features import FeatureSpecError


def reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019), eq. 2-3: HSIC(K, L) = tr(K H L H) / (n-1)², K = X Xᵀ, L = Y Yᵀ, in float64."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    centering = np.eye(n) - np.ones((n, n)) / n

    def hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 - the paper's name
        return float(np.trace(k @ centering @ l @ centering)) / (n - 1) ** 2

    k, l = x @ x.T, y @ y.T  # noqa: E741
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def _random(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("n", "d1", "d2"), [(50, 8, 12), (6, 20, 30), (40, 5, 5)])  # feature form, Gram form, square
def test_linear_cka_matches_hsic_reference(n, d1, d2):
    x = _random(n, d1, 0)
    y = x[:, :1] * 0.5 + _random(n, d2, 1)  # partly related, so the value is neither 0 nor 1
    expected = reference_cka(x.numpy(), y.numpy())
    assert 0.0 < expected < 1.0
    assert linear_cka(x, y) == pytest.approx(expected, abs=1e-10)


def test_linear_cka_is_computed_in_float64():
    x, y = _random(30, 6, 2).half(), _random(30, 9, 3).half()
    assert linear_cka(x, y) == pytest.approx(reference_cka(x.float().numpy(), y.float().numpy()), abs=1e-10)


def test_linear_cka_invariances():
    x, y = _random(40, 8, 4).double(), (_random(40, 6, 5) + _random(40, 1, 6)).double()  # transforms in float64
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    orthogonal, _ = torch.linalg.qr(_random(8, 8, 7).double())
    assert linear_cka(x, x @ orthogonal) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x @ orthogonal * 3.0, y * 0.01) == pytest.approx(linear_cka(x, y), abs=1e-9)
    assert linear_cka(x + 5.0, y - 2.0) == pytest.approx(linear_cka(x, y), abs=1e-9)  # centered
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    # not invariant to anisotropic scaling: the test would notice a normalization per feature
    anisotropic = torch.tensor([1.0, 10.0, 0.1, 1.0, 5.0, 1.0, 1.0, 0.2], dtype=torch.float64)
    assert linear_cka(x, x * anisotropic) < 0.99


def test_linear_cka_errors_and_constant_input():
    with pytest.raises(InvalidArgumentError, match="n=1"):
        linear_cka(torch.ones(1, 3), torch.ones(1, 2))
    with pytest.raises(ShapeMismatchError, match="x has 4 rows and y has 5"):
        linear_cka(torch.ones(4, 3), torch.ones(5, 3))
    with pytest.raises(ShapeMismatchError, match=r"x must be a 2-D tensor \(n, d\), got \(4,\)"):
        linear_cka(torch.ones(4), torch.ones(4, 3))
    with pytest.raises(InvalidArgumentError, match="NaN"):
        linear_cka(torch.tensor([[0.0], [float("nan")]]), torch.ones(2, 1))
    assert linear_cka(torch.ones(5, 3), _random(5, 2, 0)) == 0.0  # no variance: undefined, reported as 0


# ---------------------------------------------------------------- layer_cka


def _hidden_states(model, batch, layer: int) -> torch.Tensor:
    with torch.no_grad():
        outputs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
    return outputs.hidden_states[layer]  # (B, T, H)


def test_layer_cka_uses_counted_tokens():
    teacher, student = make_tiny_bert(), make_tiny_bert(num_layers=2, hidden=16, seed=1)
    batches = [make_batch(seed=0), make_batch(seed=1)]
    result = layer_cka(teacher, student, batches, [("layer 4", "layer 2"), ("layer 1", "layer 1")])
    assert list(result) == [("layer 4", "layer 2"), ("layer 1", "layer 1")]
    for (t_layer, s_layer), value in result.items():
        t_number, s_number = int(t_layer.split()[1]), int(s_layer.split()[1])
        x = torch.cat([_hidden_states(teacher, b, t_number)[b["attention_mask"].bool()] for b in batches])
        y = torch.cat([_hidden_states(student, b, s_number)[b["attention_mask"].bool()] for b in batches])
        assert x.shape[0] == sum(int(b["attention_mask"].sum()) for b in batches)  # padding left out
        assert value == pytest.approx(reference_cka(x.numpy(), y.numpy()), abs=1e-6)


def test_layer_cka_of_a_model_with_its_copy_is_one_and_leaves_models_as_they_were():
    teacher = make_tiny_bert(num_layers=2, hidden=16)
    clone = copy.deepcopy(teacher).train()
    result = layer_cka(teacher, clone, [make_batch()], [("layer 2", "layer 2"), ("embeddings", "embeddings")])
    assert result[("layer 2", "layer 2")] == pytest.approx(1.0, abs=1e-6)
    assert result[("embeddings", "embeddings")] == pytest.approx(1.0, abs=1e-6)
    assert clone.training and not teacher.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks_with_kwargs for m in clone.modules())


def test_layer_cka_with_different_tokenizations_mean_pools():
    teacher, student = make_tiny_bert(), make_tiny_lstm(seed=1)
    batches = []
    for seed in (0, 1):
        teacher_in = make_batch(seq=12, seed=seed)
        student_in = make_batch(seq=7, seed=seed + 10, lengths=(7, 5, 7, 2))
        batches.append({"teacher": teacher_in, "student": student_in, "labels": teacher_in["labels"]})
    result = layer_cka(teacher, student, batches, [("layer 3", "lstm")])

    def pooled(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).float()  # (B, T, 1)
        return (states * weights).sum(1) / weights.sum(1)  # (B, H)

    x = torch.cat([pooled(_hidden_states(teacher, b["teacher"], 3), b["teacher"]["attention_mask"]) for b in batches])
    with torch.no_grad():
        y = torch.cat(
            [
                pooled(student.lstm(student.embedding(b["student"]["input_ids"]))[0], b["student"]["attention_mask"])
                for b in batches
            ]
        )
    assert x.shape[0] == y.shape[0] == 8  # one row per example
    assert result[("layer 3", "lstm")] == pytest.approx(reference_cka(x.numpy(), y.numpy()), abs=1e-6)
    with pytest.raises(ShapeMismatchError, match="positions='mean'"):
        layer_cka(teacher, student, batches, [("layer 3", "lstm")], positions="tokens")


def test_layer_cka_mean_positions_and_inputs_keys():
    teacher = make_tiny_bert(num_layers=2, hidden=16)
    batch = make_batch()
    shared = {"teacher": batch, "student": make_batch(seq=5, seed=3, lengths=(5, 5, 5, 5))}
    # the student reading the teacher's inputs sees the same tokens: the copy then scores 1 token by token
    result = layer_cka(teacher, copy.deepcopy(teacher), [shared], [("layer 1", "layer 1")], student_key="teacher")
    assert result[("layer 1", "layer 1")] == pytest.approx(1.0, abs=1e-6)
    mean = layer_cka(teacher, teacher, [batch], [("layer 1", "layer 2")], positions="mean")
    tokens = layer_cka(teacher, teacher, [batch], [("layer 1", "layer 2")])
    assert mean != pytest.approx(tokens, abs=1e-6)  # 4 pooled rows vs 32 token rows


def test_layer_cka_errors():
    teacher = make_tiny_bert(num_layers=2, hidden=16)
    batch = make_batch()
    with pytest.raises(InvalidArgumentError, match="at least one batch"):
        layer_cka(teacher, teacher, [], [("layer 1", "layer 1")])
    with pytest.raises(InvalidArgumentError, match="layer pair"):
        layer_cka(teacher, teacher, [batch], [])
    with pytest.raises(InvalidArgumentError, match="positions"):
        layer_cka(teacher, teacher, [batch], [("layer 1", "layer 1")], positions="max")
    with pytest.raises(InvalidArgumentError, match="inputs key"):
        layer_cka(teacher, teacher, [batch], [("layer 1", "layer 1")], student_key="other")
    with pytest.raises(FeatureSpecError, match="layer 9 is out of range"):
        layer_cka(teacher, teacher, [batch], [("layer 9", "layer 1")])
