"""The generated dataset: every prompt's completions appended to a jsonl file, resumably.

``kdistill generate --teacher T --prompts P.jsonl --out D.jsonl`` reads prompts (``prompt``, ``instruction`` +
``input``, or chat ``messages``), has the teacher complete each one — a local Hugging Face model (batched, left
padding, seeded per batch) or any OpenAI-compatible server — and appends one line per (prompt, sample)::

    {"id", "messages": [...prompt turns..., {"role": "assistant", "content": completion}], "prompt",
     "completion", "teacher", "sample"}

The ``messages`` form is what the SFT renderer consumes, so the file is the student's training data as is.

Generation is resumable and safe to kill: each batch is appended with one ``write`` of complete lines followed by
``fsync``, so a kill leaves at most a torn last line, which the next run cuts off. A rerun skips the (id, sample)
pairs already written; a batch is always formed from the same prompts and seeded with ``seed + batch_index``, so a
partly written batch is generated again in full and only its missing lines are appended: with a deterministic
teacher the resumed file equals an uninterrupted run's line for line. ``D.jsonl.meta.json`` records the teacher and
the sampling parameters and the batch size; a rerun with different ones is refused (``overwrite=True`` starts the
file over). One process writes a file at a time: ``D.jsonl.lock`` names it, and a second one is refused.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdistill._io import write_json_atomically
from kdistill._lock import exclusive
from kdistill.errors import InvalidArgumentError
from kdistill.generation.prompts import GenerationParams, Prompt, id_key, read_prompts
from kdistill.generation.teachers import Teacher

ProgressFn = Callable[[int, int], None]

# meta fields that change what the teacher writes; a rerun must agree on all of them to append to the same file
COMPARED_META_FIELDS = (
    "teacher",
    "backend",
    "model",
    "gguf_file",
    "api_base",
    "max_new_tokens",
    "do_sample",  # before temperature and top_p, which are None when greedy: the root difference is named
    "temperature",
    "top_p",
    "seed",
    "num_samples",
    "system_prompt",
    "prompt_field",
    "batch_size",  # when sampling: batch b is seeded with seed + b, so another batch size gives other samples
)


def meta_path(out_path: str | Path) -> Path:
    """``D.jsonl`` → ``D.jsonl.meta.json``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".meta.json")


def _check_meta(out_path: Path, meta: dict[str, Any], overwrite: bool) -> None:
    """Refuse to append to an output written with other parameters; ``overwrite`` removes it instead."""
    meta_file = meta_path(out_path)
    if overwrite:
        out_path.unlink(missing_ok=True)
        return
    if meta_file.is_file():
        try:
            existing = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            raise InvalidArgumentError(f"{meta_file} is not valid JSON; pass --overwrite to start over") from None
        for field in COMPARED_META_FIELDS:
            if field == "batch_size" and not meta.get("do_sample"):
                continue  # greedy text does not depend on the seeds (left padding keeps it, tested)
            if existing.get(field) != meta.get(field):
                raise InvalidArgumentError(
                    f"{out_path} was generated with {field}={existing.get(field)!r}, not {meta.get(field)!r}; "
                    "use the same parameters to resume, another --out, or --overwrite to start over"
                )
    elif out_path.is_file() and out_path.stat().st_size > 0:
        raise InvalidArgumentError(
            f"{out_path} exists without {meta_file.name}, so its parameters are unknown; --overwrite starts it over"
        )


