"""A run directory is trustworthy: one writer at a time, a finished run is never overwritten, a resume continues
the run it finds (its own config, its complete checkpoints, its log without repeats), on both backends."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_run import lm_run_config

from kdistill._lock import LOCK_NAME
from kdistill.config import load_config
from kdistill.errors import KdistillError
from kdistill.runs.run import run

BACKENDS = ["engine", "trainer"]


@pytest.fixture
def lm_run(tmp_path: Path) -> dict:
    return lm_run_config(tmp_path)


def _weights(student_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(student_dir / "model.safetensors"))


def _steps(out: Path) -> list[tuple[int, str]]:
    """(step, kind) of every metrics.jsonl record, in order."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], "eval" if any(k.startswith("eval/") for k in r) else "train") for r in records]


def _checkpoints(out: Path, backend: str) -> list[Path]:
    if backend == "engine":
        return sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return sorted((out / "trainer").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _crash_after_last_save(out: Path, backend: str) -> None:
    """What a kill while writing the last checkpoint leaves: that checkpoint incomplete, no student, a run.json
    that still says running, and log records past the previous checkpoint."""
    last = _checkpoints(out, backend)[-1]
    (last / "trainer_state.json").unlink()  # written last by the engine and by the Trainer
    shutil.rmtree(out / "student")
    (out / "eval.json").unlink()
    (out / "run.json").write_text(json.dumps({"status": "running", "mode": "distill"}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_killed_while_saving_resumes_to_the_uninterrupted_weights_and_log(
    lm_run: dict, tmp_path: Path, backend: str
) -> None:
    lm_run["training"].update(backend=backend, save_every=3, keep_last=5, log_every=1, eval_every=2)
    whole = dict(lm_run, output_dir=str(tmp_path / "whole"))
    run(load_config(data=whole))
    run(load_config(data=lm_run))
    out = Path(lm_run["output_dir"])
    _crash_after_last_save(out, backend)
    resumed = run(load_config(data=dict(lm_run, resume=True)))
    expected = _weights(tmp_path / "whole" / "student")
    for name, tensor in _weights(resumed.student_dir).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-6, msg=name)
    assert _steps(out) == _steps(tmp_path / "whole")  # each record once, in order
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_on_a_finished_run_is_refused_and_changes_nothing(lm_run: dict, backend: str) -> None:
    lm_run["training"]["backend"] = backend
    run(load_config(data=lm_run))
    out = Path(lm_run["output_dir"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    changed = dict(lm_run, resume=True, training=dict(lm_run["training"], learning_rate=1.0))
    with pytest.raises(KdistillError, match="already holds a complete run; resume continues an unfinished run"):
        run(load_config(data=changed))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_with_another_config_is_refused_naming_the_field(lm_run: dict) -> None:
    lm_run["training"].update(save_every=4)
    run(load_config(data=lm_run))
    out = Path(lm_run["output_dir"])
    (out / "run.json").write_text(json.dumps({"status": "failed", "mode": "distill", "error": "killed"}))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    changed = dict(lm_run, resume=True, training=dict(lm_run["training"], learning_rate=0.5))
    with pytest.raises(KdistillError, match=r"training\.learning_rate: 0\.003 there, 0\.5 now"):
        run(load_config(data=changed))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # run.json, config.yaml kept
    # the fields that change nothing the run computes may differ
    same = dict(lm_run, resume=True, training=dict(lm_run["training"], progress=True))
    assert run(load_config(data=same)).metrics


def _hold_lock(directory: Path) -> subprocess.Popen:
    """Another live process that holds ``directory``'s lock (as a run writing there would)."""
    code = (
        "import sys, time; from kdistill._lock import exclusive\n"
        f"with exclusive({str(directory)!r}, {str(directory / LOCK_NAME)!r}):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_naming_the_holder_and_a_stale_lock_is_taken(lm_run: dict) -> None:
    out = Path(lm_run["output_dir"])
    holder = _hold_lock(out)
    try:
        with pytest.raises(KdistillError, match=rf"in use by another kdistill process \(pid {holder.pid} on "):
            run(load_config(data=lm_run))
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock is stale (same host, no such process), so the next run takes it
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    run(load_config(data=lm_run))
    assert not (out / LOCK_NAME).exists()  # released at the end
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_a_lock_from_another_host_is_refused(lm_run: dict) -> None:
    out = Path(lm_run["output_dir"])
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getpid() + 1, "host": socket.gethostname() + "-elsewhere"}))
    with pytest.raises(KdistillError, match=r"-elsewhere.*delete .*kdistill\.lock if that process is gone"):
        run(load_config(data=lm_run))


@pytest.mark.parametrize(
    ("where", "message"),
    [("file", "is a file; it must be a directory"), ("under_file", r"is under .*, which is a file")],
)
def test_an_output_dir_that_is_or_sits_under_a_file_is_refused(lm_run: dict, tmp_path: Path, where, message):
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    lm_run["output_dir"] = str(blocker if where == "file" else blocker / "run")
    with pytest.raises(KdistillError, match=message):
        run(load_config(data=lm_run))
    assert blocker.read_text() == "mine"


def test_a_fresh_rerun_of_a_failed_run_starts_its_log_anew(lm_run: dict) -> None:
    lm_run["training"].update(log_every=1)
    run(load_config(data=lm_run))
    out = Path(lm_run["output_dir"])
    first = _steps(out)
    (out / "run.json").write_text(json.dumps({"status": "failed", "mode": "distill", "error": "killed"}))
    shutil.rmtree(out / "student")
    run(load_config(data=lm_run))  # no checkpoints, no resume: the run starts over
    assert _steps(out) == first


def test_a_lock_being_written_is_held_and_a_torn_old_one_is_taken(tmp_path: Path) -> None:
    from kdistill._lock import exclusive

    lock = tmp_path / LOCK_NAME
    lock.write_text("")  # created by O_EXCL a moment ago, its holder not yet done writing it
    with pytest.raises(KdistillError, match="in use by another kdistill process"), exclusive(tmp_path, lock):
        pass
    old = lock.stat().st_mtime - 60
    os.utime(lock, (old, old))  # a lock torn by a kill a minute ago: nobody holds it
    with exclusive(tmp_path, lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
