"""Runs that need real processes: a SIGKILL mid-run then resume, and two data-parallel CPU processes (gloo)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.training.checkpoint import latest_checkpoint

SCRIPT = Path(__file__).resolve().parent / "train_script.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_script(out: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    run_script(reference, "--max-steps", "12")
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(interrupted), "--max-steps", "12", "--save-every", "2", "--sleep", "0.3"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            latest = latest_checkpoint(interrupted)
            if latest is not None and latest.name >= "step-00000004":
                break
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint appeared in time")
        time.sleep(0.4)  # land somewhere in the next steps, possibly inside a save
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (interrupted / "rank-0.safetensors").exists(), "the run finished before it was killed"
    killed_at = latest_checkpoint(interrupted)
    assert killed_at is not None and killed_at.name < "step-00000012"
    # a checkpoint cut short by the kill must be ignored: fake one on top of whatever the kill left
    (interrupted / "checkpoints" / ".tmp-step-00000099").mkdir(exist_ok=True)
    (interrupted / "checkpoints" / "step-00000098").mkdir(exist_ok=True)  # no trainer_state.json: incomplete
    run_script(interrupted, "--max-steps", "12", "--save-every", "2", "--resume")
    assert_same_weights(
        load_file(str(reference / "rank-0.safetensors")), load_file(str(interrupted / "rank-0.safetensors"))
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_end_identical_and_normalize_globally(tmp_path):
    """Two gloo processes with 4 examples each equal one process with 8: the loss is normalized globally."""
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(SCRIPT),
    ]
    out = tmp_path / "ddp"
    done = subprocess.run(
        [*launch, str(out), "--max-steps", "4", "--batch-size", "4"],
        env={**ENV, "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = load_file(str(out / "rank-0.safetensors")), load_file(str(out / "rank-1.safetensors"))
    assert_same_weights(rank0, rank1)
    single = tmp_path / "single"
    run_script(single, "--max-steps", "4", "--batch-size", "8")
    assert_same_weights(rank0, load_file(str(single / "rank-0.safetensors")), exact=False)
