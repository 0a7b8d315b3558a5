"""Checkpoints that lose nothing: written to a temporary directory and renamed into place, the last K kept.

Layout of ``<output_dir>/checkpoints/step-00000040/``::

    student/                  the student as its framework saves it (``save_pretrained`` for Hugging Face models,
                              ``model.safetensors`` otherwise): loadable on its own
    projections.safetensors   distillation-only modules (projections), never inside the student
    extra-<name>.safetensors  other trained state (e.g. the EMA teacher)
    optimizer.pt scheduler.pt rng-<rank>.pt
    trainer_state.json        step, epoch, data position, best metric — written last

The ``.pt`` files are read with ``torch.load(weights_only=True)`` and hold tensors, numbers and strings only, so a
file planted in a checkpoint directory cannot run code on ``resume``.

A directory only gets its ``step-*`` name by an atomic rename after everything in it is on disk, so a run killed
mid-save leaves a ``.tmp-*`` directory that :func:`latest_checkpoint` ignores (and the next save removes).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdistill.errors import KdistillError

_STEP_DIR = re.compile(r"^step-(\d+)$")
_TRAINER_DIR = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_student(student: nn.Module, directory: Path) -> None:
    """Save a student so it loads on its own: ``save_pretrained`` when it has one, safetensors otherwise."""
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(student, "save_pretrained"):
        student.save_pretrained(directory, safe_serialization=True)
    else:
        from safetensors.torch import save_model

        save_model(student, str(directory / "model.safetensors"))


def load_student_weights(student: nn.Module, directory: Path) -> None:
    """Load weights saved by :func:`save_student` into ``student`` (tied weights may be stored once)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise KdistillError(f"checkpoint directory {directory} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = student.load_state_dict(state, strict=False)
    shared = _shared_parameter_names(student)
    really_missing = [k for k in missing if not (shared.get(k, set()) - {k}) & state.keys()]
    if really_missing or unexpected:
        raise KdistillError(
            f"checkpoint {directory} does not fit the student: missing {really_missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def _shared_parameter_names(model: nn.Module) -> dict[str, set[str]]:
    by_storage: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_storage.setdefault(tensor.data_ptr(), set()).add(name)
    return {name: group for group in by_storage.values() for name in group}


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, numbers and strings only (loadable with ``weights_only=True``)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_state(path: Path) -> Any:
    """A ``.pt`` file of tensors, numbers and strings. ``weights_only=True``: a file that would build any other
    object — code to run, planted in a checkpoint directory — is refused, and nothing in it is executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise KdistillError(
            f"checkpoint file {path} holds more than tensors and numbers, so it is not loaded (it could run code); "
            f"delete that checkpoint or start the run again ({reason})"
        ) from None


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_trainer_checkpoint(trainer_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoint-N`` of a Hugging Face ``Trainer`` under ``trainer_dir``, or None.

    The Trainer writes ``trainer_state.json`` last, so a checkpoint without it (a run killed while saving) is
    incomplete and skipped: resuming from it would fail.
    """
    root = Path(trainer_dir)
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        match = _TRAINER_DIR.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints``, or None."""
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    student: nn.Module,
    projections: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    extras: dict[str, nn.Module] | None = None,
    keep_last: int = 2,
    rank: int = 0,
    is_main: bool = True,
    barrier: Any = None,
) -> Path:
    """Write a checkpoint atomically and prune to the last ``keep_last``. Every process calls it (RNG per rank)."""
    barrier = barrier or (lambda: None)
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    if is_main:
        save_student(student, tmp / "student")
        if projections:
            save_file(projections, str(tmp / "projections.safetensors"))
        for name, module in (extras or {}).items():
            state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(state, str(tmp / f"extra-{name}.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    barrier()
    if is_main:
        state_path = tmp / STATE_FILE
        with open(state_path, "w") as handle:
            json.dump(trainer_state, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in checkpoint_dirs(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: Path,
    *,
    student: nn.Module,
    projections: nn.ModuleDict | None,
    projection_names: dict[str, str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extras: dict[str, nn.Module] | None = None,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; returns the trainer state."""
    load_student_weights(student, path / "student")
    proj_file = path / "projections.safetensors"
    if projections is not None and len(projections) > 0:
        if not proj_file.is_file():
            raise KdistillError(f"checkpoint {path} has no projections.safetensors but the run has projections")
        saved = load_file(str(proj_file))
        for key, module in projections.items():
            prefix = projection_names[key] + "/"
            module.load_state_dict({k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)})
    for name, module in (extras or {}).items():
        module.load_state_dict(load_file(str(path / f"extra-{name}.safetensors")))
    optimizer.load_state_dict(_load_state(path / "optimizer.pt"))
    scheduler.load_state_dict(_load_state(path / "scheduler.pt"))
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.is_file():
        set_rng_state(_load_state(rng_file))
    return json.loads((path / STATE_FILE).read_text())


def save_model_atomically(
    target_root: Path,
    student: nn.Module,
    distiller: Any,
    info: dict[str, Any] | None,
    student_subdir: str | None = None,
) -> None:
    """Save student (+ projections beside it) into ``target_root`` by writing a temp dir and renaming it in."""
    if student_subdir is None:
        tmp = target_root.with_name(f".tmp-{target_root.name}")
        if tmp.exists():
            _rmtree(tmp)
        tmp.mkdir(parents=True)
        save_student(student, tmp / "student")
        projections = distiller.projections_state() if hasattr(distiller, "projections_state") else {}
        if projections:
            save_file(projections, str(tmp / "projections.safetensors"))
        if info is not None:
            (tmp / "info.json").write_text(json.dumps(info, indent=2))
        replace_dir(tmp, target_root)
        return
    tmp_student = target_root / f".tmp-{student_subdir}"
    if tmp_student.exists():
        _rmtree(tmp_student)
    save_student(student, tmp_student)
    replace_dir(tmp_student, target_root / student_subdir)
    projections = distiller.projections_state() if hasattr(distiller, "projections_state") else {}
    if projections:
        tmp_file = target_root / ".tmp-projections.safetensors"
        save_file(projections, str(tmp_file))
        tmp_file.replace(target_root / "projections.safetensors")


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, replacing it; a copy when ``source`` must stay (e.g. best/student)."""
    if source.name.startswith(".tmp-"):
        old = target.with_name(f".old-{target.name}")
        if target.exists():
            _rmtree(old)
            os.replace(target, old)
        os.replace(source, target)
        _rmtree(old)
        return
    tmp = target.with_name(f".tmp-{target.name}")
    _rmtree(tmp)
    shutil.copytree(source, tmp)
    replace_dir(tmp, target)


def copy_atomically(source: Path, target: Path) -> None:
    """Copy the file ``source`` to ``target`` through a temporary file renamed into place."""
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.copyfile(source, tmp)
    tmp.replace(target)
