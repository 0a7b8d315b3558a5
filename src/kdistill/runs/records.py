"""A run directory's records: ``run.json`` (its status), ``config.yaml``, and the keys of kdistill's caches.

``run.json`` says ``running`` while a run trains, then ``complete`` (with the seconds it took) or ``failed`` (with
the error). A directory that holds a complete run, or anything that is not a run, is refused as an
``output_dir`` unless ``resume`` is on, so nothing a user has is overwritten.
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

from kdistill._io import write_json_atomically
from kdistill.config import RunConfig, dump_config
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
    return json.loads(file.read_text()).get("status")


def check_output_dir(config: RunConfig) -> Path:
    """The run's directory, unless it holds a complete run or something else (and ``resume`` is off)."""
    out = Path(config.output_dir)
    status = run_status(out)
    if status == "complete" and not config.resume:
        raise KdistillError(f"output_dir {out} already holds a complete run; choose another output_dir")
    if out.exists() and status is None and any(out.iterdir()) and not config.resume:
        raise KdistillError(f"output_dir {out} exists and is not empty; choose another output_dir")
    return out


@contextlib.contextmanager
def recorded_run(out: Path, config: RunConfig, start: float) -> Iterator[dict[str, float]]:
    """The run directory's bookkeeping around training: ``run.json`` says running, then failed (with the error) or
    complete (with the seconds since ``start``, also put in the yielded dict), and ``config.yaml`` holds the config."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / "run.json", {"status": "running", "mode": config.mode, "started": time.time()})
    (out / "config.yaml").write_text(dump_config(config))
    record: dict[str, float] = {}
    try:
        yield record
    except BaseException as error:
        write_json_atomically(out / "run.json", {"status": "failed", "mode": config.mode, "error": str(error)})
        raise
    record["seconds"] = time.perf_counter() - start
    write_json_atomically(out / "run.json", {"status": "complete", "mode": config.mode, "seconds": record["seconds"]})
