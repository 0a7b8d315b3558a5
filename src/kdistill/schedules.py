"""Schedules as plain callables, and temperature schedulers that look at the logits.

A :data:`Schedule` is any callable ``(step, total_steps) -> float``: ``step`` counts optimizer steps from 0 and
``total_steps`` (>= 1) is the length of the run. Loss weights and temperatures follow one. The builders
(:func:`constant`, :func:`linear`, :func:`cosine`, :func:`step`) are registered in :data:`SCHEDULES`, and
:func:`make_schedule` turns a config value into a schedule::

    make_schedule(0.5)                                       # constant 0.5
    make_schedule({"name": "linear", "start": 1.0, "end": 0.0})
    make_schedule({"name": "step", "values": [1.0, 0.5], "boundaries": [1000]})

Per-position temperatures (TextBrewer's ``flsw`` and ``cwsm``) depend on the logits: :func:`flsw` and
:func:`cwsm` build a :data:`LogitsTemperature`, ``(student_logits, teacher_logits, base_temperature) -> (...)``,
registered in :data:`TEMPERATURE_SCHEDULES`. :func:`make_temperature_schedule` turns any temperature config into a
:class:`TemperatureSchedule`, which the objective calls with the step and, for those, the logits.

This module imports torch only (no transformers).
"""

from __future__ import annotations

import bisect
import difflib
import inspect
import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from kdistill.errors import InvalidArgumentError, ShapeMismatchError, UnknownNameError
from kdistill.registry import Registry

Schedule = Callable[[int, int], float]
LogitsTemperature = Callable[..., torch.Tensor]  # (student_logits, teacher_logits, base_temperature, mask=None)

MIN_TEMPERATURE = 1e-2  # floor of per-position temperatures: flsw/cwsm can push base + (mean - w)·β below 0

# ---------------------------------------------------------------- validation


