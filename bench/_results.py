"""Shared by the benchmarks: each rewrites its own section of bench/RESULTS.md between markers."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine_line() -> str:
    return (
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )


def write_section(key: str, body: str) -> None:
    """Replace the text between ``<!-- key:start -->`` and ``<!-- key:end -->`` (appended when absent)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
