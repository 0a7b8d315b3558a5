"""Latency, throughput, parameter counts and sizes on disk, with models whose cost and state the tests control."""

from __future__ import annotations

import os
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdistill.errors import InvalidArgumentError
from kdistill.eval.speed import (
    count_parameters,
    cpu_contention,
    measure_latencies,
    measure_latency,
    measure_throughput,
    prepare_inputs,
    ratio_spread,
    size_on_disk,
    watching_cpu,
)


class SleepyModel(nn.Module):
    """Sleeps ``delay`` seconds per forward and records how it was called."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.delay = delay
        self.calls: list[dict] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append(
            {
                "grad": torch.is_grad_enabled(),
                "training": self.training,
                "threads": torch.get_num_threads(),
                "batch": input_ids.shape[0],
            }
        )
        time.sleep(self.delay)
        return self.linear(input_ids.float())


def _batch(size: int = 4) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.ones(size, 3), "attention_mask": torch.ones(size, 3), "labels": torch.zeros(size)}


def test_measure_latency_times_each_forward_in_eval_mode_without_grad():
    model = SleepyModel(delay=0.01).train()
    threads = torch.get_num_threads()
    latency = measure_latency(model, _batch(), warmup=2, repeats=5, threads=1)
    assert set(latency) >= {"p50_ms", "p90_ms", "mean_ms"}
    assert 10.0 <= latency["min_ms"] <= latency["p50_ms"] <= latency["p90_ms"]
    assert latency["mean_ms"] >= 10.0
    assert len(model.calls) == 2 + 5  # warm-up + timed; labels were filtered out of the call
    assert all(not c["grad"] and not c["training"] and c["threads"] == 1 for c in model.calls)
    assert model.training and torch.get_num_threads() == threads  # restored


def test_measure_latency_percentiles_interpolate_like_numpy(monkeypatch):
    model = SleepyModel()
    ticks = iter([0.0, 0.001, 1.0, 1.002, 2.0, 2.003, 3.0, 3.004, 4.0, 4.010])  # forwards of 1, 2, 3, 4, 10 ms
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    latency = measure_latency(model, _batch(), warmup=0, repeats=5)
    assert latency["p50_ms"] == pytest.approx(3.0)
    assert latency["p90_ms"] == pytest.approx(4.0 + 0.6 * 6.0)  # rank 3.6 between 4 and 10
    assert latency["mean_ms"] == pytest.approx(4.0)


def test_measure_throughput_counts_examples_per_second():
    model = SleepyModel(delay=0.01)
    batches = [_batch(4), _batch(4), _batch(2)]
    throughput = measure_throughput(model, batches, warmup=1)
    assert 0 < throughput <= 10 / 0.03  # 10 examples in at least 30 ms
    assert [c["batch"] for c in model.calls] == [4, 4, 4, 2]  # one warm-up of the first batch, then each once


def test_speed_argument_errors():
    model = SleepyModel()
    with pytest.raises(InvalidArgumentError, match="repeats must be an integer >= 1"):
        measure_latency(model, _batch(), repeats=0)
    with pytest.raises(InvalidArgumentError, match="threads"):
        measure_latency(model, _batch(), threads=0)
    with pytest.raises(InvalidArgumentError, match="at least one batch"):
        measure_throughput(model, [])


def test_prepare_inputs_drops_what_forward_does_not_take():
    assert sorted(prepare_inputs(SleepyModel(), {**_batch(), "task": "x"})) == ["attention_mask", "input_ids"]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: one (10, 4) tensor


def test_count_parameters_counts_shared_tensors_once():
    assert count_parameters(nn.Linear(3, 4)) == 3 * 4 + 4
    assert count_parameters(Tied()) == 40
    frozen = nn.Linear(3, 4).requires_grad_(False)
    assert count_parameters(frozen) == 16


def test_size_on_disk_of_a_directory_and_a_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 23)
    assert size_on_disk(tmp_path) == 123
    assert size_on_disk(str(tmp_path / "a.bin")) == 100
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        size_on_disk(tmp_path / "missing")
    with pytest.raises(InvalidArgumentError, match="neither"):
        size_on_disk()


def test_size_on_disk_of_a_model_state_is_its_safetensors_file(tmp_path):
    from safetensors.torch import save_model

    linear = nn.Linear(3, 4)  # 16 float32 = 64 bytes of data plus the header
    size = size_on_disk(model=linear)
    save_model(linear, str(tmp_path / "linear.safetensors"))
    assert size == (tmp_path / "linear.safetensors").stat().st_size
    assert 64 < size < 64 + 512
    tied = size_on_disk(model=Tied())
    assert 160 < tied < 160 + 512  # the shared (10, 4) tensor is stored once
    save_model(Tied(), str(tmp_path / "tied.safetensors"))
    assert len(load_file(str(tmp_path / "tied.safetensors"))) == 1


class OrderedModel(SleepyModel):
    """A SleepyModel that also writes its name into a shared log at each forward."""

    def __init__(self, name: str, log: list[str], delay: float) -> None:
        super().__init__(delay)
        self.name, self.log = name, log

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.log.append(self.name)
        return super().forward(input_ids, attention_mask)


def test_measure_latencies_interleaves_rotating_rounds_and_reports_the_spread():
    log: list[str] = []
    slow, fast = OrderedModel("slow", log, 0.004), OrderedModel("fast", log, 0.001)
    stats, rounds = measure_latencies(
        {"slow": (slow, _batch()), "fast": (fast, _batch())}, warmup=1, min_repeats=6, max_repeats=8, budget_s=0.0
    )
    assert len(rounds) == 6 and stats["slow"]["repeats"] == 6.0  # the budget spent: the minimum
    timed = log[2:]  # after one warm-up forward each
    assert timed[:4] == ["slow", "fast", "fast", "slow"]  # each round one forward of each, the order rotating
    assert all(not call["grad"] and not call["training"] for call in slow.calls)
    assert stats["slow"]["p50_ms"] > stats["fast"]["p50_ms"] and stats["slow"]["iqr_pct"] >= 0.0
    spread = ratio_spread(rounds, "slow", "fast")
    assert spread["p25"] <= spread["p50"] <= spread["p75"]
    assert 1.5 < spread["p50"] < 10  # 4 ms against 1 ms, measured on each round's own pair
    stats, rounds = measure_latencies({"a": (fast, _batch())}, warmup=0, min_repeats=2, max_repeats=5, budget_s=60)
    assert len(rounds) == 5  # within the budget: up to max_repeats
    with pytest.raises(InvalidArgumentError, match="max_repeats must be an integer >= 3"):
        measure_latencies({"a": (fast, _batch())}, min_repeats=3, max_repeats=2)


def test_a_busy_cpu_is_measured_and_named_in_a_warning():
    import subprocess
    import sys

    with watching_cpu() as quiet:
        time.sleep(0.3)
    assert 0.0 <= quiet["others_share"] <= 1.0
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        with watching_cpu() as busy:
            time.sleep(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    cores = os.cpu_count() or 1
    assert busy["others_share"] >= 0.8 / cores - 0.1  # one spinning process: about one core's worth
    warning = cpu_contention(busy["others_share"], limit=0.5 / cores)
    assert warning is not None and f"of the {cores} CPU cores while the models were timed" in warning
    assert cpu_contention(0.05) is None and cpu_contention(None) is None