def read_done(out_path: str | Path) -> set[tuple[str, int]]:
    """The (id key, sample) pairs already in ``out_path``, after cutting off a torn last line.

    A line without its newline is what a kill during an append leaves; it is dropped and the file truncated back to
    the last complete line. A complete line that is not a generated record means the file is something else: error.
    """
    out_path = Path(out_path)
    if not out_path.is_file():
        return set()
    with out_path.open("rb+") as file:
        content = file.read()
        complete = content.rfind(b"\n") + 1
        if complete < len(content):
            print(
                f"generate: {out_path} ends in a torn line ({len(content) - complete} bytes), cut off",
                file=sys.stderr,
                flush=True,
            )
            file.truncate(complete)
            file.flush()
            os.fsync(file.fileno())
    done: set[tuple[str, int]] = set()
    # split on "\n" only: str.splitlines() would also split inside a completion holding U+2028 or U+0085
    for number, line in enumerate(content[:complete].decode("utf-8").split("\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done.add((id_key(record["id"]), int(record["sample"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise InvalidArgumentError(
                f"{out_path} line {number} is not a generated record with 'id' and 'sample'; "
                "is --out the right file? (--overwrite starts it over)"
            ) from None
    return done


def _append_lines(out_path: Path, lines: list[str]) -> None:
    """Append complete lines with one write (looped only if the OS writes part of it) and fsync them."""
    data = "".join(f"{line}\n" for line in lines).encode("utf-8")
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _print_progress(done: int, total: int) -> None:
    print(f"generate: {done}/{total} prompts", file=sys.stderr, flush=True)


@dataclass
class GenerateResult:
    """What one call of :func:`generate_dataset` did."""

    out_path: Path
    total: int  # prompts in the file (after limit)
    skipped: int  # prompts whose samples were all in the output already
    lines_written: int  # lines appended by this call


def generate_dataset(
    prompts_path: str | Path,
    out_path: str | Path,
    teacher: Teacher,
    params: GenerationParams | None = None,
    *,
    batch_size: int = 8,
    prompt_field: str = "auto",
    system_prompt: str | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = _print_progress,
) -> GenerateResult:
    """Have ``teacher`` complete every prompt of ``prompts_path`` and append the records to ``out_path``.

    Batches are fixed slices of the prompt list (batch ``b`` = prompts ``b * batch_size`` onward), generated
    under ``seed + b``; a batch whose lines are all present is skipped, a partly present one generated again and
    only its missing lines appended. See the module docstring for the format and the resumption guarantees.

    Args:
        progress: called with (prompts done, total) after each appended batch; None for silence.

    Raises:
        InvalidArgumentError: bad prompts, a bad parameter, or an existing output made with other parameters.
    """
    params = params or GenerationParams()
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    prompts = read_prompts(prompts_path, prompt_field=prompt_field, system_prompt=system_prompt, limit=limit)
    out_path = Path(out_path)
    meta = {
        "teacher": teacher.name,
        "model": None,
        "gguf_file": None,
        "api_base": None,
        **teacher.meta(),
        **params.meta(),
        "system_prompt": system_prompt,
        "prompt_field": prompt_field,
        "batch_size": batch_size,
        "prompts": str(prompts_path),
    }
    if out_path.is_dir():
        raise InvalidArgumentError(
            f"--out {out_path} is a directory; give the jsonl file to write, such as {out_path}/data.jsonl"
        )
    for parent in out_path.parents:
        if parent.exists() and not parent.is_dir():
            raise InvalidArgumentError(f"--out {out_path} is under {parent}, which is a file")
    with exclusive(out_path, out_path.with_name(out_path.name + ".lock")):
        return _generate_locked(prompts, out_path, teacher, params, meta, batch_size, overwrite, progress)


def _generate_locked(
    prompts: list[Prompt],
    out_path: Path,
    teacher: Teacher,
    params: GenerationParams,
    meta: dict[str, Any],
    batch_size: int,
    overwrite: bool,
    progress: ProgressFn | None,
) -> GenerateResult:
    """:func:`generate_dataset`'s work, while this process holds the lock on ``out_path``."""
    _check_meta(out_path, meta, overwrite)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(meta_path(out_path), meta)
    done = read_done(out_path)
    samples = range(params.num_samples)

    def finished(prompt: Prompt) -> bool:
        return all((id_key(prompt.id), sample) in done for sample in samples)

    total = len(prompts)
    skipped = completed = sum(finished(prompt) for prompt in prompts)
    if skipped and progress is not None:
        print(f"generate: resuming, {skipped} of {total} prompts already in {out_path}", file=sys.stderr, flush=True)
    written = 0
    for batch_index, start in enumerate(range(0, total, batch_size)):
        batch = prompts[start : start + batch_size]
        if all(finished(prompt) for prompt in batch):
            continue
        completions = teacher.generate(batch, params, batch_index)
        lines = []
        for prompt, texts in zip(batch, completions, strict=True):
            rendered = teacher.render(prompt.messages)
            for sample, text in enumerate(texts):
                if (id_key(prompt.id), sample) in done:
                    continue
                record = {
                    "id": prompt.id,
                    "messages": [*prompt.messages, {"role": "assistant", "content": text}],
                    "prompt": rendered,
                    "completion": text,
                    "teacher": teacher.name,
                    "sample": sample,
                }
                lines.append(json.dumps(record, ensure_ascii=False))
            completed += not finished(prompt)
        _append_lines(out_path, lines)
        written += len(lines)
        done.update((id_key(prompt.id), sample) for prompt in batch for sample in samples)
        if progress is not None:
            progress(completed, total)
    return GenerateResult(out_path, total, skipped, written)
