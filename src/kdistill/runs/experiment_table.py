"""Comparison tables from plain row dicts: ``<stem>.md``, ``<stem>.csv`` and a bar chart ``<stem>.png``.

:func:`write_comparison` knows nothing about grids; ``kdistill experiment`` (:func:`kdistill.runs.experiment.
write_experiment`) and the LLM demo pass it the rows they computed.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdistill._io import atomic_write_bytes
from kdistill.errors import InvalidArgumentError

__all__ = ["MISSING", "ComparisonPaths", "format_cell", "is_number", "write_comparison"]

MISSING = "—"  # a cell without a value (a failed variant, a metric a run did not report)


@dataclass(frozen=True)
class ComparisonPaths:
    """The files :func:`write_comparison` wrote (``png`` is None when no column was plotted) and the table text."""

    markdown: Path
    csv: Path
    png: Path | None
    table: str


def format_cell(value: Any) -> str:
    """A value as a markdown cell: floats with 4 decimals, None as an em dash, ``|`` escaped, one line."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("\n", " ").replace("|", "\\|")


def write_comparison(rows: Sequence[Mapping[str, Any]], output_dir: str | Path, metrics: Sequence[str] | None = None,
                     title: str = "Comparison", *, columns: Sequence[str] | None = None, label: str = "variant",
                     notes: Sequence[str] = (), stem: str = "experiment") -> ComparisonPaths:  # fmt: skip
    """Write ``<stem>.md`` (markdown table), ``<stem>.csv`` (the same values, unrounded) and ``<stem>.png``.

    Args:
        rows: one dict per compared thing (a variant, a model); each must hold ``label``. A row's ``error`` is
            listed under the table instead of in it (and is a column of the CSV).
        output_dir: created if needed.
        metrics: the columns drawn as bar charts, one panel each; None: every column whose values are numbers.
        title: the markdown heading and the figure's title.
        columns: the table's columns in order; None: ``label``, then every key in the order the rows first
            hold it (``error`` aside).
        label: the key naming each row (the bars' labels).
        notes: lines written between the heading and the table.
        stem: the files' name without suffix.

    Returns:
        The paths written (``png`` None when there is no metric to draw) and the markdown table itself.

    Raises:
        InvalidArgumentError: no rows, a row without ``label``, or a metric that is no column.
    """
    if not rows:
        raise InvalidArgumentError("write_comparison: rows is empty; there is nothing to compare")
    for index, row in enumerate(rows):
        if label not in row:
            raise InvalidArgumentError(f"write_comparison: row {index} has no {label!r} (keys: {', '.join(row)})")
    if columns is None:
        keys = dict.fromkeys(key for row in rows for key in row if key != "error")
        columns = [label, *(key for key in keys if key != label)]
    columns = list(columns)
    if metrics is None:
        metrics = [c for c in columns[1:] if _numeric_column(rows, c)]
    for metric in metrics:
        if metric not in columns:
            raise InvalidArgumentError(f"write_comparison: metric {metric!r} is not a column ({', '.join(columns)})")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    table = _markdown_table(rows, columns)
    png = out / f"{stem}.png" if metrics else None
    lines = [f"# {title}", ""]
    lines += [*(f"{note}  " for note in notes), ""] if notes else []
    lines += [table, ""]
    if png is not None:
        lines += [f"![{title}]({png.name})", ""]
    errors = [(row[label], row["error"]) for row in rows if row.get("error")]
    if errors:
        lines += ["Errors:", "", *(f"- `{name}`: {format_cell(error)}" for name, error in errors), ""]
    markdown = out / f"{stem}.md"
    atomic_write_bytes(markdown, "\n".join(lines).encode())

    csv_columns = [*columns, "error"] if errors and "error" not in columns else columns
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row[c] for c in csv_columns])
    csv_path = out / f"{stem}.csv"
    atomic_write_bytes(csv_path, buffer.getvalue().encode())

    if png is not None:
        atomic_write_bytes(png, _bar_chart(rows, metrics, label, title))
    return ComparisonPaths(markdown, csv_path, png, table)


def _markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(format_cell(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def is_number(value: Any) -> bool:
    """True for an int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numeric_column(rows: Sequence[Mapping[str, Any]], column: str) -> bool:
    values = [row.get(column) for row in rows if row.get(column) is not None]
    return bool(values) and all(is_number(v) for v in values)


def _bar_chart(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], label: str, title: str) -> bytes:
    """One bar panel per metric (Agg canvas on a Figure: the caller's pyplot backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(len(metrics), 3)
    nrows = math.ceil(len(metrics) / ncols)
    width = max(3.2, 0.55 * len(rows) + 1.5)
    figure = Figure(figsize=(width * ncols, 3.4 * nrows + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    names = [str(row[label]) for row in rows]
    for ax, metric in zip(axes, metrics, strict=False):
        values = [row.get(metric) if is_number(row.get(metric)) else math.nan for row in rows]
        bars = ax.bar(range(len(rows)), values, color="#4c72b0")
        ax.bar_label(bars, labels=[format_cell(v) if not math.isnan(v) else "" for v in values], fontsize=7)
        ax.set_xticks(range(len(rows)), names, rotation=30 if len(rows) > 3 else 0, ha="right" if len(rows) > 3
                      else "center", fontsize=8)  # fmt: skip
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if all(math.isnan(v) for v in values):
            ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center", va="center", color="#888")
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
