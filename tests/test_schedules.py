"""Schedules against closed forms written here; flsw/cwsm against float64 references computed position by position."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from kdistill.errors import InvalidArgumentError, ShapeMismatchError, UnknownNameError
from kdistill.schedules import (
    MIN_TEMPERATURE,
    SCHEDULES,
    TEMPERATURE_SCHEDULES,
    TemperatureSchedule,
    constant,
    cosine,
    cwsm,
    flsw,
    linear,
    make_schedule,
    make_temperature_schedule,
    step,
)

# ---------------------------------------------------------------- step schedules


def test_constant_is_the_value_everywhere():
    schedule = constant(0.3)
    assert [schedule(k, 100) for k in (0, 1, 50, 99, 100, 500)] == [0.3] * 6


def test_linear_start_mid_end_and_after():
    schedule = linear(1.0, 0.0)
    assert schedule(0, 100) == 1.0
    assert schedule(25, 100) == pytest.approx(0.75)
    assert schedule(50, 100) == pytest.approx(0.5)
    assert schedule(100, 100) == 0.0
    assert schedule(130, 100) == 0.0  # kept at the end value
    rising = linear(2.0, 6.0)
    assert rising(30, 40) == pytest.approx(2.0 + 4.0 * 30 / 40)


def test_linear_holds_start_during_warmup():
    schedule = linear(4.0, 1.0, warmup_steps=20)
    assert [schedule(k, 100) for k in (0, 10, 20)] == [4.0, 4.0, 4.0]
    assert schedule(60, 100) == pytest.approx(4.0 + (1.0 - 4.0) * (60 - 20) / (100 - 20))
    assert schedule(100, 100) == pytest.approx(1.0)
    assert linear(4.0, 1.0, warmup_steps=200)(150, 100) == 4.0  # warmup longer than the run
    assert linear(4.0, 1.0, warmup_steps=200)(250, 100) == 1.0


def test_cosine_start_quarter_mid_end():
    schedule = cosine(1.0, 0.0)
    assert schedule(0, 100) == pytest.approx(1.0)
    assert schedule(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert schedule(50, 100) == pytest.approx(0.5)
    assert schedule(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert schedule(150, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine(1.0, 3.0)(75, 100) == pytest.approx(3.0 + (1.0 - 3.0) * 0.5 * (1 + math.cos(0.75 * math.pi)))


def test_step_changes_value_at_each_boundary():
    schedule = step([1.0, 0.5, 0.1], [10, 20])
    values = {k: schedule(k, 100) for k in (0, 9, 10, 11, 19, 20, 99)}
    assert values == {0: 1.0, 9: 1.0, 10: 0.5, 11: 0.5, 19: 0.5, 20: 0.1, 99: 0.1}
    assert step([7.0], [])(5, 10) == 7.0


@pytest.mark.parametrize(
    ("values", "boundaries", "match"),
    [
        ([1.0, 0.5], [10, 20], "one entry more"),
        ([1.0, 0.5, 0.1], [20, 10], "strictly increasing"),
        ([1.0, 0.5, 0.1], [10, 10], "strictly increasing"),
        ([1.0, 0.5], [-1], r"boundaries\[0\]"),
        ([1.0, "x"], [3], r"values\[1\]"),
        ([], [], "non-empty"),
    ],
)
def test_step_rejects_bad_lists(values, boundaries, match):
    with pytest.raises(InvalidArgumentError, match=match):
        step(values, boundaries)


def test_schedules_reject_bad_steps_and_values():
    with pytest.raises(InvalidArgumentError, match="total_steps"):
        linear(1.0, 0.0)(0, 0)
    with pytest.raises(InvalidArgumentError, match="step"):
        cosine(1.0, 0.0)(-1, 10)
    with pytest.raises(InvalidArgumentError, match="linear schedule: end"):
        linear(1.0, float("nan"))
    with pytest.raises(InvalidArgumentError, match="warmup_steps"):
        linear(1.0, 0.0, warmup_steps=-3)


# ---------------------------------------------------------------- make_schedule


def test_registry_holds_the_builders():
    assert set(SCHEDULES) == {"constant", "linear", "cosine", "step"}
    assert set(TEMPERATURE_SCHEDULES) == {"flsw", "cwsm"}


def test_make_schedule_from_each_kind_of_spec():
    assert make_schedule(0.25)(7, 10) == 0.25
    assert make_schedule(3)(7, 10) == 3.0

    def custom(step_: int, total: int) -> float:
        return step_ / total

    assert make_schedule(custom) is custom
    assert make_schedule({"name": "linear", "start": 1.0, "end": 0.0})(50, 100) == pytest.approx(0.5)
    warm = make_schedule({"name": "linear", "start": 1.0, "end": 0.0, "warmup_steps": 50})
    assert warm(75, 100) == pytest.approx(0.5)
    assert make_schedule({"name": "cosine", "start": 2.0, "end": 0.0})(50, 100) == pytest.approx(1.0)
    assert make_schedule({"name": "step", "values": [1, 2], "boundaries": [5]})(5, 10) == 2.0
    assert make_schedule({"name": "piecewise", "values": [1, 2], "boundaries": [5]})(4, 10) == 1.0
    assert make_schedule({"name": "constant", "value": 0.5})(0, 1) == 0.5


def test_make_schedule_bad_specs_raise_named_errors():
    with pytest.raises(UnknownNameError, match="did you mean 'linear'"):
        make_schedule({"name": "linaer", "start": 1.0, "end": 0.0})
    with pytest.raises(InvalidArgumentError, match="'linear' needs parameter 'end'"):
        make_schedule({"name": "linear", "start": 1.0})
    with pytest.raises(InvalidArgumentError, match="'cosine' has no parameter 'warmup'"):
        make_schedule({"name": "cosine", "start": 1.0, "end": 0.0, "warmup": 3})
    with pytest.raises(InvalidArgumentError, match="linear schedule: start"):
        make_schedule({"name": "linear", "start": "high", "end": 0.0})
    with pytest.raises(InvalidArgumentError, match="'name'"):
        make_schedule({"start": 1.0, "end": 0.0})
    with pytest.raises(InvalidArgumentError, match="number, a callable"):
        make_schedule(True)
    with pytest.raises(InvalidArgumentError, match="number, a callable"):
        make_schedule([1.0, 2.0])


def test_user_registered_schedule_is_found_by_name():
    def exponential(start: float, rate: float):
        return lambda step_, total: start * rate**step_

    SCHEDULES.register("test_exponential", exponential)
    try:
        assert make_schedule({"name": "test_exponential", "start": 2.0, "rate": 0.5})(3, 10) == 0.25
    finally:
        SCHEDULES._drop("test_exponential")


# ---------------------------------------------------------------- flsw and cwsm


def _logits(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3


def _flsw_reference(student, teacher, base, beta, gamma, eps, mask=None) -> torch.Tensor:
    """τ per position with explicit loops in float64: v = s/(|s|+eps), t = t/(|t|+eps), w = (1 - v·t)^γ."""
    s_rows = student.reshape(-1, student.shape[-1]).tolist()
    t_rows = teacher.reshape(-1, teacher.shape[-1]).tolist()
    weights = []
    for s_row, t_row in zip(s_rows, t_rows, strict=True):
        s_norm = math.sqrt(sum(x * x for x in s_row)) + eps
        t_norm = math.sqrt(sum(x * x for x in t_row)) + eps
        dot = sum((a / s_norm) * (b / t_norm) for a, b in zip(s_row, t_row, strict=True))
        weights.append((1.0 - dot) ** gamma)
    return _spread_reference(weights, base, beta, mask, student.shape[:-1])


def _cwsm_reference(student, base, beta, mask=None) -> torch.Tensor:
    """τ per position with explicit loops in float64: w = 1/(max softmax(s) + 1e-3)."""
    weights = []
    for row in student.reshape(-1, student.shape[-1]).tolist():
        top = max(row)
        total = sum(math.exp(x - top) for x in row)
        weights.append(1.0 / (1.0 / total + 1e-3))  # max of the softmax is exp(0)/total
    return _spread_reference(weights, base, beta, mask, student.shape[:-1])


def _spread_reference(weights, base, beta, mask, shape) -> torch.Tensor:
    counted = weights if mask is None else [w for w, m in zip(weights, mask.reshape(-1).tolist(), strict=True) if m]
    mean = sum(counted) / len(counted)
    return torch.tensor([base + (mean - w) * beta for w in weights], dtype=torch.float64).reshape(shape)


@pytest.mark.parametrize(("beta", "gamma"), [(1.0, 1.0), (0.5, 2.0), (2.0, 0.5)])
def test_flsw_matches_the_float64_reference(beta, gamma):
    student, teacher = _logits(0, (3, 5, 11)), _logits(1, (3, 5, 11))
    temperature = flsw(beta, gamma)(student, teacher, 2.0)
    expected = _flsw_reference(student, teacher, 2.0, beta, gamma, 1e-4)
    assert temperature.shape == (3, 5)
    assert temperature.dtype == torch.float64
    torch.testing.assert_close(temperature, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_cwsm_matches_the_float64_reference(beta):
    student = _logits(2, (4, 6, 9))
    temperature = cwsm(beta)(student, None, 3.0)
    torch.testing.assert_close(temperature, _cwsm_reference(student, 3.0, beta), rtol=1e-10, atol=1e-10)


def test_the_mean_runs_over_counted_positions_only():
    student, teacher = _logits(3, (2, 6, 7)), _logits(4, (2, 6, 7))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(
        flsw(1.0, 1.0)(student, teacher, 2.0, mask), _flsw_reference(student, teacher, 2.0, 1.0, 1.0, 1e-4, mask)
    )
    torch.testing.assert_close(cwsm(0.5)(student, teacher, 2.0, mask), _cwsm_reference(student, 2.0, 0.5, mask))


def test_float32_logits_give_float32_temperatures_close_to_the_reference():
    student, teacher = _logits(5, (8, 13)), _logits(6, (8, 13))
    temperature = flsw(1.0, 2.0)(student.float(), teacher.float(), 1.5)
    assert temperature.dtype == torch.float32
    torch.testing.assert_close(temperature.double(), _flsw_reference(student, teacher, 1.5, 1.0, 2.0, 1e-4))


def test_temperatures_stay_positive_and_carry_no_graph():
    student = _logits(7, (16, 10)).requires_grad_()
    teacher = _logits(8, (16, 10))
    for scheduler in (flsw(50.0, 1.0), cwsm(50.0)):  # a huge β pushes some positions far below 0
        temperature = scheduler(student, teacher, 0.5)
        assert not temperature.requires_grad
        assert (temperature > 0).all()
        assert temperature.min() == MIN_TEMPERATURE
    custom_floor = cwsm(50.0, min_temperature=0.2)(student, teacher, 0.5)
    assert custom_floor.min() == 0.2
    raw = _cwsm_reference(student.detach(), 0.5, 50.0)
    unclamped = raw > 0.2
    torch.testing.assert_close(custom_floor[unclamped], raw[unclamped])


def test_temperature_schedulers_reject_bad_inputs():
    student = _logits(9, (2, 3, 5))
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3, 5\) and \(2, 3, 4\)"):
        flsw(1.0, 1.0)(student, _logits(9, (2, 3, 4)), 1.0)
    with pytest.raises(ShapeMismatchError, match="mask"):
        cwsm(1.0)(student, None, 1.0, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(InvalidArgumentError, match="base_temperature"):
        cwsm(1.0)(student, None, 0.0)
    with pytest.raises(InvalidArgumentError, match="flsw schedule: gamma"):
        flsw(1.0, 0.0)


# ---------------------------------------------------------------- make_temperature_schedule


def test_make_temperature_schedule_from_a_number_or_a_plain_schedule():
    fixed = make_temperature_schedule(4.0)
    assert isinstance(fixed, TemperatureSchedule) and fixed.per_position is None
    assert fixed(10, 100) == 4.0
    annealed = make_temperature_schedule({"name": "linear", "start": 4.0, "end": 1.0})
    assert annealed(50, 100) == pytest.approx(2.5)
    stepped = make_temperature_schedule({"name": "step", "values": [4.0, 2.0], "boundaries": [10]})
    assert (stepped(9, 20), stepped(10, 20)) == (4.0, 2.0)
    assert make_temperature_schedule(fixed) is fixed


def test_make_temperature_schedule_with_a_logits_scheduler():
    student, teacher = _logits(10, (2, 4, 6)), _logits(11, (2, 4, 6))
    schedule = make_temperature_schedule({"name": "flsw", "beta": 1.0, "gamma": 2.0, "base_temperature": 3.0})
    torch.testing.assert_close(
        schedule(0, 10, student, teacher), _flsw_reference(student, teacher, 3.0, 1.0, 2.0, 1e-4)
    )
    annealed = make_temperature_schedule(
        {"name": "cwsm", "beta": 0.5, "base_temperature": {"name": "linear", "start": 4.0, "end": 2.0}}
    )
    torch.testing.assert_close(annealed(5, 10, student, teacher), _cwsm_reference(student, 3.0, 0.5))
    with pytest.raises(InvalidArgumentError, match="student_logits"):
        schedule(0, 10)


def test_make_temperature_schedule_bad_specs():
    with pytest.raises(UnknownNameError, match="did you mean 'flsw'") as info:
        make_temperature_schedule({"name": "flws", "beta": 1.0, "gamma": 1.0})
    assert "cwsm" in str(info.value) and "linear" in str(info.value)
    with pytest.raises(InvalidArgumentError, match="'flsw' needs parameter 'gamma'"):
        make_temperature_schedule({"name": "flsw", "beta": 1.0})
    with pytest.raises(InvalidArgumentError, match="temperature must be a finite number > 0"):
        make_temperature_schedule({"name": "linear", "start": 1.0, "end": 0.0})(10, 10)


def test_schedules_import_no_transformers():
    code = (
        "import sys, kdistill.schedules; print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
