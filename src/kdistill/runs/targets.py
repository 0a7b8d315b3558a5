"""What a command's target names: a run directory (its config and its student) or a model on its own.

``kdistill eval``, ``compare`` and ``params`` take either a run directory (``run.json`` + ``config.yaml``, the
student in ``student/``) or a model directory, hub id or ``packaged:NAME``; these functions turn one into the
other, so the commands only parse and print.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kdistill.config import RunConfig, load_config
from kdistill.errors import KdistillError
from kdistill.models.loading import is_local_path, resolve_model_path
from kdistill.runs.parts import RunParts, build_parts, evaluate
from kdistill.runs.records import run_status


def run_config_for(target: str, config_path: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """A run directory's saved config (its task and data), or the config given with ``--config``.

    Raises:
        KdistillError: ``target`` is no run directory and no ``config_path`` was given.
    """
    run_dir = Path(target)
    if config_path is None and (run_dir / "config.yaml").is_file():
        return load_config(run_dir / "config.yaml", overrides)
    if config_path is None:
        raise KdistillError(f"{target} is not a run directory (no config.yaml); pass --config RUN.yaml for its data")
    return load_config(config_path, overrides)


def model_dir(target: str, field: str = "model") -> str:
    """A complete run directory's student, or the target itself (a model directory, hub id; ``packaged:`` resolved).

    Raises:
        KdistillError: ``target`` is a run directory whose run is not complete, or a local path that does not
            exist (named as ``field``).
    """
    path = Path(target)
    if is_local_path(target) and not path.expanduser().exists():
        raise KdistillError(f"{field} {target} does not exist (no such directory here, and not a hub id)")
    if (path / "run.json").is_file():
        status = run_status(path)
        if status != "complete":
            raise KdistillError(f"{target} is not a complete run (status: {status}); finish or resume it")
        return str(path / "student")
    return resolve_model_path(target, "model")


def parts_with_model(config: RunConfig, model_path: str) -> RunParts:
    """The config's task and data, with the pretrained model at ``model_path`` as the model evaluated (``student``)."""
    finished = {"kind": "pretrained", "path": model_path, "trim_vocab": False, "embed_rank": None}  # as saved
    student = config.student.model_copy(update=finished)
    return build_parts(config.model_copy(update={"mode": "baseline", "teacher": None, "student": student}))


def evaluate_target(
    target: str, *, config_path: str | None = None, split: str = "validation", overrides: Sequence[str] = ()
) -> tuple[str, dict[str, float]]:
    """The task's metrics of a run's student (or any model) on one split of the run's (or ``config_path``'s) data.

    Returns:
        The model's path and its metrics.

    Raises:
        KdistillError: no config for the target, an unfinished run, or a split the data does not have.
    """
    config = run_config_for(target, config_path, overrides)
    path = model_dir(target)
    parts = parts_with_model(config, path)
    if not parts.has_split(split):
        raise KdistillError(f"the data has no {split!r} split (have: {', '.join(parts.eval_examples) or 'none'})")
    return path, evaluate(parts, parts.student, split=split)
