"""A run directory's records: ``run.json`` (its status), ``config.yaml``, and the keys of kdistill's caches.

``run.json`` says ``running`` while a run trains, then ``complete`` (with the seconds it took) or ``failed`` (with
the error). A directory that holds a complete run, or anything that is not a run, is refused as an
``output_dir``, so nothing a user has is overwritten; ``resume`` continues an unfinished run with its own config.
One process writes a run directory at a time (a lock file naming it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdistill._io import atomic_write_text, check_dir_target, write_json_atomically
from kdistill._lock import LOCK_NAME, check_unlocked, exclusive
from kdistill.config import RunConfig
from kdistill.errors import KdistillError


@dataclass
class RunResult:
    """What a finished run returns."""

    output_dir: Path  # the run directory
    student_dir: Path  # the trained model, a save_pretrained folder with its tokenizer
    metrics: dict[str, float]  # "<split>/<metric>", as in eval.json
    seconds: float  # wall time of the run


def default_cache_dir() -> Path:
    """Where kdistill caches fine-tuned teachers and de-quantized GGUF models (``$KDISTILL_CACHE``, or
    ``~/.cache/kdistill``)."""
    return Path(os.environ.get("KDISTILL_CACHE", Path.home() / ".cache" / "kdistill"))


def config_hash(*parts: object) -> str:
    """16 hex digits of the SHA-256 of ``parts`` as JSON: a cache key for everything that shapes a cached thing."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_status(run_dir: str | Path) -> str | None:
    """``"complete"``, ``"running"``, ``"failed"``, or None when ``run_dir`` is no run directory."""
    file = Path(run_dir) / "run.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text()).get("status")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise KdistillError(f"{file} is not a kdistill run record; choose another output_dir") from None


# config fields a resumed run may change: they alter nothing the run computes
RESUME_FREE_FIELDS = ("resume", "training.progress")


def config_difference(directory: Path, config: dict[str, Any]) -> str | None:
    """None when ``directory/config.yaml`` holds ``config`` (:data:`RESUME_FREE_FIELDS` aside), else the first
    difference in words (``"training.learning_rate: 0.001 there, 0.002 now"``)."""
    file = directory / "config.yaml"
    if not file.is_file():
        return "it has no config.yaml"
    try:
        saved = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return "its config.yaml is not valid YAML"
    if not isinstance(saved, dict):
        return "its config.yaml holds no mapping"
    return _first_difference(saved, config, "")


