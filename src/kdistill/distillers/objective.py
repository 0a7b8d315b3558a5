"""The distillation objective: weighted loss terms, each weight (and the temperature) driven by a schedule.

Terms and their names (the names used in logs, in ``stages`` and in weight overrides):

* ``"kd"`` — a divergence between student and teacher logits at temperature T (optionally × T²);
* ``"hard"`` — cross-entropy against the gold labels;
* ``"<match name>"`` — one per intermediate :class:`Match` (hidden states, attention maps, embeddings, logits).

Each term is computed as a *sum* over its units (counted positions, examples or attention pairs) and divided by
the number of units in the whole optimizer step — across gradient-accumulation micro-batches and processes —
so that accumulation and data parallelism give the same update as one large batch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kdistill.distillers.kd_terms import DenseKD, KDStrategy, Logits, Side
from kdistill.errors import InvalidArgumentError, KdistillError, ShapeMismatchError
from kdistill.losses import LOSSES, check_kd_kwargs
from kdistill.schedules import Schedule, make_schedule, make_temperature_schedule

#: What each loss's per-unit values are averaged over (see the loss docstrings for what "none" returns).
LOSS_UNITS: dict[str, str] = {
    "hidden_mse": "positions",
    "cosine": "positions",
    "attention_kl": "positions",
    "attention_mse": "pairs",
    "pkd": "examples",
    "nst": "examples",
    "fsp": "examples",
}
FEATURES: tuple[str, ...] = ("hidden", "attention", "embeddings", "logits")
PROJECTIONS: tuple[str, ...] = ("none", "linear", "mlp")


@dataclass
class Match:
    """One intermediate match: a student feature pulled toward a teacher feature.

    Attributes:
        teacher: where the teacher's feature comes from: ``"layer N"``, ``"embeddings"``, ``"last"``,
            ``"logits"`` or a module path (``"bert.encoder.layer.7"``, ``"lstm:input"``).
        student: the same for the student.
        feature: ``"hidden"``, ``"attention"``, ``"embeddings"`` or ``"logits"``.
        loss: a feature loss name from the registry (``hidden_mse``, ``cosine``, ``pkd``, ``attention_mse``,
            ``attention_kl``, ``nst``) or a divergence for ``feature="logits"``.
        weight: a number, a schedule dict (``{"name": "linear", "start": 1, "end": 0}``) or a callable.
        projection: ``"none"``, ``"linear"`` or ``"mlp"``: maps the student's hidden size to the teacher's.
        name: the term's name in logs; default ``"<feature>:<teacher>-><student>"``.
        teacher_index: which teacher (multi-teacher distillation).
        loss_kwargs: extra keyword arguments for the loss (e.g. ``{"average_heads": True}``).
    """

    teacher: str
    student: str
    feature: str = "hidden"
    loss: str = "hidden_mse"
    weight: Any = 1.0
    projection: str = "none"
    name: str | None = None
    teacher_index: int = 0
    loss_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.feature not in FEATURES:
            raise InvalidArgumentError(f"match feature {self.feature!r} is not one of {', '.join(FEATURES)}")
        if self.projection not in PROJECTIONS:
            raise InvalidArgumentError(f"match projection {self.projection!r} is not one of {', '.join(PROJECTIONS)}")
        if self.projection != "none" and self.feature == "attention":
            raise InvalidArgumentError("attention maps have no hidden size to project; use projection: none")
        loss = LOSSES.get(self.loss)  # unknown names fail here, with the known ones listed
        required = [
            p
            for p in inspect.signature(loss).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(required) > 2:
            raise InvalidArgumentError(
                f"match loss {self.loss!r} takes {len(required)} features ({', '.join(p.name for p in required)}) "
                "and a match holds one teacher and one student feature; call it in a term of your own, or choose "
                "a loss of two features (hidden_mse, cosine, pkd, nst, attention_mse, attention_kl)"
            )
        if self.name is None:
            self.name = f"{self.feature}:{self.teacher}->{self.student}"

    @property
    def unit(self) -> str:
        canonical = LOSSES.entry(self.loss).name
        if self.feature == "logits":
            return "logit_positions"
        return LOSS_UNITS.get(canonical, "positions")


def expand_layer_map(
    layer_map: str | Sequence[Sequence[int] | Mapping[str, int]],
    teacher_layers: int,
    student_layers: int,
    **match_fields: Any,
) -> list[Match]:
    """Turn a ``layer_map`` shorthand into :class:`Match` objects.

    Args:
        layer_map: ``"uniform"`` (student layer i ↔ teacher layer round(i·L_T/L_S), i = 1..L_S, as in
            DistilBERT/TinyBERT), ``"last"`` (last ↔ last), or explicit pairs ``[[teacher, student], ...]`` /
            ``[{"teacher": 8, "student": 2}, ...]`` of layer numbers (0 = embeddings output).
        teacher_layers: number of teacher blocks L_T.
        student_layers: number of student blocks L_S.
        **match_fields: the other :class:`Match` fields (``loss``, ``weight``, ``projection``, ``feature``...).
    """
    if isinstance(layer_map, str):
        if layer_map == "uniform":
            pairs = [(round(i * teacher_layers / student_layers), i) for i in range(1, student_layers + 1)]
        elif layer_map == "last":
            pairs = [(teacher_layers, student_layers)]
        else:
            raise InvalidArgumentError(f"layer_map {layer_map!r} is not 'uniform', 'last' or a list of pairs")
    else:
        pairs = []
        for item in layer_map:
            if isinstance(item, Mapping):
                pairs.append((int(item["teacher"]), int(item["student"])))
            elif len(item) == 2:
                pairs.append((int(item[0]), int(item[1])))
            else:
                raise InvalidArgumentError(f"layer_map entry {item!r} is not a [teacher, student] pair")
    for teacher_layer, student_layer in pairs:
        if not 0 <= teacher_layer <= teacher_layers:
            raise InvalidArgumentError(
                f"layer_map names teacher layer {teacher_layer}; the teacher has {teacher_layers}"
            )
        if not 0 <= student_layer <= student_layers:
            raise InvalidArgumentError(
                f"layer_map names student layer {student_layer}; the student has {student_layers}"
            )
    return [Match(teacher=f"layer {t}", student=f"layer {s}", **match_fields) for t, s in pairs]


@dataclass
class Stage:
    """A stage of progressive distillation: ``steps`` optimizer steps with some term weights overridden.

    ``weights`` maps term names (``"kd"``, ``"hard"``, match names, or ``"matches"`` for all matches) to a number
    or schedule; a schedule inside a stage runs over the stage's own steps. The last stage may leave ``steps`` None
    (until the end).
    """

    steps: int | None
    weights: dict[str, Any] = field(default_factory=dict)


@dataclass
class TermValue:
    """One term of one micro-batch: the sum over its units, and the unit it is averaged over."""

    total: torch.Tensor
    unit: str


class Objective:
    """Weighted sum of the KD term, the hard-label term and intermediate matches, with schedules and stages.

    Args:
        kd_loss: divergence name (or callable) for the logits term.
        kd_weight: weight of the KD term (number, schedule dict or callable ``(step, total) -> float``).
        hard_weight: weight of the hard-label cross-entropy.
        temperature: the softmax temperature: a number, a schedule, or ``{"name": "flsw" | "cwsm", ...}``
            (per-position temperatures computed from the logits).
        t2_scaling: multiply the KD term by T² (Hinton et al.) so its gradient scale does not shrink with T.
        kd_kwargs: extra arguments for the divergence (``skew``, ``beta``, ``vocab_policy``).
        matches: intermediate matches.
        stages: progressive distillation stages; None means one stage with the weights above.
    """

    def __init__(
        self,
        kd_loss: str | Callable[..., torch.Tensor] = "forward_kl",
        kd_weight: Any = 1.0,
        hard_weight: Any = 0.0,
        temperature: Any = 1.0,
        t2_scaling: bool = True,
        kd_kwargs: Mapping[str, Any] | None = None,
        matches: Sequence[Match] = (),
        stages: Sequence[Stage] | None = None,
    ) -> None:
        self.kd_loss_name = kd_loss if isinstance(kd_loss, str) else getattr(kd_loss, "__name__", "custom")
        self.kd_loss = LOSSES.resolve(kd_loss)
        self.kd_kwargs = dict(kd_kwargs or {})
        check_kd_kwargs(kd_loss, self.kd_kwargs)
        self.t2_scaling = t2_scaling
        self.temperature = make_temperature_schedule(temperature)
        self.matches = list(matches)
        names = [m.name for m in self.matches]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidArgumentError(f"two matches share the name {duplicates[0]!r}; give them distinct names")
        self.base_weights: dict[str, Schedule] = {"kd": make_schedule(kd_weight), "hard": make_schedule(hard_weight)}
        for match in self.matches:
            self.base_weights[match.name] = make_schedule(match.weight)
        self.stages = list(stages or [])
        for index, stage in enumerate(self.stages):
            if stage.steps is None and index != len(self.stages) - 1:
                raise InvalidArgumentError(f"stage {index} has no 'steps' but is not the last stage")
            for key in stage.weights:
                if key != "matches" and key not in self.base_weights:
                    raise InvalidArgumentError(
                        f"stage {index} sets a weight for {key!r}, which is not a term; terms: "
                        f"{', '.join(self.base_weights)} (or 'matches' for all matches)"
                    )
        self._stage_weights = [
            {key: make_schedule(value) for key, value in stage.weights.items()} for stage in self.stages
        ]

    @property
    def term_names(self) -> list[str]:
        return list(self.base_weights)

    def active_terms(self) -> set[str]:
        """Terms whose weight may be non-zero at some step (base schedule or a stage override)."""
        active = {name for name, schedule in self.base_weights.items() if _may_be_nonzero(schedule)}
        for overrides in self._stage_weights:
            for key, schedule in overrides.items():
                targets = [m.name for m in self.matches] if key == "matches" else [key]
                if _may_be_nonzero(schedule):
                    active.update(targets)
        return active

    def weights(self, step: int, total_steps: int) -> dict[str, float]:
        """Each term's weight at optimizer step ``step`` of ``total_steps`` (stages applied)."""
        values = {name: float(schedule(step, total_steps)) for name, schedule in self.base_weights.items()}
        if not self.stages:
            return values
        start = 0
        for stage, overrides in zip(self.stages, self._stage_weights, strict=True):
            length = stage.steps if stage.steps is not None else max(total_steps - start, 1)
            if step < start + length or stage is self.stages[-1]:
                local_step, local_total = step - start, length
                for key, schedule in overrides.items():
                    targets = [m.name for m in self.matches] if key == "matches" else [key]
                    for target in targets:
                        values[target] = float(schedule(local_step, local_total))
                return values
            start += length
        return values

    def check_schedules(self, total_steps: int) -> None:
        """Every weight and the temperature at each step of a run of ``total_steps`` (and at its end): weights
        finite and >= 0, the temperature finite and > 0; else :class:`InvalidArgumentError` naming the term, the
        value and the step. Run before training, so a schedule that goes wrong at step 4 fails before step 0."""
        total = max(int(total_steps), 1)
        for step in range(total + 1):
            base = float(self.temperature.base(step, total))
            if not math.isfinite(base) or base <= 0:
                raise InvalidArgumentError(
                    f"temperature: the schedule reaches {base} at step {step} of {total}; it must stay > 0"
                )
            for name, value in self.weights(step, total).items():
                if not math.isfinite(value) or value < 0:
                    raise InvalidArgumentError(
                        f"{name} weight: the schedule reaches {value} at step {step} of {total}; it must stay >= 0"
                    )

    def temperature_at(
        self, step: int, total_steps: int, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> float | torch.Tensor:
        return self.temperature(step, total_steps, student_logits, teacher_logits)

    def kd_term(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor | None,
        step: int,
        total_steps: int,
        temperature: float | torch.Tensor | None = None,
    ) -> TermValue:
        """The dense KD term (:class:`~kdistill.distillers.kd_terms.DenseKD`) on two models' logits, × T² when
        configured (by :meth:`kd_value`); the temperature is the schedule's at ``step`` unless given."""
        if temperature is None:
            temperature = self.temperature_at(step, total_steps, student_logits, teacher_logits)
        strategy = DenseKD(self.kd_loss, self.kd_kwargs)
        return self.kd_from(strategy, Logits(student_logits), Logits(teacher_logits), mask, temperature, {})

    def kd_from(
        self,
        strategy: KDStrategy,
        student: Side,
        teacher: Side,
        mask: torch.Tensor | None,
        temperature: float | torch.Tensor,
        batch: Mapping[str, Any],
    ) -> TermValue:
        """The KD term of one micro-batch by ``strategy``: its values, × T², summed over ``strategy.unit``.

        What both backends call for every KD path (see :mod:`kdistill.distillers.kd_terms`).
        """
        return self.kd_value(strategy.values(student, teacher, mask, temperature, batch), temperature, strategy.unit)

    def kd_value(
        self, values: torch.Tensor, temperature: float | torch.Tensor, unit: str = "logit_positions"
    ) -> TermValue:
        """The KD term from a divergence's values: × T² when ``t2_scaling`` is on, summed, counted in ``unit``.

        The one place T² is applied: every KD path of both backends (dense, chunked, cached top-k, across
        tokenizers, several teachers; the engine and ``DistillationTrainer``) hands its divergence values here.

        Args:
            values: the divergence per unit (any shape; 0 where nothing counts) or already summed (0-d).
            temperature: a number, or per-position temperatures of ``values``' shape (``flsw``, ``cwsm``).
            unit: the units the sum is over (``"logit_positions"``; ``"aligned_pairs"`` across tokenizers).
        """
        if self.t2_scaling:
            values = values * (temperature.pow(2) if isinstance(temperature, torch.Tensor) else temperature**2)
        return TermValue(values.sum(), unit)

    def match_term(
        self,
        match: Match,
        student_feature: torch.Tensor,
        teacher_feature: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> TermValue:
        """Sum over the match's units of its loss."""
        loss = LOSSES.get(match.loss)
        try:
            if match.feature == "logits":
                total = loss(student_feature, teacher_feature, None, reduction="sum", **match.loss_kwargs)
            else:
                total = loss(student_feature, teacher_feature, attention_mask, reduction="sum", **match.loss_kwargs)
        except ShapeMismatchError as error:
            raise ShapeMismatchError(f"match {match.name!r}: {error}") from None
        return TermValue(total, match.unit)


def _may_be_nonzero(schedule: Schedule) -> bool:
    """False only for a schedule that is 0 at every probed point (a constant 0, in practice)."""
    try:
        return any(schedule(step, 1000) != 0 for step in (0, 1, 250, 500, 750, 999))
    except Exception:  # a user's schedule that cannot be probed: assume it may be non-zero
        return True


def normalized_loss(
    terms: Mapping[str, TermValue],
    weights: Mapping[str, float] | None,
    counts: Mapping[str, float],
    *,
    world_size: int = 1,
) -> torch.Tensor:
    """One micro-batch's loss: Σ weight · (term sum / global count of its unit), × ``world_size``.

    The one normalization of both backends (``training/loop.py`` and ``DistillationTrainer.compute_loss``).
    ``counts`` are the units of the whole optimizer step, summed over its micro-batches and all processes before
    any forward, so the gradients summed over the step equal those of one batch holding all of it; the factor
    ``world_size`` undoes DDP's averaging of gradients over processes.

    Args:
        terms: each term's sum over its units (:class:`TermValue`).
        weights: each term's weight at this step (None: every term weighs 1).
        counts: the global count of each unit (a term whose unit has count 0 contributes its sum, which is 0).
        world_size: the number of processes whose gradients DDP averages (1 without DDP).

    Raises:
        KdistillError: no term has a non-zero weight.
    """
    loss = None
    for name, term in terms.items():
        weight = 1.0 if weights is None else weights.get(name, 0.0)
        if weight == 0.0:
            continue
        value = term.total * (weight * world_size / max(counts[term.unit], 1.0))
        loss = value if loss is None else loss + value
    if loss is None:
        raise KdistillError("no loss term has a non-zero weight at this step")
    return loss
