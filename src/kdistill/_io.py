"""Atomic file writes: a reader (or a rerun after a kill) sees the old file or the new one, never half of one.

Each write goes to a uniquely named temporary file in the target's directory (so several processes writing the
same target never share a temporary file) and is moved into place with ``os.replace``; the temporary file is
removed if the write fails.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdistill.errors import KdistillError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp makes the file 0600; a written file honours the umask
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomically(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically (values JSON cannot hold are written as text)."""
    return atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def keep_first_lines(path: str | Path, count: int) -> None:
    """Cut the text file ``path`` to its first ``count`` complete lines, atomically (an absent file stays absent)."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]  # complete lines only: a torn last line is dropped
    if len(lines) == count and data.endswith(b"\n"):
        return
    atomic_write_bytes(path, b"".join(line + b"\n" for line in lines[:count]))


def records_up_to_step(path: str | Path, step: int) -> int:
    """How many of the first JSON-lines records of ``path`` have a ``step`` up to ``step`` (0 when absent)."""
    path = Path(path)
    count = 0
    if path.is_file():
        for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
            try:
                if int(json.loads(line)["step"]) > step:
                    break
            except (ValueError, KeyError, TypeError):
                break
            count += 1
    return count


def read_utf8(path: Path, what: str, error: type[KdistillError] = KdistillError) -> str:
    """The text of ``path``; a file that is not UTF-8 is ``error`` naming ``what``, the line and the byte."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as bad:
        line = path.read_bytes()[: bad.start].count(b"\n") + 1
        raise error(
            f"{what} {path} line {line} is not UTF-8 (byte {bad.object[bad.start]:#04x}); save the file as UTF-8"
        ) from None


def iter_jsonl(path: Path, what: str, error: type[KdistillError] = KdistillError) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of the JSON-lines file ``path``; bad UTF-8, bad JSON or a
    line that is no object is ``error`` naming ``what`` and the line."""
    for number, line in enumerate(read_utf8(path, what, error).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as bad:
            raise error(f"{what} {path} line {number} is not valid JSON ({bad.msg})") from None
        if not isinstance(record, dict):
            raise error(f"{what} {path} line {number} must be a JSON object, got {type(record).__name__}")
        yield number, record


def check_dir_target(out: str | Path, what: str) -> Path:
    """``out`` as a directory to write into, or :class:`KdistillError` when it is a file or lies under one (named
    as ``what``, the option or field that gave it), before any work is done."""
    out = Path(out)
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == out else f"is under {path}, which is a file"
            raise KdistillError(f"{what} {out} {where}; it must be a directory")
    return out


# written beside a student whose vocabulary was trimmed: {"kept": pieces with their own id, "of": the teacher's}
TRIMMED_VOCABULARY_FILE = "trimmed_vocabulary.json"


def trimmed_vocabulary(directory: str | Path | None) -> dict[str, Any] | None:
    """The record of a trimmed vocabulary saved in ``directory`` (None when there is none or it is unreadable)."""
    if directory is None:
        return None
    path = Path(directory) / TRIMMED_VOCABULARY_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"kept", "of"} <= set(record) else None