def _first_difference(saved: Any, now: Any, prefix: str) -> str | None:
    if prefix.rstrip(".") in RESUME_FREE_FIELDS:
        return None
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in [*now, *(k for k in saved if k not in now)]:
            found = _first_difference(saved.get(key), now.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    if saved != now:
        return f"{prefix.rstrip('.')}: {saved!r} there, {now!r} now"
    return None


def check_run_dir(out: Path, *, resume: bool, config: dict[str, Any]) -> Path:
    """``out`` as a run's directory, or a one-line error before anything is written.

    Refused: a path that is (or sits under) a file; a directory another process is writing; a complete run (a
    finished run is never overwritten, with ``resume`` or without); a non-empty directory that is not a run; and a
    ``resume`` whose ``config`` differs from the one the run was started with.
    """
    check_launch()
    check_dir_target(out, "output_dir")
    if is_main_process():  # the main process holds the lock for its launch; the others never write
        check_unlocked(out, out / LOCK_NAME)
    status = run_status(out)
    if status == "complete":
        why = "; resume continues an unfinished run and never overwrites a finished one" if resume else ""
        raise KdistillError(f"output_dir {out} already holds a complete run{why}; choose another output_dir")
    if out.is_dir() and status is None and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise KdistillError(f"output_dir {out} exists and is not empty; choose another output_dir")
    if resume and status is not None:
        difference = config_difference(out, config)
        if difference is not None:
            raise KdistillError(
                f"output_dir {out} holds a {status} run of another config ({difference}); resume continues a run "
                "with the config it was started with: set it back, or choose another output_dir"
            )
    return out


def check_output_dir(config: RunConfig) -> Path:
    """The run's directory, checked with :func:`check_run_dir`."""
    return check_run_dir(Path(config.output_dir), resume=config.resume, config=config.model_dump(mode="json"))


def is_main_process() -> bool:
    """Whether this process writes the run's files and prints: rank 0 of a launch, or a process run alone."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


WORKING_LAUNCH = (
    "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N --num_machines 1 "
    "--mixed_precision no --dynamo_backend no -m kdistill train RUN.yaml on CPU, "
    "or accelerate launch --num_processes N -m kdistill train RUN.yaml on N GPUs"
)


def check_launch() -> None:
    """Refuse a launch whose processes would not train together: a process told ``WORLD_SIZE > 1`` that accelerate
    runs alone, or one whose rank accelerate does not see (each process then believes it is rank 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        asked = _launcher_processes()
        if asked is not None and asked > 1:
            raise KdistillError(
                f"accelerate launch was asked for {asked} processes but started this one alone (it does so with "
                f"--cpu); launch with: {WORKING_LAUNCH}"
            )
        return
    import torch
    from accelerate import PartialState

    if not torch.cuda.is_available():  # torchrun on CPUs: accelerate joins the processes with gloo only when told
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    try:
        state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    except (ValueError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise KdistillError(
            f"WORLD_SIZE={world} is set, but this process cannot join the others ({reason[:160]}); launch with: "
            f"{WORKING_LAUNCH}"
        ) from None
    rank = int(os.environ.get("RANK", "0") or 0)
    if state.num_processes != world or state.process_index != rank:
        raise KdistillError(
            f"this process was launched as rank {rank} of WORLD_SIZE={world}, but accelerate runs it as process "
            f"{state.process_index} of {state.num_processes} ({state.distributed_type}), so the processes would "
            f"not train together and would write the same files; launch with: {WORKING_LAUNCH}"
        )


def _launcher_processes() -> int | None:
    """``--num_processes`` of the ``accelerate launch`` that started this process (from the parent's command line,
    where the system shows it), or None."""
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    # `accelerate launch ...`, `python -m accelerate.commands.launch ...`
    if not any(part == "launch" or part.endswith(("accelerate.commands.launch", "launch.py")) for part in parent):
        return None
    if not any("accelerate" in part for part in parent):
        return None
    for index, part in enumerate(parent):
        for flag in ("--num_processes", "--num-processes"):
            value = parent[index + 1] if part == flag and index + 1 < len(parent) else None
            if part.startswith(flag + "="):
                value = part.split("=", 1)[1]
            if value is not None and value.isdigit():
                return int(value)
    return None


@contextlib.contextmanager
def run_records(
    out: Path, *, mode: str, config: dict[str, Any], resume: bool, start: float
) -> Iterator[dict[str, float]]:
    """The run directory's bookkeeping around training, on the main process (others only train): the directory's
    lock for the whole run, ``run.json`` saying running, then failed (with the error) or complete (with the seconds
    since ``start``, also put in the yielded dict), and ``config.yaml`` holding the config."""
    record: dict[str, float] = {}
    if not is_main_process():
        yield record
        record["seconds"] = time.perf_counter() - start
        return
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out, out / LOCK_NAME):
        if run_status(out) == "complete":  # another run ended here since check_run_dir
            raise KdistillError(f"output_dir {out} already holds a complete run; choose another output_dir")
        write_json_atomically(out / "run.json", {"status": "running", "mode": mode, "started": time.time()})
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        try:
            yield record
        except BaseException as error:
            write_json_atomically(out / "run.json", {"status": "failed", "mode": mode, "error": str(error)})
            raise
        record["seconds"] = time.perf_counter() - start
        write_json_atomically(out / "run.json", {"status": "complete", "mode": mode, "seconds": record["seconds"]})


@contextlib.contextmanager
def recorded_run(out: Path, config: RunConfig, start: float) -> Iterator[dict[str, float]]:
    """:func:`run_records` for a :class:`~kdistill.config.RunConfig` run."""
    data = config.model_dump(mode="json")
    with run_records(out, mode=config.mode, config=data, resume=config.resume, start=start) as record:
        yield record
