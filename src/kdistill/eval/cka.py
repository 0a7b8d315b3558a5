"""Centered kernel alignment (CKA): how similar two sets of representations of the same inputs are.

Linear CKA (Kornblith et al., 2019, "Similarity of Neural Network Representations Revisited") compares ``X (n, d1)``
and ``Y (n, d2)`` — the same ``n`` inputs seen by two layers, of any widths — as

    CKA(X, Y) = ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F · ‖Yᵀ Y‖_F),  with X and Y column-centered,

which equals HSIC(XXᵀ, YYᵀ) / sqrt(HSIC(XXᵀ, XXᵀ) · HSIC(YYᵀ, YYᵀ)). It lies in [0, 1], is 1 for identical
representations and is invariant to orthogonal transforms and isotropic scaling of either side (not to arbitrary
invertible linear maps). :func:`layer_cka` runs a teacher and a student on the same batches and compares layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from kdistill.core.views import student_inputs, teacher_inputs
from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.eval.speed import evaluating, prepare_inputs
from kdistill.features import FeatureTap

__all__ = ["layer_cka", "linear_cka"]

Positions = Literal["auto", "tokens", "mean"]
_POSITIONS = ("auto", "tokens", "mean")
_INPUT_KEYS = ("student", "teacher")


def _check_representation(name: str, value: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ShapeMismatchError(f"linear_cka: {name} must be a 2-D tensor (n, d), got {shape}")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two representations of the same ``n`` inputs, computed in float64.

    Args:
        x: ``(n, d1)``, one row per input.
        y: ``(n, d2)``, the same inputs in the same order; ``d2`` may differ from ``d1``.

    Returns:
        CKA in [0, 1]. A representation that is constant over the inputs (zero variance after centering) carries no
        similarity structure; CKA is undefined there and 0.0 is returned.

    Raises:
        ShapeMismatchError: not 2-D, or different numbers of rows.
        InvalidArgumentError: fewer than 2 rows, or non-finite values.
    """
    _check_representation("x", x)
    _check_representation("y", y)
    if x.shape[0] != y.shape[0]:
        raise ShapeMismatchError(
            f"linear_cka: x has {x.shape[0]} rows and y has {y.shape[0]}; both must hold the same inputs"
        )
    n = x.shape[0]
    if n < 2:
        raise InvalidArgumentError(f"linear_cka needs at least 2 rows (inputs) to center, got n={n}")
    x = x.detach().to(torch.float64)
    y = y.detach().to(torch.float64)
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise InvalidArgumentError("linear_cka: the representations hold NaN or inf values")
    x = x - x.mean(0, keepdim=True)  # (n, d1) centered columns
    y = y - y.mean(0, keepdim=True)  # (n, d2)
    if n * n < x.shape[1] * y.shape[1]:  # fewer inputs than feature pairs: the Gram form is cheaper
        gram_x, gram_y = x @ x.T, y @ y.T  # (n, n) each
        cross = (gram_x * gram_y).sum()  # tr(K L) = ‖Yᵀ X‖²_F
        norm_x, norm_y = gram_x.norm(), gram_y.norm()  # ‖X Xᵀ‖_F = ‖Xᵀ X‖_F
    else:
        cross = (y.T @ x).pow(2).sum()  # ‖Yᵀ X‖²_F, from a (d2, d1) matrix
        norm_x, norm_y = (x.T @ x).norm(), (y.T @ y).norm()
    denominator = float(norm_x * norm_y)
    if denominator == 0.0:
        return 0.0
    return min(max(float(cross) / denominator, 0.0), 1.0)  # clip float rounding just past the bounds


# ---------------------------------------------------------------- teacher vs student layers


def _inputs_of(batch: Mapping[str, Any], key: str | None, default: str) -> Mapping[str, Any]:
    key = default if key is None else key
    if key not in _INPUT_KEYS:
        raise InvalidArgumentError(f"an inputs key must be 'student', 'teacher' or None, got {key!r}")
    return student_inputs(batch) if key == "student" else teacher_inputs(batch)


def _counted_mask(inputs: Mapping[str, Any]) -> torch.Tensor | None:
    mask = inputs.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) else None


def _same_positions(first: Mapping[str, Any], second: Mapping[str, Any]) -> bool:
    """Whether two models' inputs have the same token positions (same tokenization of each example)."""
    if first is second:
        return True
    mask_a, mask_b = _counted_mask(first), _counted_mask(second)
    ids_a, ids_b = first.get("input_ids"), second.get("input_ids")
    if mask_a is not None or mask_b is not None:
        return (
            mask_a is not None and mask_b is not None and mask_a.shape == mask_b.shape and torch.equal(mask_a, mask_b)
        )
    return isinstance(ids_a, torch.Tensor) and isinstance(ids_b, torch.Tensor) and ids_a.shape == ids_b.shape