def _number(schedule: str, parameter: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidArgumentError(f"{schedule} schedule: {parameter} must be a finite number, got {value!r}")
    return float(value)


def _count(schedule: str, parameter: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise InvalidArgumentError(f"{schedule} schedule: {parameter} must be an integer >= 0, got {value!r}")
    return int(value)


def _check_steps(step: int, total_steps: int) -> None:
    if step < 0:
        raise InvalidArgumentError(f"schedule step must be >= 0, got {step}")
    if total_steps < 1:
        raise InvalidArgumentError(f"schedule total_steps must be >= 1, got {total_steps}")


# ---------------------------------------------------------------- step schedules


def _constant_value(step: int, total_steps: int, *, value: float) -> float:
    return value


def _linear_value(step: int, total_steps: int, *, start: float, end: float, warmup_steps: int) -> float:
    _check_steps(step, total_steps)
    if step < warmup_steps:
        return start
    span = total_steps - warmup_steps
    progress = 1.0 if span <= 0 else min((step - warmup_steps) / span, 1.0)
    return start + (end - start) * progress


def _cosine_value(step: int, total_steps: int, *, start: float, end: float) -> float:
    _check_steps(step, total_steps)
    progress = min(step / total_steps, 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _step_value(step: int, total_steps: int, *, values: tuple[float, ...], boundaries: tuple[int, ...]) -> float:
    _check_steps(step, total_steps)
    return values[bisect.bisect_right(boundaries, step)]


def constant(value: float) -> Schedule:
    """``value`` at every step."""
    return partial(_constant_value, value=_number("constant", "value", value))


def linear(start: float, end: float, warmup_steps: int = 0) -> Schedule:
    """``start`` for the first ``warmup_steps`` steps, then linear to ``end``, reached at ``total_steps`` and kept.

    Value at ``step``: ``start + (end - start) · clamp((step - warmup_steps) / (total_steps - warmup_steps), 0, 1)``.
    """
    return partial(
        _linear_value,
        start=_number("linear", "start", start),
        end=_number("linear", "end", end),
        warmup_steps=_count("linear", "warmup_steps", warmup_steps),
    )


def cosine(start: float, end: float) -> Schedule:
    """Half a cosine from ``start`` (step 0) to ``end`` (``total_steps`` and after).

    Value at ``step``: ``end + (start - end) · (1 + cos(π · min(step / total_steps, 1))) / 2``.
    """
    return partial(_cosine_value, start=_number("cosine", "start", start), end=_number("cosine", "end", end))


def step(values: Sequence[float], boundaries: Sequence[int]) -> Schedule:
    """Piecewise constant: ``values[0]`` before ``boundaries[0]``, ``values[i]`` from ``boundaries[i - 1]`` on.

    ``boundaries`` are the steps at which the value changes (strictly increasing); ``len(values)`` must be
    ``len(boundaries) + 1``.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise InvalidArgumentError(f"step schedule: values must be a non-empty list of numbers, got {values!r}")
    if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
        raise InvalidArgumentError(f"step schedule: boundaries must be a list of steps, got {boundaries!r}")
    checked_values = tuple(_number("step", f"values[{i}]", value) for i, value in enumerate(values))
    checked_boundaries = tuple(_count("step", f"boundaries[{i}]", value) for i, value in enumerate(boundaries))
    if len(checked_values) != len(checked_boundaries) + 1:
        raise InvalidArgumentError(
            f"step schedule: values must have one entry more than boundaries, got {len(checked_values)} values "
            f"and {len(checked_boundaries)} boundaries"
        )
    if any(later <= earlier for earlier, later in itertools.pairwise(checked_boundaries)):
        raise InvalidArgumentError(f"step schedule: boundaries must be strictly increasing, got {list(boundaries)}")
    return partial(_step_value, values=checked_values, boundaries=checked_boundaries)


SCHEDULES: Registry[Callable[..., Schedule]] = Registry("schedule")
SCHEDULES.register("constant", constant)
SCHEDULES.register("linear", linear)
SCHEDULES.register("cosine", cosine)
SCHEDULES.register("step", step, aliases=("piecewise",))


def _build(family: str, name: str, builder: Callable[..., Any], parameters: Mapping[str, Any]) -> Any:
    """Call ``builder(**parameters)``, turning a missing or unexpected parameter into a sentence naming it."""
    signature = inspect.signature(builder)
    try:
        signature.bind(**parameters)
    except TypeError:
        accepted = list(signature.parameters)
        unexpected = [key for key in parameters if key not in signature.parameters]
        if unexpected and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            raise InvalidArgumentError(
                f"{family} {name!r} has no parameter {unexpected[0]!r}; its parameters are {', '.join(accepted)}"
            ) from None
        missing = [
            p.name
            for p in signature.parameters.values()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in parameters
        ]
        raise InvalidArgumentError(
            f"{family} {name!r} needs parameter {missing[0] if missing else '?'!r}; its parameters are "
            f"{', '.join(accepted)}"
        ) from None
    return builder(**parameters)


def _name_and_parameters(spec: Mapping[str, Any], what: str) -> tuple[str, dict[str, Any]]:
    parameters = dict(spec)
    name = parameters.pop("name", None)
    if not isinstance(name, str):
        raise InvalidArgumentError(f"a {what} given as a mapping needs a 'name' string, got {spec!r}")
    return name, parameters


def make_schedule(spec: float | Schedule | Mapping[str, Any] | str) -> Schedule:
    """A schedule from a config value: a number (constant), a callable (kept), or ``{"name": ..., **parameters}``.

    Raises:
        UnknownNameError: the name is not in :data:`SCHEDULES`.
        InvalidArgumentError: a parameter is missing, unexpected or out of range (naming schedule and parameter).
    """
    if isinstance(spec, bool):
        raise InvalidArgumentError(f"a schedule must be a number, a callable or a mapping with a 'name', got {spec!r}")
    if isinstance(spec, numbers.Real):
        return constant(spec)
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, Mapping):
        name, parameters = _name_and_parameters(spec, "schedule")
        return _build("schedule", name, SCHEDULES.get(name), parameters)
    if callable(spec):
        return spec
    raise InvalidArgumentError(f"a schedule must be a number, a callable or a mapping with a 'name', got {spec!r}")


# ---------------------------------------------------------------- temperatures from the logits


def _check_temperature_inputs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    base_temperature: float,
    mask: torch.Tensor | None,
    need_teacher: bool,
) -> None:
    if not isinstance(base_temperature, numbers.Real) or not base_temperature > 0:
        raise InvalidArgumentError(f"base_temperature must be a number > 0, got {base_temperature!r}")
    if need_teacher and (teacher_logits is None or teacher_logits.shape != student_logits.shape):
        got = None if teacher_logits is None else tuple(teacher_logits.shape)
        raise ShapeMismatchError(
            f"flsw needs student and teacher logits of one shape, got {tuple(student_logits.shape)} and {got}"
        )
    if mask is not None and tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise ShapeMismatchError(
            f"mask has shape {tuple(mask.shape)} but logits {tuple(student_logits.shape)} need "
            f"{tuple(student_logits.shape[:-1])}"
        )


def _spread(
    weights: torch.Tensor, base_temperature: float, beta: float, mask: torch.Tensor | None, floor: float
) -> torch.Tensor:
    """``base + (mean(w) - w)·β`` per position, the mean over counted positions, floored at ``floor``."""
    counted = weights if mask is None else weights[mask.to(torch.bool)]
    mean = counted.mean() if counted.numel() else weights.new_zeros(())
    return (base_temperature + (mean - weights) * beta).clamp_min(floor)


def _float(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.detach()
    return logits if logits.dtype == torch.float64 else logits.float()


def _flsw_temperature(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    base_temperature: float,
    mask: torch.Tensor | None = None,
    *,
    beta: float,
    gamma: float,
    eps: float,
    min_temperature: float,
) -> torch.Tensor:
    _check_temperature_inputs(student_logits, teacher_logits, base_temperature, mask, need_teacher=True)
    with torch.no_grad():
        student = _float(student_logits)  # (..., V)
        teacher = _float(teacher_logits)  # (..., V)
        student = student / (student.norm(dim=-1, keepdim=True) + eps)
        teacher = teacher / (teacher.norm(dim=-1, keepdim=True) + eps)
        weights = (1.0 - (student * teacher).sum(dim=-1)).clamp_min(0.0).pow(gamma)  # (...)
        return _spread(weights, base_temperature, beta, mask, min_temperature)


def _cwsm_temperature(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    base_temperature: float,
    mask: torch.Tensor | None = None,
    *,
    beta: float,
    min_temperature: float,
) -> torch.Tensor:
    _check_temperature_inputs(student_logits, teacher_logits, base_temperature, mask, need_teacher=False)
    with torch.no_grad():
        probs = torch.softmax(_float(student_logits), dim=-1)  # (..., V)
        weights = 1.0 / (probs.amax(dim=-1) + 1e-3)  # (...)
        return _spread(weights, base_temperature, beta, mask, min_temperature)


def flsw(beta: float, gamma: float, eps: float = 1e-4, min_temperature: float = MIN_TEMPERATURE) -> LogitsTemperature:
    """Focal-loss-style weighting of the temperature (TextBrewer's ``flsw``): harder positions get a lower τ.

    The returned callable ``(student_logits (..., V), teacher_logits (..., V), base_temperature, mask=None)``
    computes, under ``no_grad`` and in float32 at least, ``v = s/(‖s‖ + eps)``, ``t = t/(‖t‖ + eps)``,
    ``w = (1 - Σ v·t)^γ`` and returns ``τ = base + (mean(w) - w)·β`` of shape ``(...)``, the mean over the
    positions ``mask`` counts (all when None), floored at ``min_temperature`` so that τ stays > 0.
    """
    return partial(
        _flsw_temperature,
        beta=_number("flsw", "beta", beta),
        gamma=_positive("flsw", "gamma", gamma),
        eps=_positive("flsw", "eps", eps),
        min_temperature=_positive("flsw", "min_temperature", min_temperature),
    )


def cwsm(beta: float, min_temperature: float = MIN_TEMPERATURE) -> LogitsTemperature:
    """Confidence-weighted temperature (TextBrewer's ``cwsm``): confident student positions get a higher τ.

    The returned callable ``(student_logits (..., V), teacher_logits, base_temperature, mask=None)`` computes,
    under ``no_grad``, ``v = softmax(s)``, ``w = 1/(max(v) + 1e-3)`` and returns ``τ = base + (mean(w) - w)·β`` of
    shape ``(...)``, the mean over counted positions, floored at ``min_temperature``. The teacher's logits are
    accepted for a uniform signature and not used.
    """
    return partial(
        _cwsm_temperature,
        beta=_number("cwsm", "beta", beta),
        min_temperature=_positive("cwsm", "min_temperature", min_temperature),
    )


def _positive(schedule: str, parameter: str, value: object) -> float:
    number = _number(schedule, parameter, value)
    if number <= 0:
        raise InvalidArgumentError(f"{schedule} schedule: {parameter} must be > 0, got {value!r}")
    return number


TEMPERATURE_SCHEDULES: Registry[Callable[..., LogitsTemperature]] = Registry("temperature schedule")
TEMPERATURE_SCHEDULES.register("flsw", flsw)
TEMPERATURE_SCHEDULES.register("cwsm", cwsm)


@dataclass(frozen=True)
class TemperatureSchedule:
    """A temperature over training: a base schedule, optionally spread per position by a logits scheduler.

    Attributes:
        base: the (base) temperature at a step, ``(step, total_steps) -> float``; must stay > 0.
        per_position: a :data:`LogitsTemperature` (``flsw``, ``cwsm``) or None for one temperature per step.
    """

    base: Schedule
    per_position: LogitsTemperature | None = None

    def __call__(
        self,
        step: int,
        total_steps: int,
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> float | torch.Tensor:
        """The temperature at ``step``: a float, or with a per-position scheduler a tensor ``(...)`` of the logits'
        leading shape (divide logits by ``τ.unsqueeze(-1)``, or pass it as the losses' ``temperature``)."""
        base = float(self.base(step, total_steps))
        if not math.isfinite(base) or base <= 0:
            raise InvalidArgumentError(f"temperature must be a finite number > 0, got {base} at step {step}")
        if self.per_position is None:
            return base
        if student_logits is None:
            raise InvalidArgumentError("this temperature schedule depends on the logits; pass student_logits")
        return self.per_position(student_logits, teacher_logits, base, mask)


def make_temperature_schedule(spec: float | Schedule | Mapping[str, Any] | TemperatureSchedule) -> TemperatureSchedule:
    """A :class:`TemperatureSchedule` from a config value.

    Accepted: a number (constant temperature); a callable ``(step, total_steps) -> float``; a
    :class:`TemperatureSchedule`; ``{"name": "flsw" | "cwsm", <its parameters>, "base_temperature": <schedule
    spec, default 1.0>}``; or a plain schedule mapping (``{"name": "linear", "start": 4.0, "end": 1.0}``), which
    schedules the temperature itself.

    Raises:
        UnknownNameError: the name is neither a temperature scheduler nor a schedule (both lists are given).
        InvalidArgumentError: a parameter is missing, unexpected or out of range.
    """
    if isinstance(spec, TemperatureSchedule):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, Mapping):
        name, parameters = _name_and_parameters(spec, "temperature schedule")
        if name in TEMPERATURE_SCHEDULES:
            base = make_schedule(parameters.pop("base_temperature", 1.0))
            per_position = _build("temperature schedule", name, TEMPERATURE_SCHEDULES.get(name), parameters)
            return TemperatureSchedule(base=base, per_position=per_position)
        if name not in SCHEDULES:
            known = TEMPERATURE_SCHEDULES.names(include_aliases=True) + SCHEDULES.names(include_aliases=True)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UnknownNameError(
                f"unknown temperature schedule {name!r}; {hint}known: {', '.join(known)} (the last "
                f"{len(SCHEDULES.names(include_aliases=True))} schedule the temperature itself)"
            )
    return TemperatureSchedule(base=make_schedule(spec))
