"""What a report shows besides the training curves and the comparison: each run's final evaluation and a grid.

* ``eval.json`` of the run and of its sub-runs (every task writes one: accuracy or F1 for encoder tasks, perplexity,
  next-token accuracy, agreement and KL to the teacher for causal LMs, on either training backend), as one table;
* ``experiment.csv`` and ``experiment.png`` of a ``kdistill experiment`` grid (or the LLM demo) as its table and
  figure.
"""

from __future__ import annotations

import base64
import csv
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdistill.errors import KdistillError


@dataclass
class Table:
    """A table to show: its header and cells (text), and a title."""

    title: str
    header: list[str]
    cells: list[list[str]]


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, (int, float)):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _flat(scores: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"validation": {"accuracy": 0.7}}`` as ``{"validation/accuracy": 0.7}``; lists and texts kept as text."""
    flat: dict[str, Any] = {}
    for key, value in scores.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{name}/"))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


def evaluation_table(run_dir: Path) -> Table | None:
    """The final metrics of the run (its ``eval.json``) and of each sub-run, one row each; None when none has one.

    Raises:
        KdistillError: an ``eval.json`` that is not a JSON object (named).
    """
    rows: list[tuple[str, dict[str, Any]]] = []
    candidates = [(run_dir.name or "run", run_dir / "eval.json")]
    candidates += [(sub.name, sub / "eval.json") for sub in sorted(run_dir.iterdir()) if sub.is_dir()]
    for label, path in candidates:
        if not path.is_file():
            continue
        try:
            scores = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise KdistillError(f"{path} is not valid JSON ({error}); rerun the evaluation to rewrite it") from error
        if not isinstance(scores, Mapping):
            raise KdistillError(f"{path} holds {type(scores).__name__}, not an object of metrics")
        rows.append((label, _flat(scores)))
    if not rows:
        return None
    keys = list(dict.fromkeys(key for _, flat in rows for key in flat))
    cells = [[label, *(_cell(flat.get(key)) for key in keys)] for label, flat in rows]
    return Table("Final evaluation (eval.json)", ["run", *keys], cells)


def grid_table(run_dir: Path) -> tuple[Table, str | None] | None:
    """A grid's ``experiment.csv`` as a table and its ``experiment.png`` as a ``data:`` URI (None without a png);
    None when the directory holds no grid."""
    path = run_dir / "experiment.csv"
    if not path.is_file():
        return None
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return None
    header, body = rows[0], rows[1:]
    cells = [[_cell(_number_or_text(text)) for text in row] for row in body]
    png = run_dir / "experiment.png"
    uri = None
    if png.is_file():
        uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
    return Table("Experiment grid (experiment.csv)", header, cells), uri


def _number_or_text(text: str) -> Any:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text