class _Gathered:
    """Per feature: counted token rows ``(n_tokens, H)`` and mean-pooled example rows ``(n_examples, H)``."""

    def __init__(self) -> None:
        self.tokens: list[torch.Tensor] = []
        self.pooled: list[torch.Tensor] = []
        self.per_token = True  # False once a feature is (B, H): then only pooled rows exist

    def add(self, feature: torch.Tensor, mask: torch.Tensor | None, spec: str) -> None:
        feature = feature.detach().float().cpu()
        if feature.dim() == 2:  # (B, H): already one vector per example
            self.per_token = False
            self.pooled.append(feature)
            return
        if feature.dim() != 3:
            raise ShapeMismatchError(
                f"layer_cka: feature {spec!r} has shape {tuple(feature.shape)}; expected (B, T, H) or (B, H)"
            )
        batch, length = feature.shape[:2]
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool)
        mask = mask.cpu()
        if tuple(mask.shape) != (batch, length):
            raise ShapeMismatchError(
                f"layer_cka: feature {spec!r} has shape {tuple(feature.shape)} but the attention_mask "
                f"{tuple(mask.shape)}; (B, T) must agree"
            )
        self.tokens.append(feature[mask])  # (n_counted, H)
        weights = mask.unsqueeze(-1).float()  # (B, T, 1)
        self.pooled.append((feature * weights).sum(1) / weights.sum(1).clamp_min(1.0))  # (B, H)


def _gather(
    model: nn.Module, batches: Sequence[Mapping[str, Any]], specs: list[str], key: str | None, default: str
) -> dict[str, _Gathered]:
    gathered = {spec: _Gathered() for spec in specs}
    with evaluating(model):
        for batch in batches:
            inputs = _inputs_of(batch, key, default)
            with FeatureTap(model, {spec: spec for spec in specs}) as tap:
                outputs = model(**prepare_inputs(model, inputs), **tap.model_kwargs)
                features = tap.collect(outputs)
            mask = _counted_mask(inputs)
            for spec in specs:
                gathered[spec].add(features[spec], mask, spec)
    return gathered


def layer_cka(
    teacher: nn.Module,
    student: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    layer_pairs: Sequence[tuple[str, str]],
    *,
    teacher_key: str | None = None,
    student_key: str | None = None,
    positions: Positions = "auto",
) -> dict[tuple[str, str], float]:
    """Linear CKA between teacher and student layers over the counted positions of ``batches``.

    Both models run once per batch (eval mode, no gradients) with a :class:`~kdistill.features.FeatureTap` capturing
    every spec of ``layer_pairs`` (``"layer N"``, ``"embeddings"``, ``"last"``, ``"logits"`` or a module path).

    Positions: with ``"tokens"`` every real token (``attention_mask`` = 1) is one row, so both models must see the
    same tokens. With ``"mean"`` each example is one row, its hidden states averaged over its real tokens — the only
    meaningful choice when teacher and student tokenize differently (sequence lengths differ), and less sensitive
    to position. ``"auto"`` uses tokens when, in every batch, both models get the same attention mask (or, without
    one, input_ids of the same shape), and mean pooling otherwise. A feature that is already ``(B, H)`` (e.g. a
    sequence classifier's logits) always compares per example.

    Args:
        teacher: the teacher model.
        student: the student model.
        batches: batches as the training loop sees them; those carrying separate ``"student"``/``"teacher"``
            inputs feed each model its own.
        layer_pairs: ``(teacher spec, student spec)`` pairs; pass every combination for a full CKA matrix.
        teacher_key: which inputs feed the teacher, ``"teacher"`` or ``"student"``; None means ``"teacher"``
            (:func:`~kdistill.core.views.teacher_inputs`: ``batch["teacher"]``, or the batch itself).
        student_key: likewise for the student; None means ``"student"``.
        positions: ``"auto"``, ``"tokens"`` or ``"mean"``, as above.

    Returns:
        ``{(teacher spec, student spec): CKA}`` in [0, 1], in the order of ``layer_pairs``.

    Raises:
        InvalidArgumentError: no batches or pairs, a bad ``positions`` or inputs key, or fewer than 2 rows.
        ShapeMismatchError: ``positions="tokens"`` while the models see different token positions.
        FeatureSpecError: a spec that does not resolve on its model.
    """
    if positions not in _POSITIONS:
        raise InvalidArgumentError(f"positions must be one of {_POSITIONS}, got {positions!r}")
    if not batches:
        raise InvalidArgumentError("layer_cka needs at least one batch, got none")
    pairs = [(str(t), str(s)) for t, s in layer_pairs]
    if not pairs:
        raise InvalidArgumentError("layer_cka needs at least one (teacher, student) layer pair, got none")
    same = all(
        _same_positions(_inputs_of(b, teacher_key, "teacher"), _inputs_of(b, student_key, "student")) for b in batches
    )
    if positions == "tokens" and not same:
        raise ShapeMismatchError(
            "layer_cka: positions='tokens' needs teacher and student to see the same token positions, but their "
            "attention masks (or input_ids shapes) differ; use positions='mean' for different tokenizations"
        )
    teacher_specs = list(dict.fromkeys(t for t, _ in pairs))
    student_specs = list(dict.fromkeys(s for _, s in pairs))
    teacher_rows = _gather(teacher, batches, teacher_specs, teacher_key, "teacher")
    student_rows = _gather(student, batches, student_specs, student_key, "student")
    result: dict[tuple[str, str], float] = {}
    for t_spec, s_spec in pairs:
        t_rows, s_rows = teacher_rows[t_spec], student_rows[s_spec]
        per_token = positions != "mean" and same and t_rows.per_token and s_rows.per_token
        if per_token:
            x, y = torch.cat(t_rows.tokens), torch.cat(s_rows.tokens)  # (n_tokens, H_t), (n_tokens, H_s)
        else:
            x, y = torch.cat(t_rows.pooled), torch.cat(s_rows.pooled)  # (n_examples, H_t), (n_examples, H_s)
        result[(t_spec, s_spec)] = linear_cka(x, y)
    return result
