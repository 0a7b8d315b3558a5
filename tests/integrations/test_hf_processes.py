"""DistillationTrainer on two data-parallel CPU processes (gloo) equals one process with the whole batch.

The loss divides by the counted next-token positions of the whole optimizer step over *all* processes and is
multiplied by the number of processes (DDP averages gradients), so the summed gradient does not depend on how the
batch is split. The examples give the two ranks different numbers of counted positions in each step, so a
per-process mean (``average_tokens_across_devices=False``) weights their tokens differently: that run is the
control showing the comparison is sensitive enough to catch it.

The runs use SGD at a constant learning rate without clipping, so every update is the learning rate times the
gradient. The dataset has exactly 8 examples: 1 process × batch 8 and 2 processes × batch 4 both see the whole
dataset in every optimizer step (one epoch per step), whatever order the seeded sampler draws, and the order inside
a step does not change the summed gradient.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parent / "hf_train_script.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
STEPS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(out: Path, *script_args: str, processes: int) -> dict[str, Any]:
    """Run the script on ``processes`` CPU processes; return rank 0's weights, record and the initial weights."""
    command = [str(SCRIPT), str(out), "--max-steps", str(STEPS), *script_args]
    env = ENV
    if processes > 1:
        launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        command = [*launch, "--main_process_port", str(_free_port()), *command]
        env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(processes)]
    assert all(record["num_processes"] == processes for record in records)
    return {
        "initial": load_file(str(out / "initial.safetensors")),
        "weights": [load_file(str(out / f"rank-{r}.safetensors")) for r in range(processes)],
        "records": records,
        "logs": [entry for entry in records[0]["log_history"] if "loss" in entry],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("hf-processes")
    return {
        "single": _run(root / "single", "--batch-size", "8", processes=1),
        "ddp": _run(root / "ddp", "--batch-size", "4", processes=2),
        "per_process_mean": _run(root / "local", "--batch-size", "4", "--no-average-tokens", processes=2),
    }


def _update_error(run: dict[str, Any], reference: dict[str, Any]) -> tuple[float, float]:
    """The largest difference of ``run``'s rank-0 update from ``reference``'s, and the largest reference update.

    Measured against the largest update, not per tensor: a small tensor's update can be below the float32 spacing
    of its parameters.
    """
    initial, expected, got = reference["initial"], reference["weights"][0], run["weights"][0]
    assert got.keys() == expected.keys()
    scale = max(float((expected[k] - initial[k]).abs().max()) for k in expected)
    error = max(float(((got[k] - initial[k]) - (expected[k] - initial[k])).abs().max()) for k in expected)
    return error, scale


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_whole_batch(runs: dict[str, dict[str, Any]]) -> None:
    single, ddp = runs["single"], runs["ddp"]
    assert all(torch.equal(single["initial"][k], ddp["initial"][k]) for k in single["initial"])
    # the two ranks count different numbers of positions in every step; together they count the whole batch
    for step in range(STEPS):
        local = [record["counts"][step]["local"] for record in ddp["records"]]
        total = single["records"][0]["counts"][step]["global"]
        assert local[0] != local[1], local
        assert sum(local) == total
        assert all(record["counts"][step]["global"] == total for record in ddp["records"])
    # DDP leaves both ranks with the same student
    rank0, rank1 = ddp["weights"]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    error, scale = _update_error(ddp, single)
    assert scale > 1e-3
    assert error <= 1e-5 * scale, (error, scale)
    # the logged loss (and its terms, and the gradient norm) are those of the whole batch
    assert len(ddp["logs"]) == len(single["logs"]) == STEPS
    for got, expected in zip(ddp["logs"], single["logs"], strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5), key


@pytest.mark.slow
def test_a_per_process_mean_would_be_caught(runs: dict[str, dict[str, Any]]) -> None:
    """The control: normalizing by each rank's own count gives a different update, far outside the tolerance."""
    error, scale = _update_error(runs["per_process_mean"], runs["single"])
    assert error > 100 * 1e-5 * scale, (error, scale)
